"""Every RPC is traced through the OpenTelemetry SDK."""

from __future__ import annotations

from pathlib import Path

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from syncplane.api.server import create_server
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.service import WorkflowService
from syncplane.store.sqlite import SqliteStore


async def test_each_rpc_gets_a_server_span(tmp_path: Path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = SqliteStore(tmp_path / "db")
    server, port, _ = await create_server(WorkflowService(store), "127.0.0.1:0", tracer_provider=provider)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = svc_grpc.WorkflowServiceStub(channel)
            await stub.ListWorkflows(svc.ListWorkflowsRequest())
            try:
                await stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/missing"))
            except grpc.aio.AioRpcError:
                pass
            try:  # a stream that fails: its span too is named, ended and marked by the domain error
                await stub.WatchWorkflows(svc.WatchWorkflowsRequest(start_revision=-1)).read()
            except grpc.aio.AioRpcError:
                pass
    finally:
        await server.stop(0)
        store.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    listed = spans["/syncplane.v1.WorkflowService/ListWorkflows"]
    assert listed.attributes is not None and listed.attributes["rpc.system"] == "grpc"
    assert listed.attributes["rpc.method"] == "ListWorkflows"
    failed = spans["/syncplane.v1.WorkflowService/GetWorkflow"]
    assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "NOT_FOUND"
    watched = spans["/syncplane.v1.WorkflowService/WatchWorkflows"]
    assert watched.status.status_code == StatusCode.ERROR and watched.status.description == "INVALID_ARGUMENT"
    assert not watched.events, "no exception event (its message may carry input)"
