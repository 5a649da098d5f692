"""Restarting the control-plane process keeps every workflow and desired state. An
interactive stop stops the workers too (the next `up` starts them again); a killed control
plane leaves them running and the next one re-adopts them. No orphan processes either way."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from tests.embedded_plane import worker_processes
from tests.factories import spec
from tests.integration.conftest import ServerProcess, wait_until, watch_until


class Servers:
    """The `syncplane up` processes a test starts on one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.started: list[ServerProcess] = []

    async def up(self, *extra: str) -> tuple[ServerProcess, grpc.aio.Channel, svc_grpc.WorkflowServiceStub]:
        """Start one (``extra``: its command-line options), wait until it listens; with a client of it."""
        server = ServerProcess(self.data_dir, *extra)
        self.started.append(server)
        await server.ready()
        return server, *server.stub()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    for s in started.started:
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


async def keep_one_running_one_stopped(stub: svc_grpc.WorkflowServiceStub) -> None:
    await _create_and_start(stub, "keep-running", start=True)
    await _create_and_start(stub, "keep-stopped", start=False)


async def kept(stub: svc_grpc.WorkflowServiceStub) -> tuple[pb.Workflow, pb.Workflow]:
    """The two workflows of keep_one_running_one_stopped(), as the server has them now."""
    return (await stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/keep-running")),
            await stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/keep-stopped")))


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
async def test_interactive_stop_stops_the_workers_and_the_next_up_resumes_them(tmp_path: Path, servers, how):
    """Ctrl-C (or SIGTERM) on `syncplane up` drains and stops its workers before it exits; the
    desired states are kept, so the next `up` starts the running workflow's workers again."""
    first, channel, stub = await servers.up()
    await keep_one_running_one_stopped(stub)
    # A client following a watch when the stop comes: its stream is ended by the shutdown.
    watch = stub.WatchWorkflows(svc.WatchWorkflowsRequest())
    await watch.read()
    before = {p.pid for p in worker_processes(tmp_path)}
    assert len(before) == 1

    first.stop(how)
    watch.cancel()
    await channel.close()
    assert first.proc.returncode == 0, "graceful"
    assert worker_processes(tmp_path) == [], "the workers stop with an interactive stop"
    log = (tmp_path / "server.log").read_text()
    assert "workers stopped" in log and " ERROR " not in log, log

    second, channel, stub = await servers.up()
    try:
        running, stopped = await kept(stub)
        assert running.spec.desired_state == pb.DESIRED_STATE_RUNNING
        assert stopped.spec.desired_state == pb.DESIRED_STATE_STOPPED and stopped.status.phase == pb.PHASE_STOPPED
        running, _ = await watch_until(stub, "workflows/keep-running",
                                       lambda w: w.status.phase == pb.PHASE_RUNNING and w.status.ready_workers == 1, 0)
        pids = {p.pid for p in worker_processes(tmp_path)}
        assert len(pids) == 1 and not pids & before, "a new worker, started by the new control plane"
        wf = await stub.StopWorkflow(svc.StopWorkflowRequest(name="workflows/keep-running"))
        await watch_until(stub, wf.name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))
    finally:
        await channel.close()
    second.stop()


async def test_a_killed_control_plane_leaves_workers_that_the_next_up_adopts(tmp_path: Path, servers):
    first, channel, stub = await servers.up()
    await keep_one_running_one_stopped(stub)
    await channel.close()
    before = {p.pid for p in worker_processes(tmp_path)}
    assert len(before) == 1

    first.stop(signal.SIGKILL)
    assert first.proc.returncode == -signal.SIGKILL
    assert {p.pid for p in worker_processes(tmp_path)} == before, "workers outlive a killed control plane"

    second, channel, stub = await servers.up()
    try:
        running, stopped = await kept(stub)
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
    server, channel, stub = await servers.up("--orphan-timeout", "5")
    await _create_and_start(stub, "lonely", start=True)
    await channel.close()
    assert len(worker_processes(tmp_path)) == 1
    server.stop(signal.SIGKILL)
    await wait_until(lambda: not worker_processes(tmp_path), timeout=30, what="the orphaned worker to exit")
