"""AIP-134: every mutating RPC returns the resource as it is after its effect.

Each mutating call's response is compared with a GetWorkflow made right after it: the same
resource, status included (phase, drift, observed generation, conditions), except what the
workers change on their own in between (backlog, counters, ready workers, and the phase moving
on because workers became ready or finished draining).

Shared by both backends (tests/backends.py); the k8s tier collects it in
tests/k8s/test_grpc_kubernetes.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from google.protobuf import field_mask_pb2

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.backends import ApiPlane
from tests.integration.conftest import watch_until

# The phase a workflow may reach on its own after the response: workers became ready, or drained.
MOVES_ON = {pb.PHASE_STARTING: {pb.PHASE_RUNNING}, pb.PHASE_STOPPING: {pb.PHASE_STOPPED, pb.PHASE_STARTING}}
# What a mutation decides in status (the rest, backlog, counters, ready workers, times and
# condition messages, is the workers' doing and may change between the two reads).
DECIDED = ("observed_generation", "applied_generation", "applied_restart_nonce", "applied_spec_hash", "drift",
           "desired_workers")


def comparable(wf: pb.Workflow) -> pb.Workflow:
    """The resource (metadata, spec) with the part of its status the mutation decides."""
    out = pb.Workflow()
    out.CopyFrom(wf)
    out.ClearField("update_time")
    out.ClearField("status")
    for name in DECIDED:
        field = pb.WorkflowStatus.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None:
            getattr(out.status, name).CopyFrom(getattr(wf.status, name))
        else:
            setattr(out.status, name, getattr(wf.status, name))
    return out


def drift_condition(wf: pb.Workflow) -> tuple[str, str]:
    cond = next((c for c in wf.status.conditions if c.type == "SpecDrift"), None)
    return (cond.status, cond.reason) if cond else ("", "")


async def assert_response_is_current(cp: ApiPlane, what: str,
                                     call: Callable[[], Awaitable[pb.Workflow]]) -> pb.Workflow:
    response = await call()
    got = await cp.stub.GetWorkflow(svc.GetWorkflowRequest(name=response.name))
    assert response.status.observed_generation == response.generation, f"{what}: the generation is not observed yet"
    assert comparable(response) == comparable(got), f"{what}:\nresponse {response}\nget {got}"
    assert drift_condition(response) == drift_condition(got), what
    if response.status.phase != got.status.phase:
        assert got.status.phase in MOVES_ON.get(response.status.phase, set()), (
            f"{what}: {pb.Phase.Name(response.status.phase)} then {pb.Phase.Name(got.status.phase)}")
    return response


async def test_each_mutating_rpc_returns_what_a_get_returns(cp: ApiPlane):
    created = await assert_response_is_current(cp, "CreateWorkflow", lambda: cp.create("aip134"))
    assert created.status.phase == pb.PHASE_STOPPED
    name = created.name

    def update(paths: list[str], mutate: Callable[[pb.Workflow], None]) -> Callable[[], Awaitable[pb.Workflow]]:
        async def call() -> pb.Workflow:
            wf = pb.Workflow()
            wf.CopyFrom(await cp.stub.GetWorkflow(svc.GetWorkflowRequest(name=name)))
            mutate(wf)
            return await cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
                workflow=wf, update_mask=field_mask_pb2.FieldMask(paths=paths)))
        return call

    def edit_batch_size(size: int) -> Callable[[pb.Workflow], None]:
        def mutate(wf: pb.Workflow) -> None:
            wf.spec.batch_size = size
        return mutate

    await assert_response_is_current(cp, "UpdateWorkflow (stopped)", update(["spec.batch_size"], edit_batch_size(7)))
    await assert_response_is_current(cp, "UpdateWorkflow (labels)",
                                     update(["labels"], lambda wf: wf.labels.update({"team": "crm"})))
    started = await assert_response_is_current(
        cp, "StartWorkflow", lambda: cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name)))
    assert started.status.phase in (pb.PHASE_STARTING, pb.PHASE_RUNNING)
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING, 0, timeout=120)
    # The fault seen: an edit of a running workflow answered without its drift.
    edited = await assert_response_is_current(cp, "UpdateWorkflow (running)",
                                              update(["spec.batch_size"], edit_batch_size(9)))
    assert edited.status.drift.detected and "spec.batch_size" in edited.status.drift.changed_fields, edited.status
    restarted = await assert_response_is_current(
        cp, "RestartWorkflow", lambda: cp.stub.RestartWorkflow(svc.RestartWorkflowRequest(name=name)))
    assert restarted.status.phase in (pb.PHASE_STOPPING, pb.PHASE_STARTING, pb.PHASE_RUNNING)
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING and not w.status.drift.detected,
                      0, timeout=120)
    stopped = await assert_response_is_current(
        cp, "StopWorkflow", lambda: cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name)))
    assert stopped.status.phase in (pb.PHASE_STOPPING, pb.PHASE_STOPPED)
    await watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, 0, timeout=120)
