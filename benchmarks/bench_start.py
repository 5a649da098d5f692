"""Start -> RUNNING in embedded mode, over 20 starts, with real worker processes.

Baseline: spawning the same worker command line and waiting for its first
/status answer, with no control plane involved: the ratio shows what the
control plane adds on top of a Python process start."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from syncplane.api.server import create_server
from syncplane.contract.names import state_file
from syncplane.credentials import write_local_secret
from syncplane.model.convert import spec_to_dict
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.runtime.supervisor import Supervisor, SupervisorConfig
from syncplane.service import WorkflowService
from syncplane.store.sqlite import SqliteStore
from tests.factories import UNREACHABLE_SECRETS, spec

STARTS = 20


def summary(samples: list[float]) -> dict[str, float]:
    """``{"median_s", "p95_s"}`` of ``samples`` (seconds; at least two)."""
    q = statistics.quantiles(samples, n=20)
    return {"median_s": statistics.median(samples), "p95_s": q[18]}


async def bare_spawn(tmp: Path) -> float:
    """Seconds from spawning a bare ``syncplane worker`` (no control plane; state in ``tmp``) until its
    /status says ready."""
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec_to_dict(spec())))
    t0 = time.perf_counter()
    # The baseline measures a plain process start; Popen returns at once.
    cmd = [sys.executable, "-m", "syncplane", "worker", "--workflow", "bare", "--generation", "1",
           "--spec-file", str(spec_file), "--state-dir", str(tmp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    path = state_file(tmp, "bare", 0)
    async with httpx.AsyncClient() as http:
        while True:
            try:
                port = json.loads(path.read_text())["port"]
                if (await http.get(f"http://127.0.0.1:{port}/status")).json()["ready"]:
                    break
            except (OSError, ValueError, KeyError, httpx.HTTPError):
                await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    proc.terminate()
    proc.wait()
    return elapsed


async def run() -> dict[str, Any]:
    """STARTS times Start -> RUNNING through the API server and supervisor, and STARTS bare worker
    spawns: ``{"syncplane": summary(), "bare_spawn": summary(), "ratio_median"}`` (seconds)."""
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        # Secrets the workers can load (nothing listens at the token URL: the engine retries,
        # the worker is ready): Start → RUNNING measures the control plane, not a vendor.
        for name, data in UNREACHABLE_SECRETS.items():
            write_local_secret(tmp / "secrets", name, data)
        store = SqliteStore(tmp / "bench.db")
        supervisor = Supervisor(store, tmp / "run", SupervisorConfig(tick=0.5))
        service = WorkflowService(store, on_change=supervisor.wake)
        server, port, _ = await create_server(service, "127.0.0.1:0")
        supervisor.start()
        ours: list[float] = []
        bare: list[float] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = svc_grpc.WorkflowServiceStub(ch)
            wf = await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="bench",
                                                                     workflow=pb.Workflow(spec=spec())))
            for _ in range(STARTS):
                bare.append(await bare_spawn(tmp))
                t0 = time.perf_counter()
                started = await stub.StartWorkflow(svc.StartWorkflowRequest(name=wf.name))
                async for ev in stub.WatchWorkflows(svc.WatchWorkflowsRequest(start_revision=int(started.etag),
                                                                              name=wf.name)):
                    if ev.workflow.status.phase == pb.PHASE_RUNNING:
                        break
                ours.append(time.perf_counter() - t0)
                stopped = await stub.StopWorkflow(svc.StopWorkflowRequest(name=wf.name))
                async for ev in stub.WatchWorkflows(svc.WatchWorkflowsRequest(start_revision=int(stopped.etag),
                                                                              name=wf.name)):
                    if ev.workflow.status.phase == pb.PHASE_STOPPED:
                        break
        await server.stop(0)
        await supervisor.close(stop_workers=True)
        store.close()
    o, b = summary(ours), summary(bare)
    print(f"Start->RUNNING ({STARTS}x)  syncplane median {o['median_s']:.3f} s p95 {o['p95_s']:.3f} s"
          f" | bare worker spawn median {b['median_s']:.3f} s p95 {b['p95_s']:.3f} s"
          f" | ratio {o['median_s'] / b['median_s']:.2f}")
    return {"syncplane": o, "bare_spawn": b, "ratio_median": o["median_s"] / b["median_s"]}
