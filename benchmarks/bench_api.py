"""GetWorkflow and ListWorkflows (100 workflows) on loopback, against a bare
grpc.aio servicer that returns the same messages as constants."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from syncplane.api.server import create_server
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.service import WorkflowService
from syncplane.store.sqlite import SqliteStore
from tests.factories import spec

WORKFLOWS = 100
CONCURRENCY = 8
CALLS = 3000
#: Issue 18's targets: req/s against the bare servicer's in the same run.
TARGETS = {"GetWorkflow": ">= 0.8", f"ListWorkflows({WORKFLOWS})": ">= 0.7"}


class BareServicer(svc_grpc.WorkflowServiceServicer):
    """The floor: no interceptors, no store, no validation."""

    def __init__(self, one: pb.Workflow, page: svc.ListWorkflowsResponse) -> None:
        self.one, self.page = one, page

    async def GetWorkflow(self, request: Any, context: Any) -> pb.Workflow:
        return self.one

    async def ListWorkflows(self, request: Any, context: Any) -> svc.ListWorkflowsResponse:
        return self.page


async def load(call: Callable[[], Awaitable[Any]]) -> dict[str, float]:
    """``call()`` 50 times to warm up, then CALLS times from CONCURRENCY concurrent callers: ``{"rps"
    (calls per second), "p50_ms", "p99_ms" (latency, milliseconds), "cpu_us_per_call" (this process's
    CPU microseconds per call, client and server)}``."""
    latencies: list[float] = []
    per_worker = CALLS // CONCURRENCY

    async def worker() -> None:
        for _ in range(per_worker):
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

    for _ in range(50):
        await call()  # warm-up
    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    q = statistics.quantiles(latencies, n=100)
    # CPU of this process (client and server) per call: steadier than req/s on a shared machine.
    return {"rps": len(latencies) / elapsed, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3,
            "cpu_us_per_call": cpu / len(latencies) * 1e6}


async def run() -> dict[str, Any]:
    """Per method (``"GetWorkflow"``, ``"ListWorkflows(100)"``): ``{"syncplane": load(), "bare": load()
    (the bare servicer), "ratio_rps", "ratio_cpu"}`` (syncplane over bare; see :func:`load`)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "bench.db")
        service = WorkflowService(store, settle_timeout=0)  # no controller here to wait for (AIP-134)
        for i in range(WORKFLOWS):
            await service.create(svc.CreateWorkflowRequest(workflow_id=f"wf-{i:03d}",
                                                           workflow=pb.Workflow(spec=spec())))
        server, port, _ = await create_server(service, "127.0.0.1:0")
        one = await store.get("workflows/wf-042")
        page = await service.list(svc.ListWorkflowsRequest(page_size=WORKFLOWS))
        bare = grpc.aio.server()
        svc_grpc.add_WorkflowServiceServicer_to_server(BareServicer(one, page), bare)  # type: ignore[abstract]
        bare_port = bare.add_insecure_port("127.0.0.1:0")
        await bare.start()
        results: dict[str, Any] = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}") as bch:
            real, base = svc_grpc.WorkflowServiceStub(ch), svc_grpc.WorkflowServiceStub(bch)
            get_req = svc.GetWorkflowRequest(name="workflows/wf-042")
            list_req = svc.ListWorkflowsRequest(page_size=WORKFLOWS)
            for label, ours, floor in (
                ("GetWorkflow", lambda: real.GetWorkflow(get_req), lambda: base.GetWorkflow(get_req)),
                (f"ListWorkflows({WORKFLOWS})", lambda: real.ListWorkflows(list_req),
                 lambda: base.ListWorkflows(list_req)),
            ):
                # Interleave baseline and ours twice to even out drift of the machine.
                b1, o1, b2, o2 = await load(floor), await load(ours), await load(floor), await load(ours)
                b = {k: (b1[k] + b2[k]) / 2 for k in b1}
                o = {k: (o1[k] + o2[k]) / 2 for k in o1}
                results[label] = {"syncplane": o, "bare": b, "ratio_rps": o["rps"] / b["rps"],
                                  "ratio_cpu": o["cpu_us_per_call"] / b["cpu_us_per_call"]}
                print(f"{label:<20} syncplane {o['rps']:8.0f} req/s p50 {o['p50_ms']:6.2f} ms p99 {o['p99_ms']:6.2f} ms"
                      f" {o['cpu_us_per_call']:5.0f} us CPU/call"
                      f" | bare {b['rps']:8.0f} req/s p50 {b['p50_ms']:6.2f} ms p99 {b['p99_ms']:6.2f} ms"
                      f" {b['cpu_us_per_call']:5.0f} us CPU/call"
                      f" | ratio {o['rps'] / b['rps']:.2f} (target {TARGETS[label]})")
        await server.stop(0)
        await bare.stop(0)
        store.close()
    return results
