"""Restarting the control-plane process keeps every workflow and phase,
re-adopts live workers, and leaves no orphan processes."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.api.v1 import workflow_service_pb2 as svc
from syncplane.api.v1 import workflow_service_pb2_grpc as svc_grpc
from tests.factories import spec
from tests.integration.conftest import ServerProcess, wait_until, watch_until, worker_processes


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for s in started:
        s.stop(signal.SIGKILL)
    leftovers = worker_processes(tmp_path)
    for p in leftovers:
        p.kill()
    assert not leftovers, "orphan worker processes"


async def _create_and_start(stub: svc_grpc.WorkflowServiceStub, name: str, start: bool) -> pb.Workflow:
    wf = await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id=name, workflow=pb.Workflow(spec=spec())))
    if not start:
        return wf
    await stub.StartWorkflow(svc.StartWorkflowRequest(name=wf.name))
    running, _ = await watch_until(stub, wf.name, lambda w: w.status.phase == pb.PHASE_RUNNING, int(wf.etag))
    return running


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
async def test_restart_keeps_phases_and_adopts_workers(tmp_path: Path, servers, how):
    first = ServerProcess(tmp_path)
    servers.append(first)
    await first.ready()
    channel, stub = first.stub()
    await _create_and_start(stub, "keep-running", start=True)
    await _create_and_start(stub, "keep-stopped", start=False)
    await channel.close()
    before = {p.pid for p in worker_processes(tmp_path)}
    assert len(before) == 1

    first.stop(how)
    assert first.proc.returncode == (0 if how == signal.SIGTERM else -signal.SIGKILL), "graceful on SIGTERM"
    assert {p.pid for p in worker_processes(tmp_path)} == before, "workers outlive the control plane"

    second = ServerProcess(tmp_path)
    servers.append(second)
    await second.ready()
    channel, stub = second.stub()
    try:
        running = await stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/keep-running"))
        stopped = await stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/keep-stopped"))
        assert running.status.phase == pb.PHASE_RUNNING
        assert stopped.status.phase == pb.PHASE_STOPPED
        # Once a new workflow runs, the new supervisor has reconciled every workflow.
        await _create_and_start(stub, "probe", start=True)
        pids = {p.pid for p in worker_processes(tmp_path)}
        assert before < pids and len(pids) == 2, "the old worker is adopted, not duplicated"
        # ready_workers follows the supervisor's polls of the adopted worker's /status
        running, phases = await watch_until(stub, "workflows/keep-running", lambda w: w.status.ready_workers == 1,
                                            0)   # 0: the current state first, then its changes
        assert running.status.phase == pb.PHASE_RUNNING and set(phases) == {pb.PHASE_RUNNING}

        for name in ("workflows/keep-running", "workflows/probe"):
            wf = await stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
            await watch_until(stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))
        assert worker_processes(tmp_path) == []
    finally:
        await channel.close()
    second.stop()


async def test_workers_stop_themselves_when_no_control_plane_returns(tmp_path: Path, servers):
    server = ServerProcess(tmp_path, "--orphan-timeout", "5")
    servers.append(server)
    await server.ready()
    channel, stub = server.stub()
    await _create_and_start(stub, "lonely", start=True)
    await channel.close()
    assert len(worker_processes(tmp_path)) == 1
    server.stop(signal.SIGKILL)
    await wait_until(lambda: not worker_processes(tmp_path), timeout=30, what="the orphaned worker to exit")
