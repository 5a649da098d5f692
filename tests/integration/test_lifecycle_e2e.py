"""Create, start, edit while running, stop, start again, delete: through Watch, with real
workers; and no ERROR logged on the way.

Shared by both backends (tests/backends.py): collected here with the embedded
control plane (worker processes under the supervisor), and by
tests/k8s/test_grpc_kubernetes.py with the Kubernetes one (the operator, worker
pods whose containers a fake kubelet runs). Watches resume from `revision()`,
never from an etag (the etags differ by backend)."""

from __future__ import annotations

import logging

import grpc
import httpx
import pytest
from google.protobuf import field_mask_pb2

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.runtime.processes import read_port
from tests.backends import ApiPlane, error_lines, eventually, revision
from tests.embedded_plane import ControlPlane
from tests.integration.conftest import watch_until

TIMEOUT = 90.0   # a start on Kubernetes: a rollout of fake pods, then the workers' first heartbeats


async def generations(cp: ApiPlane, workflow_id: str) -> list[int]:
    return sorted(int(r["generation"]) for r in await cp.worker_reports(workflow_id))


async def test_full_lifecycle(cp: ApiPlane, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    name = "workflows/life"
    created = await cp.create("life")
    assert created.status.phase == pb.PHASE_STOPPED and created.spec.desired_state == pb.DESIRED_STATE_STOPPED

    # 1. start: STARTING -> RUNNING
    rev = await revision(cp.stub, name)
    started = await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name))
    wf, phases = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, rev, TIMEOUT)
    assert phases[-2:] == [pb.PHASE_STARTING, pb.PHASE_RUNNING]
    first_generation = wf.status.applied_generation
    assert first_generation == started.generation
    assert await generations(cp, "life") == [first_generation]

    # 2. edit while running: drift with field paths; the worker keeps the old generation
    rev = await revision(cp.stub, name)
    edit = pb.Workflow(name=name)
    edit.spec.batch_size = 250
    edit.spec.poll_interval.seconds = 30
    updated = await cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=edit, update_mask=field_mask_pb2.FieldMask(paths=["spec.batch_size", "spec.poll_interval"])))
    assert updated.generation == wf.generation + 1
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.drift.detected, rev, TIMEOUT)
    assert list(wf.status.drift.changed_fields) == ["spec.batch_size", "spec.poll_interval"]
    assert wf.status.phase == pb.PHASE_RUNNING
    assert wf.status.applied_generation == first_generation
    assert await generations(cp, "life") == [first_generation]
    conditions = {c.type: c.status for c in wf.status.conditions}
    assert conditions["SpecDrift"] == "True"

    # 3. stop: STOPPING -> STOPPED, no worker left
    rev = await revision(cp.stub, name)
    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
    wf, phases = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, rev, TIMEOUT)
    assert phases[-2:] == [pb.PHASE_STOPPING, pb.PHASE_STOPPED]
    assert await cp.worker_count("life") == 0

    # 4. start again: drift clears, the worker runs the new generation
    rev = await revision(cp.stub, name)
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name, expected_phase=pb.PHASE_STOPPED))
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, rev, TIMEOUT)
    assert not wf.status.drift.detected
    assert wf.status.applied_generation > first_generation
    assert await generations(cp, "life") == [wf.status.applied_generation]

    # 5. delete while running (forced): the workers drain first, then the workflow is gone
    await cp.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=name, force=True))

    async def gone() -> bool:
        try:
            await cp.stub.GetWorkflow(svc.GetWorkflowRequest(name=name))
        except grpc.aio.AioRpcError as err:
            return err.code() == grpc.StatusCode.NOT_FOUND and await cp.worker_count("life") == 0
        return False

    await eventually(gone, "the deleted workflow and its workers to be gone", TIMEOUT)

    # Normal use logs no ERROR: the server and the controller (the supervisor, or the operator
    # under KopfRunner) log in this process; the workers, which drained twice (the stop, the
    # delete), log to files: the data directory's embedded, each container's on Kubernetes.
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    logs = cp.worker_logs()
    assert logs, "no worker log found"
    assert not errors + error_lines(logs), errors + error_lines(logs)


async def test_restart_applies_latest_spec(cp: ApiPlane):
    name = "workflows/re"
    await cp.create("re", workers=2)
    rev = await revision(cp.stub, name)
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name))
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, rev, TIMEOUT)
    assert wf.status.ready_workers == 2
    assert await cp.worker_count("re") == 2
    edit = pb.Workflow(name=name)
    edit.spec.workers = 1
    await cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=edit, update_mask=field_mask_pb2.FieldMask(paths=["spec.workers"])))
    rev = await revision(cp.stub, name)
    await cp.stub.RestartWorkflow(svc.RestartWorkflowRequest(name=name, expected_phase=pb.PHASE_RUNNING))
    wf, phases = await watch_until(
        cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING and w.status.desired_workers == 1, rev, TIMEOUT)
    assert pb.PHASE_STOPPING in phases and pb.PHASE_STARTING in phases
    assert not wf.status.drift.detected

    async def one_worker() -> bool:
        return await cp.worker_count("re") == 1

    await eventually(one_worker, "one worker after restart")
    rev = await revision(cp.stub, name)
    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, rev, TIMEOUT)


@pytest.mark.backends("embedded")
async def test_worker_endpoints(cp: ControlPlane):
    """Embedded only: dials each worker's HTTP port, found through the supervisor's state files
    (on Kubernetes nothing dials a pod; the same report travels in the heartbeat Lease)."""
    name = "workflows/probe"
    created = await cp.create("probe", kind="egress")
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name))
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, int(created.etag))
    port = read_port(cp.supervisor.groups["probe"].procs[0], cp.supervisor.state_dir)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        assert (await http.get("/healthz")).text == "ok"
        status = (await http.get("/status")).json()
        assert status["ready"] is True and status["generation"] == wf.status.applied_generation
        assert {"backlog", "counters", "records_per_second", "last_error"} <= status.keys()
        metrics = (await http.get("/metrics")).text
        assert 'syncplane_backlog{worker="0",workflow="probe"} 0.0' in metrics
        assert "# TYPE syncplane_records_written_total counter" in metrics
    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))
