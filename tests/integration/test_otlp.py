"""Issue 17 item 5: traces from the API call to the vendor request, and metrics, over OTLP.

A real `syncplane up` process (its workers real processes too) exports to an OTLP/gRPC receiver that
this test runs, built on the `opentelemetry-proto` package's collector service stubs. The test checks
that the StartWorkflow call's trace holds the worker's first pass, its batches and their vendor
requests; that metrics arrive from the server and the worker; and that no exported attribute (span,
resource, data point) holds the sandbox's client secret or any token it issued."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as msvc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as msvc_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsvc_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.runtime.embedded import write_sandbox_secrets
from syncplane.sandbox import SeedSpec, start_sandbox
from tests.backends import eventually
from tests.integration.ingress_env import converge, ingress_spec, profiles_match


def _value(v: common_pb2.AnyValue) -> str:
    kind = v.WhichOneof("value")
    if kind in ("array_value", "kvlist_value"):
        return str(v)
    return str(getattr(v, kind)) if kind else ""


def _attrs(kvs: Any) -> dict[str, str]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Span:
    service: str
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, str]:
        return _attrs(self.span.attributes)


@dataclass
class Received:
    spans: list[Span] = field(default_factory=list)
    metrics: dict[str, set[str]] = field(default_factory=dict)  # service.name → metric names
    attribute_values: list[tuple[str, str]] = field(default_factory=list)  # every exported (key, value)

    def keep(self, resource: Any) -> str:
        attributes = _attrs(resource.attributes)
        self.attribute_values.extend(attributes.items())
        return attributes.get("service.name", "")


class Traces(tsvc_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    async def Export(self, request: tsvc.ExportTraceServiceRequest, context: Any) -> tsvc.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            service = self.received.keep(rs.resource)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.received.spans.append(Span(service, span))
                    self.received.attribute_values.extend(_attrs(span.attributes).items())
                    self.received.attribute_values.append(("span.name", span.name))
        return tsvc.ExportTraceServiceResponse()


class Metrics(msvc_grpc.MetricsServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    async def Export(self, request: msvc.ExportMetricsServiceRequest,
                     context: Any) -> msvc.ExportMetricsServiceResponse:
        for rm in request.resource_metrics:
            service = self.received.keep(rm.resource)
            names = self.received.metrics.setdefault(service, set())
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    names.add(metric.name)
                    data = getattr(metric, metric.WhichOneof("data") or "gauge")
                    for point in data.data_points:
                        self.received.attribute_values.extend(_attrs(point.attributes).items())
        return msvc.ExportMetricsServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, Received]]:
    received = Received()
    server = grpc.aio.server()
    tsvc_grpc.add_TraceServiceServicer_to_server(Traces(received), server)
    msvc_grpc.add_MetricsServiceServicer_to_server(Metrics(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await server.stop(0)


@pytest.fixture
def server_env(receiver: tuple[str, Received]) -> Iterator[dict[str, str]]:
    endpoint, _ = receiver
    yield {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
           "OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "200"}


def _by_id(spans: list[Span]) -> dict[bytes, Span]:
    return {s.span.span_id: s for s in spans}


def _ancestors(span: Span, index: dict[bytes, Span]) -> list[Span]:
    out = []
    while span.span.parent_span_id and span.span.parent_span_id in index:
        span = index[span.span.parent_span_id]
        out.append(span)
    return out


@pytest.mark.timeout(300)
async def test_start_to_vendor_request_is_one_trace_and_metrics_arrive(
        tmp_path: Path, receiver: tuple[str, Received], server_env: dict[str, str]) -> None:
    _, received = receiver
    sb = await start_sandbox(seed=SeedSpec(contacts=120, seed=5))
    write_sandbox_secrets(sb, tmp_path / "secrets")
    port_file = tmp_path / "port"
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once; the test then talks to it over gRPC)
        [sys.executable, "-m", "syncplane", "up", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0",
         "--port-file", str(port_file), "--no-defaults", "--no-console", "--log-level", "WARNING"],
        env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async def bound() -> bool:
            return port_file.exists() and port_file.read_text().strip() != ""

        await eventually(bound, "the server's port file")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as channel:
            stub = svc_grpc.WorkflowServiceStub(channel)
            await stub.CreateWorkflow(svc.CreateWorkflowRequest(
                workflow_id="traced", workflow=pb.Workflow(spec=ingress_spec(sb, batch_size=50))))
            await stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/traced"))
            await converge(lambda: profiles_match(sb), 120, "the 120 contacts written")

        def start_span() -> Span | None:
            return next((s for s in received.spans if s.span.name.endswith("/StartWorkflow")), None)

        def first_batch() -> Span | None:
            start = start_span()
            if start is None:
                return None
            return next((s for s in received.spans if s.span.trace_id == start.span.trace_id
                         and s.span.name == "batch"), None)

        def chain_of(batch: Span) -> list[str]:
            return [s.span.name for s in _ancestors(batch, _by_id(received.spans))]

        async def traced() -> bool:
            # Spans arrive as they end: the pass ends after its batches, the batch after its requests.
            start, batch = start_span(), first_batch()
            return start is not None and batch is not None and chain_of(batch)[-2:] == ["pass", start.span.name] \
                and any(
                s.span.kind == trace_pb2.Span.SPAN_KIND_CLIENT and s.span.trace_id == start.span.trace_id
                and s.attributes.get("vendor") == "campaign" for s in received.spans)

        await eventually(traced, lambda: f"a trace from StartWorkflow to a batch; spans: "
                                         f"{sorted({(s.service, s.span.name) for s in received.spans})}")
        start, batch = start_span(), first_batch()
        assert start is not None and batch is not None
        assert start.service == "syncplane-server" and batch.service == "syncplane-worker"
        index = _by_id(received.spans)
        chain = _ancestors(batch, index)
        assert [s.span.name for s in chain][-2:] == ["pass", start.span.name], [s.span.name for s in chain]
        first_pass = chain[-2]
        assert first_pass.attributes["workflow"] == "traced" and first_pass.attributes["pass"] == "1"
        assert batch.attributes["workflow"] == "traced" and batch.attributes["stream"]
        assert 0 < int(batch.attributes["records"]) <= 50
        # The batch's vendor requests are its children: client spans with the semantic-convention attributes.
        requests = [s for s in received.spans if s.span.parent_span_id == batch.span.span_id]
        assert requests and all(s.span.kind == trace_pb2.Span.SPAN_KIND_CLIENT for s in requests)
        for r in requests:
            assert r.attributes["vendor"] == "campaign" and r.attributes["attempt"] == "1"
            assert r.attributes["url.template"].startswith("/{organization}/campaign/")
            assert r.attributes["http.response.status_code"] in ("200", "201")
            assert r.attributes["server.address"] == "127.0.0.1"

        async def measured() -> bool:
            worker, server = received.metrics.get("syncplane-worker", set()), received.metrics.get(
                "syncplane-server", set())
            return {"syncplane.records.written", "syncplane.backlog", "http.client.request.duration"} <= worker \
                and "rpc.server.call.duration" in server

        await eventually(measured, lambda: f"metrics from the worker and the server: {received.metrics}")

        # No exported attribute holds a secret: the client secret, a token the sandbox issued, a bearer header.
        secrets = {v for data in sb.secrets().values() for k, v in data.items() if "secret" in k.lower() and v}
        tokens = set(sb.d365_tokens._tokens) | set(sb.acs_tokens._tokens)
        assert secrets and tokens
        tokens |= {"eyJzYnguZDM2NSJ9.", "eyJzYnguYWNzIn0."}  # the prefix of every token each emulator issues
        for key, value in received.attribute_values:
            assert "Bearer" not in value and "access_token" not in value, key
            assert not any(s in value for s in secrets | tokens), key
            assert "?" not in value, (key, value)  # no query string (filters, keys)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
        await sb.stop()
