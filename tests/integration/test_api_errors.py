"""Every RPC's error codes, with rich details; idempotent create; reflection.

Shared by both backends (tests/backends.py): collected here with the embedded
control plane, and by tests/k8s/test_grpc_kubernetes.py with the Kubernetes one."""

from __future__ import annotations

import asyncio
from typing import TypeVar

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.backends import ApiPlane as ControlPlane
from tests.backends import eventually
from tests.factories import spec
from tests.integration.conftest import watch_until

NAME = "workflows/errs"
Detail = TypeVar("Detail", bound=Message)


async def expect(call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    assert exc.value.code() == code, exc.value.details()
    return exc.value


def rpc_detail(err: grpc.aio.AioRpcError, kind: type[Detail]) -> Detail:
    """The error's first google.rpc.Status detail of type ``kind``; AssertionError when it has none."""
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found = kind()
            detail.Unpack(found)
            return found
    raise AssertionError(f"no {kind.DESCRIPTOR.name} detail")


def field_paths(err: grpc.aio.AioRpcError) -> list[str]:
    return [v.field for v in rpc_detail(err, error_details_pb2.BadRequest).field_violations]


def error_info(err: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    return rpc_detail(err, error_details_pb2.ErrorInfo)


IA, NF, AE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS
FP, AB = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED


async def test_create_errors(cp: ControlPlane):
    bad = pb.Workflow(spec=spec())
    bad.spec.batch_size = 5000
    bad.spec.ingress.entities[0].fields[2].destination = "email"
    err = await expect(cp.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="ok", workflow=bad)), IA)
    assert field_paths(err) == ["spec.batch_size", "spec.ingress.entities[0].fields[1].destination",
                                "spec.ingress.entities[0].fields[2].destination"]
    assert error_info(err).domain == "syncplane.io"
    err = await expect(cp.stub.CreateWorkflow(svc.CreateWorkflowRequest(
        workflow_id="Not_A_Label", workflow=pb.Workflow(spec=spec()))), IA)
    assert field_paths(err) == ["workflow_id"]
    await cp.create("errs")
    err = await expect(cp.create("errs"), AE)
    assert error_info(err).reason == "ALREADY_EXISTS"


async def test_create_is_idempotent_by_request_id(cp: ControlPlane):
    req = svc.CreateWorkflowRequest(workflow_id="idem", workflow=pb.Workflow(spec=spec()), request_id="req-1")
    first = await cp.stub.CreateWorkflow(req)
    second = await cp.stub.CreateWorkflow(req)
    assert first.uid == second.uid and first.create_time == second.create_time
    listed = await cp.stub.ListWorkflows(svc.ListWorkflowsRequest())
    assert [w.name for w in listed.workflows] == ["workflows/idem"]


async def test_validate_only_stores_nothing(cp: ControlPlane):
    await cp.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="dry", workflow=pb.Workflow(spec=spec()),
                                                           validate_only=True))
    await expect(cp.stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/dry")), NF)


async def test_get_and_list_errors(cp: ControlPlane):
    err = await expect(cp.stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/UPPER")), IA)
    assert field_paths(err) == ["name"]
    await expect(cp.stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/missing")), NF)
    err = await expect(cp.stub.ListWorkflows(svc.ListWorkflowsRequest(page_token="garbage!")), IA)
    assert field_paths(err) == ["page_token"]
    err = await expect(cp.stub.ListWorkflows(svc.ListWorkflowsRequest(page_size=-1)), IA)
    assert field_paths(err) == ["page_size"]


async def test_list_pages_and_filters(cp: ControlPlane):
    for i in range(5):
        await cp.create(f"in-{i}")
    await cp.create("out-0", kind="egress")
    seen: list[str] = []
    token = ""
    while True:
        resp = await cp.stub.ListWorkflows(svc.ListWorkflowsRequest(page_size=2, page_token=token))
        seen.extend(w.name for w in resp.workflows)
        token = resp.next_page_token
        if not token:
            break
    assert seen == [f"workflows/in-{i}" for i in range(5)] + ["workflows/out-0"]
    egress = await cp.stub.ListWorkflows(svc.ListWorkflowsRequest(types=[pb.WORKFLOW_TYPE_EGRESS]))
    assert [w.name for w in egress.workflows] == ["workflows/out-0"]
    running = await cp.stub.ListWorkflows(svc.ListWorkflowsRequest(phases=[pb.PHASE_RUNNING]))
    assert not running.workflows
    page = await cp.stub.ListWorkflows(svc.ListWorkflowsRequest(page_size=1))
    err = await expect(cp.stub.ListWorkflows(svc.ListWorkflowsRequest(
        page_size=1, page_token=page.next_page_token, types=[pb.WORKFLOW_TYPE_INGRESS])), IA)
    assert "different filter" in err.details()


async def test_update_errors(cp: ControlPlane):
    created = await cp.create("errs")
    mask = field_mask_pb2.FieldMask
    edit = pb.Workflow(name=NAME, etag=created.etag)
    edit.spec.desired_state = pb.DESIRED_STATE_RUNNING
    err = await expect(cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=edit, update_mask=mask(paths=["spec.desired_state"]))), IA)
    assert field_paths(err) == ["update_mask.paths[0]"]
    edit = pb.Workflow(name=NAME)
    edit.spec.workers = 99
    err = await expect(cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=edit, update_mask=mask(paths=["spec.workers"]))), IA)
    assert field_paths(err) == ["spec.workers"]
    await expect(cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=pb.Workflow(name="workflows/nope"), update_mask=mask(paths=["labels"]))), NF)
    edit = pb.Workflow(name=NAME, etag="12345", labels={"team": "crm"})
    err = await expect(cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=edit, update_mask=mask(paths=["labels"]))), AB)
    assert error_info(err).reason == "ETAG_MISMATCH"
    # A whole-spec update never changes the lifecycle.
    whole = pb.Workflow(name=NAME, etag=created.etag, spec=spec())
    whole.spec.desired_state = pb.DESIRED_STATE_RUNNING
    whole.spec.batch_size = 10
    updated = await cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=whole))
    assert updated.spec.desired_state == pb.DESIRED_STATE_STOPPED and updated.spec.batch_size == 10


