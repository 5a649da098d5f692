"""The foundation's gRPC suite, run against the Kubernetes backend: the same
WorkflowService over Workflow custom resources in the real test cluster.

The tests are the integration tier's own functions, collected here with this
module's `cp` fixture. Those that need running workers are covered under the
operator (test_operator.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import field_mask_pb2

from syncplane.api.server import ServerSecurity, create_server
from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.api.v1 import workflow_service_pb2 as svc
from syncplane.api.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.runtime.kubernetes import kubernetes_store
from syncplane.service import WorkflowService
from tests.factories import spec
from tests.integration.test_api_errors import (  # noqa: F401  (collected here, on this backend)
    test_create_errors,
    test_create_is_idempotent_by_request_id,
    test_get_and_list_errors,
    test_list_pages_and_filters,
    test_reflection_lists_services,
    test_unauthenticated,
    test_update_errors,
    test_validate_only_stores_nothing,
    test_watch_errors_and_resume,
)
from tests.k8s.test_operator import AVAILABLE, LocalWorker

pytestmark = pytest.mark.k8s


@dataclass
class KubeControlPlane:
    stub: svc_grpc.WorkflowServiceStub
    port: int

    async def create(self, name: str, kind: str = "ingress", **overrides: object) -> pb.Workflow:
        wf = pb.Workflow(spec=spec(kind))
        for key, value in overrides.items():
            setattr(wf.spec, key, value)
        return await self.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id=name, workflow=wf))


async def _serve(cluster, namespace: str, monkeypatch, security: ServerSecurity | None = None
                 ) -> AsyncIterator[KubeControlPlane]:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    store = await kubernetes_store(namespace)
    server, port, _ = await create_server(WorkflowService(store), "127.0.0.1:0", security)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield KubeControlPlane(svc_grpc.WorkflowServiceStub(channel), port)
    finally:
        await channel.close()
        await server.stop(grace=1)
        await store.api_client.close()


@pytest.fixture
async def cp(k8s_cluster, workflow_crd, namespace, monkeypatch) -> AsyncIterator[KubeControlPlane]:
    async for plane in _serve(k8s_cluster, namespace, monkeypatch):
        yield plane


@pytest.fixture
async def authed_cp(k8s_cluster, workflow_crd, namespace, monkeypatch) -> AsyncIterator[KubeControlPlane]:
    async for plane in _serve(k8s_cluster, namespace, monkeypatch, ServerSecurity(token="s3cret-token")):
        yield plane


async def test_start_stop_patch_desired_state_with_preconditions(cp: KubeControlPlane, k8s_cluster, namespace):
    created = await cp.create("toggle")
    started = await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=created.name, etag=created.etag))
    assert started.spec.desired_state == pb.DESIRED_STATE_RUNNING and started.etag != created.etag
    cr = k8s_cluster.kubectl("get", "workflow", "toggle", "-n", namespace, "-o", "jsonpath={.spec.desiredState}")
    assert cr.stdout == "RUNNING"
    with pytest.raises(grpc.aio.AioRpcError) as exc:   # a double click
        await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=created.name, etag=created.etag))
    assert exc.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=created.name))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await cp.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=created.name))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    stopped = await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=created.name))
    assert stopped.spec.desired_state == pb.DESIRED_STATE_STOPPED
    await cp.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=created.name))
    gone = k8s_cluster.kubectl("get", "workflow", "toggle", "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


async def _watch_until(stub: svc_grpc.WorkflowServiceStub, name: str, predicate) -> pb.Workflow:
    call = stub.WatchWorkflows(svc.WatchWorkflowsRequest(name=name))
    try:
        async for event in call:
            if predicate(event.workflow):
                return event.workflow
    finally:
        call.cancel()
    raise AssertionError("watch ended")


async def test_lifecycle_through_the_api_with_the_operator(cp: KubeControlPlane, k8s_cluster, namespace, operator,
                                                           tmp_path):
    """Create, start, edit, stop and start again through gRPC only; the operator
    reconciles and a local worker plays the fake pod's container."""
    k8s_cluster.kubectl("create", "serviceaccount", "syncplane-worker", "-n", namespace)
    for secret in ("d365-sandbox", "acs-sandbox"):
        k8s_cluster.kubectl("create", "secret", "generic", secret, "-n", namespace, "--from-literal=clientId=x")
    created = await cp.create("api-life")
    name = created.name
    await cp.stub.StartWorkflow(svc.StartWorkflowRequest(name=name, expected_phase=pb.PHASE_STOPPED))
    await _watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STARTING)
    k8s_cluster.kubectl("wait", f"--for={AVAILABLE}", "deployment/api-life-worker", "-n", namespace,
                        "--timeout=90s")
    worker = LocalWorker(k8s_cluster, namespace, "api-life", tmp_path)
    try:
        running = await asyncio.wait_for(
            _watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_RUNNING), 90)
        assert running.status.applied_generation == worker.generation
        edit = pb.Workflow(name=name, etag=running.etag)
        edit.spec.batch_size = 77
        await cp.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(
            workflow=edit, update_mask=field_mask_pb2.FieldMask(paths=["spec.batch_size"])))
        drifted = await asyncio.wait_for(_watch_until(cp.stub, name, lambda w: w.status.drift.detected), 60)
        assert list(drifted.status.drift.changed_fields) == ["spec.batch_size"]
        await cp.stub.StopWorkflow(svc.StopWorkflowRequest(name=name))
        k8s_cluster.kubectl("wait", "--for=delete", f"pod/{worker.pod}", "-n", namespace, "--timeout=90s")
    finally:
        worker.stop()
    stopped = await asyncio.wait_for(_watch_until(cp.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED), 60)
    assert stopped.spec.desired_state == pb.DESIRED_STATE_STOPPED
