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
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane_sandbox import SeedSpec, start_sandbox
from syncplane_sandbox.quickstart import write_sandbox_secrets
from tests.backends import eventually
from tests.integration.ingress_env import converge, ingress_spec, profiles_match
from tests.otlp import Received, Span, ancestors, assert_no_secret, by_id, export_env, receiver

__all__ = ["receiver"]   # the fixture, used by name


@pytest.fixture
def server_env(receiver: tuple[str, Received]) -> Iterator[dict[str, str]]:
    endpoint, _ = receiver
    yield {**os.environ, **export_env(endpoint)}


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
            return [s.span.name for s in ancestors(batch, by_id(received.spans))]

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
        index = by_id(received.spans)
        chain = ancestors(batch, index)
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
        assert_no_secret(received, secrets | tokens)
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
        await sb.stop()
