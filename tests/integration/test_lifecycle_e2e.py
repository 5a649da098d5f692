"""Create, start, edit while running, stop, start again: through Watch, with real workers."""

from __future__ import annotations

import httpx
from google.protobuf import field_mask_pb2

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.api.v1 import workflow_service_pb2 as svc
from syncplane.runtime.processes import read_port
from tests.integration.conftest import ControlPlane, wait_until, watch_until, worker_processes


def worker_status(cp: ControlPlane, workflow_id: str) -> dict:
    proc = cp.supervisor.groups[workflow_id].procs[0]
    port = read_port(proc, cp.supervisor.state_dir)
    assert port is not None
    return httpx.get(f"http://127.0.0.1:{port}/status").json()


async def test_full_lifecycle(cp: ControlPlane):
    name = "workflows/life"
    created = await cp.create("life")
    assert created.status.phase == pb.PHASE_STOPPED and created.spec.desired_state == pb.DESIRED_STATE_STOPPED

    # 1. start: STARTING -> RUNNING
    started = await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name))
    wf, phases = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING,
                                   int(created.etag))
    assert phases[-2:] == [pb.PHASE_STARTING, pb.PHASE_RUNNING]
    first_generation = wf.status.applied_generation
    assert first_generation == started.generation
    assert worker_status(cp, "life")["generation"] == first_generation

    # 2. edit while running: drift with field paths; the worker keeps the old generation
    edit = pb.Workflow(name=name)
    edit.spec.batch_size = 250
    edit.spec.poll_interval.seconds = 30
    updated = await cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=edit, update_mask=field_mask_pb2.FieldMask(paths=["spec.batch_size", "spec.poll_interval"])))
    assert updated.generation == wf.generation + 1
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.drift.detected, int(wf.etag))
    assert list(wf.status.drift.changed_fields) == ["spec.batch_size", "spec.poll_interval"]
    assert wf.status.phase == pb.PHASE_RUNNING
    assert wf.status.applied_generation == first_generation
    assert worker_status(cp, "life")["generation"] == first_generation
    conditions = {c.type: c.status for c in wf.status.conditions}
    assert conditions["SpecDrift"] == "True"

    # 3. stop: STOPPING -> STOPPED, no worker left
    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
    wf, phases = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))
    assert phases[-2:] == [pb.PHASE_STOPPING, pb.PHASE_STOPPED]
    assert worker_processes(cp.data_dir) == []

    # 4. start again: drift clears, the worker runs the new generation
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name, expected_phase=pb.PHASE_STOPPED))
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, int(wf.etag))
    assert not wf.status.drift.detected
    assert wf.status.applied_generation > first_generation
    status = worker_status(cp, "life")
    assert status["generation"] == wf.status.applied_generation

    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))


async def test_restart_applies_latest_spec(cp: ControlPlane):
    name = "workflows/re"
    created = await cp.create("re", workers=2)
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name))
    wf, _ = await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, int(created.etag))
    assert wf.status.ready_workers == 2
    assert len(worker_processes(cp.data_dir)) == 2
    edit = pb.Workflow(name=name)
    edit.spec.workers = 1
    await cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=edit, update_mask=field_mask_pb2.FieldMask(paths=["spec.workers"])))
    await cp.stub.RestartWorkflow(svc.RestartWorkflowRequest(name=name, expected_phase=pb.PHASE_RUNNING))
    wf, phases = await watch_until(
        cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING and w.status.desired_workers == 1,
        int(wf.etag))
    assert pb.PHASE_STOPPING in phases and pb.PHASE_STARTING in phases
    assert not wf.status.drift.detected
    await wait_until(lambda: len(worker_processes(cp.data_dir)) == 1, what="one worker after restart")
    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))


async def test_worker_endpoints(cp: ControlPlane):
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
        assert 'syncplane_worker_backlog{workflow="probe",worker="0"} 0' in metrics
        assert "# TYPE syncplane_worker_records_written_total counter" in metrics
    await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, int(wf.etag))