async def test_lifecycle_errors(cp: ControlPlane):
    created = await cp.create("errs")
    for method, req in (("StartWorkflow", svc.StartWorkflowRequest), ("StopWorkflow", svc.StopWorkflowRequest),
                        ("RestartWorkflow", svc.RestartWorkflowRequest)):
        rpc = getattr(cp.stub, method)
        assert field_paths(await expect(rpc(req(name="workflows/Bad!")), IA)) == ["name"]
        await expect(rpc(req(name="workflows/missing")), NF)
        err = await expect(rpc(req(name=NAME, etag="0")), AB)
        assert error_info(err).reason == "ETAG_MISMATCH"
    err = await expect(cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=NAME)), FP)
    assert "STOPPED" in err.details() and error_info(err).metadata["phase"] == "STOPPED"
    await expect(cp.stub.RestartWorkflow(svc.RestartWorkflowRequest(name=NAME)), FP)
    err = await expect(cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=NAME,
                                                                      expected_phase=pb.PHASE_RUNNING)), FP)
    assert error_info(err).reason == "PHASE_MISMATCH"

    # A double click: the second Start with the same etag is refused, not applied twice.
    started = await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=NAME, etag=created.etag))
    await expect(cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=NAME, etag=created.etag)), AB)
    err = await expect(cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=NAME)), FP)
    assert error_info(err).reason == "TRANSITION_NOT_ALLOWED"

    # Delete is refused while workers run, unless forced.
    assert started.spec.desired_state == pb.DESIRED_STATE_RUNNING
    await watch_until(cp.stub, NAME, lambda w: w.status.phase == pb.PHASE_RUNNING, 0, timeout=90)
    await expect(cp.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name="workflows/missing")), NF)
    await expect(cp.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name="x_y")), IA)
    await expect(cp.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=NAME, etag="1")), AB)
    err = await expect(cp.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=NAME)), FP)
    assert error_info(err).reason == "WORKERS_RUNNING"
    await cp.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=NAME, force=True))
    # Gone once its workers drained (at once embedded; on Kubernetes the finalizer waits for the pods).
    async def gone() -> bool:
        try:
            await cp.stub.GetWorkflow(svc.GetWorkflowRequest(name=NAME))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == NF, exc.details()
            return True
        return False

    await eventually(gone, "the deleted workflow to be gone", timeout=90)


async def test_watch_errors_and_resume(cp: ControlPlane):
    err = await expect(cp.stub.WatchWorkflows(svc.WatchWorkflowsRequest(start_revision=-1)).read(), IA)
    assert field_paths(err) == ["start_revision"]
    a = await cp.create("a")
    snapshot = cp.stub.WatchWorkflows(svc.WatchWorkflowsRequest())
    first = await snapshot.read()
    snapshot.cancel()
    assert (first.type, first.workflow.name) == (svc.CHANGE_TYPE_ADDED, a.name)
    b = await cp.create("b")
    # Resuming after the snapshot's revision replays what came after it, in order.
    call = cp.stub.WatchWorkflows(svc.WatchWorkflowsRequest(start_revision=first.revision))
    events: list[svc.WatchWorkflowsResponse] = []
    while not events or events[-1].workflow.name != b.name:
        events.append(await call.read())
    call.cancel()
    assert all(e.revision > first.revision for e in events)
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    assert events[-1].type == svc.CHANGE_TYPE_ADDED and events[-1].workflow.uid == b.uid
    assert all(e.type == svc.CHANGE_TYPE_MODIFIED for e in events[:-1])


async def test_unauthenticated(authed_cp: ControlPlane):
    stub = authed_cp.stub
    UA = grpc.StatusCode.UNAUTHENTICATED
    calls = [
        stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="x", workflow=pb.Workflow(spec=spec()))),
        stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/x")),
        stub.ListWorkflows(svc.ListWorkflowsRequest()),
        stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=pb.Workflow(name="workflows/x"))),
        stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name="workflows/x")),
        stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/x")),
        stub.StopWorkflow(svc.StopWorkflowRequest(name="workflows/x")),
        stub.RestartWorkflow(svc.RestartWorkflowRequest(name="workflows/x")),
        stub.WatchWorkflows(svc.WatchWorkflowsRequest()).read(),
    ]
    for call in calls:
        await expect(call, UA)
    await expect(stub.ListWorkflows(svc.ListWorkflowsRequest(), metadata=[("authorization", "Bearer wrong")]), UA)
    ok = await stub.ListWorkflows(svc.ListWorkflowsRequest(), metadata=[("authorization", "Bearer s3cret-token")])
    assert list(ok.workflows) == []


async def test_reflection_lists_services(cp: ControlPlane):
    def reflect() -> tuple[set[str], str]:
        # A generic client that knows nothing but the reflection protocol.
        channel = grpc.insecure_channel(f"127.0.0.1:{cp.port}")
        try:
            db = ProtoReflectionDescriptorDatabase(channel)
            return set(db.get_services()), db.FindFileContainingSymbol("syncplane.v1.WorkflowService").package
        finally:
            channel.close()

    services, package = await asyncio.to_thread(reflect)
    assert {"syncplane.v1.WorkflowService", "grpc.health.v1.Health"} <= services
    assert package == "syncplane.v1"
