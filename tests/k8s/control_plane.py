"""The gRPC control plane on the Kubernetes backend, as the shared gRPC suite uses it.

`syncplane server --backend kubernetes` in-process on a loopback port, over the
Workflow custom resources of one test namespace; the operator (a fixture) reconciles
them; `FakeKubelet` runs the worker pods' containers as local processes. With the
ServiceAccount and Secrets the chart and the user would have created (the Secrets'
token URL is unreachable: workers start and their connectors retry, as embedded)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from syncplane.api.server import ServerSecurity, create_server
from syncplane.contract.names import REPORT_ANNOTATION, WORKFLOW_LABEL
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.runtime.kubernetes import kubernetes_store
from syncplane.service import WorkflowService
from tests.backends import ConnectedPlane
from tests.factories import UNREACHABLE_SECRETS, literals
from tests.k8s.kubelet import FakeKubelet


@dataclass
class KubeControlPlane(ConnectedPlane):
    namespace: str
    kubelet: FakeKubelet

    async def worker_count(self, workflow_id: str) -> int:
        """Live (not deleting) worker pods of the workflow."""
        pods = await self.kubelet.pods(f"{WORKFLOW_LABEL}={workflow_id}")
        return sum(1 for p in pods if p.metadata.deletion_timestamp is None)

    async def worker_reports(self, workflow_id: str) -> list[dict[str, Any]]:
        """The report each worker publishes in its heartbeat Lease (the JSON of the embedded /status)."""
        leases = await self.kubelet.leases(f"{WORKFLOW_LABEL}={workflow_id}")
        return [json.loads(lease.metadata.annotations[REPORT_ANNOTATION]) for lease in leases]

    def worker_logs(self) -> list[Path]:
        """Each worker container's output (its log), written by the fake kubelet, stopped ones included."""
        return sorted(self.kubelet.workdir.glob("*.log"))


def prepare_namespace(cluster: Any, namespace: str) -> None:
    """What the user creates: the referenced Secrets (the operator makes each workflow's ServiceAccount)."""
    for secret in ("d365-sandbox", "acs-sandbox"):
        cluster.kubectl("create", "secret", "generic", secret, "-n", namespace, *literals(UNREACHABLE_SECRETS[secret]))


async def serve_kubernetes(cluster: Any, namespace: str, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                           security: ServerSecurity | None = None) -> AsyncIterator[KubeControlPlane]:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    prepare_namespace(cluster, namespace)
    store = await kubernetes_store(namespace)
    server, port, _ = await create_server(WorkflowService(store), "127.0.0.1:0", security)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        async with FakeKubelet(namespace, Path(cluster.kubeconfig), workdir / "containers") as kubelet:
            yield KubeControlPlane(svc_grpc.WorkflowServiceStub(channel), channel, port, namespace, kubelet)
    finally:
        await channel.close()
        await server.stop(grace=1)
        await store.api_client.close()
