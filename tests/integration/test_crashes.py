"""kill -9 on a worker: automatic restart; repeated crashes: ERROR; Stop from ERROR: STOPPED.

Embedded only: kills worker processes found in the process table and reads the local
supervisor's crash accounting (on Kubernetes, crash loops are the kubelet's restarts,
covered by tests/k8s/test_operator.py)."""

from __future__ import annotations

import os
import signal

import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.embedded_plane import ControlPlane, worker_processes
from tests.integration.conftest import wait_until, watch_until

pytestmark = pytest.mark.backends("embedded")


def pids(cp: ControlPlane) -> set[int]:
    return {p.pid for p in worker_processes(cp.data_dir)}


async def test_crash_restarts_then_crash_loop_is_error(cp: ControlPlane):
    name = "workflows/crashy"
    created = await cp.create("crashy")
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name))
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, int(created.etag))
    (first,) = pids(cp)

    # One crash: the supervisor restarts the worker; the workflow stays RUNNING.
    os.kill(first, signal.SIGKILL)
    await wait_until(lambda: len(pids(cp) - {first}) == 1, what="a restarted worker")
    wf, phases = await watch_until(
        cp.stub, name, lambda w: w.status.ready_workers == 1 and w.status.phase == pb.PHASE_RUNNING
        and any(c.type == "Degraded" and c.status == "False" for c in w.status.conditions), int(wf.etag))
    assert pb.PHASE_ERROR not in phases

    # Crash it again and again (crash_limit=3 within the window): ERROR with a reason.
    killed = {first}
    while True:
        current = pids(cp) - killed
        wf = await cp.stub.GetWorkflow(svc.GetWorkflowRequest(name=name))
        if wf.status.phase == pb.PHASE_ERROR:
            break
        if current:
            pid = current.pop()
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        await wait_until(lambda: bool(pids(cp) - killed) or
                         cp.supervisor.groups["crashy"].failure is not None, what="restart or crash loop")
        if cp.supervisor.groups["crashy"].failure is not None:
            wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_ERROR, int(wf.etag))
            break
    assert wf.status.last_error.reason == "CRASH_LOOP"
    assert "exited unexpectedly 3 times" in wf.status.last_error.message
    degraded = {c.type: c for c in wf.status.conditions}["Degraded"]
    assert degraded.status == "True" and degraded.reason == "CRASH_LOOP"
    await wait_until(lambda: not pids(cp), what="no workers in ERROR")

    # Stop from ERROR gives STOPPED; Start from ERROR would restart.
    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name, expected_phase=pb.PHASE_ERROR))
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))
    assert wf.spec.desired_state == pb.DESIRED_STATE_STOPPED


async def test_start_from_error_restarts(cp: ControlPlane):
    name = "workflows/again"
    created = await cp.create("again")
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name))
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, int(created.etag))
    killed: set[int] = set()
    while cp.supervisor.groups["again"].failure is None:
        live = pids(cp) - killed
        for pid in live:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        await wait_until(lambda: bool(pids(cp) - killed) or cp.supervisor.groups["again"].failure is not None,
                         what="restart or crash loop")
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_ERROR, int(wf.etag))
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name, expected_phase=pb.PHASE_ERROR))
    wf, phases = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, int(wf.etag))
    assert pb.PHASE_STARTING in phases
    assert not wf.status.last_error.reason
    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))
