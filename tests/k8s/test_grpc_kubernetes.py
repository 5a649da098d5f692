"""The foundation's gRPC suite, run against the Kubernetes backend: the same
WorkflowService over Workflow custom resources in the real test cluster.

The tests are the integration tier's own functions, collected here with this
module's `cp` fixture. Those that need running workers are covered under the
operator (test_operator.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

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
