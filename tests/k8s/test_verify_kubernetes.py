"""`syncplane verify` on the Kubernetes backend: the gRPC server (in-process, KubernetesStore) records
the request on the Workflow, the operator (KopfRunner) creates the verify Job, the fake kubelet runs the
Job's container (`syncplane verify-job`, with the Secrets mounted as the workers') as a local process
against the sandbox over real HTTP, and the server answers with what the Job wrote.

The destination is tampered with through the sandbox's own API; verify must count exactly that, and
--repair must queue it (in the workflow's repair shards, ConfigMaps) for the workers' next pass, which puts it right."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from syncplane.api.server import create_server
from syncplane.contract.names import REPAIR, record_shard
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.runtime.kubernetes import kubernetes_store, kubernetes_verifier
from syncplane.service import WorkflowService
from syncplane.verify.kube import result_configmap_name
from syncplane_sandbox import Sandbox, SeedSpec
from tests.backends import eventually
from tests.integration.ingress_env import actual_profiles, diff, expected_profiles, profiles_match
from tests.integration.sandbox_fixtures import running_sandbox
from tests.integration.verify_env import counts, tamper_profiles
from tests.k8s.kubelet import FakeKubelet
from tests.k8s.syncplane_fixtures import SECRET_VALUE
from tests.k8s.test_worker_data import apply_workflow, create_secrets, kubectl, records, set_desired, workflow

pytestmark = pytest.mark.k8s
CONTACTS = 400
POLL = 0.5
RPC_DEADLINE = 240.0   # seconds: a verify on this loaded machine (Job, pod, process start) takes well under


async def phase(cluster: Any, namespace: str, name: str, want: str) -> None:
    async def reached() -> bool:
        return ((await workflow(cluster, namespace, name)).get("status") or {}).get("phase") == want

    await eventually(reached, f"workflow {name} {want}", 180, POLL)


async def verify(stub: svc_grpc.WorkflowServiceStub, name: str, *, repair: bool = False,
                 samples: int = 100) -> svc.VerifyWorkflowResponse:
    return await stub.VerifyWorkflow(svc.VerifyWorkflowRequest(name=f"workflows/{name}", sample_size=samples,
                                                               repair=repair), timeout=RPC_DEADLINE)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with running_sandbox(SeedSpec(contacts=CONTACTS, seed=31)) as sb:
        yield sb


@pytest.fixture
async def stub(k8s_cluster, namespace, monkeypatch) -> AsyncIterator[svc_grpc.WorkflowServiceStub]:
    """The server as `syncplane server --backend kubernetes` wires it (runtime/kubernetes.py)."""
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    store = await kubernetes_store(namespace)
    server, port, _ = await create_server(WorkflowService(store), "127.0.0.1:0", verifier=kubernetes_verifier(store))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield svc_grpc.WorkflowServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=1)
        await store.api_client.close()


@pytest.mark.timeout(900)
async def test_verify_on_kubernetes_counts_the_tampering_and_repair_converges(
        k8s_cluster, namespace, operator, sandbox, stub, tmp_path: Path) -> None:
    sb = sandbox
    await create_secrets(k8s_cluster, namespace, sb)
    name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "10-contacts-ingress.yaml", workers=1)
    containers = tmp_path / "containers"
    async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), containers):
        # 1. a first load; verified while the workers run
        await set_desired(k8s_cluster, namespace, name, "RUNNING")
        expected = expected_profiles(sb)
        await eventually(lambda: _true(profiles_match(sb)), lambda: "the first load: "
                         + diff(expected, actual_profiles(sb)), 300, POLL)
        resp = await verify(stub, name)
        assert counts(resp) == {"contact": (0, 0, 0)}, resp
        assert resp.streams[0].counts.compared == CONTACTS and resp.result.requests > 0

        # 2. tamper with the destination: 3 deleted, 4 edited, 2 written as the integration for no contact
        deleted_keys, extra_keys, edited_keys = await tamper_profiles(sb)

        # while the workers run: the destination's changes are not theirs to make, so none is in flight
        # (each checkpoint's commit time is kept beside it; with none, all nine would be)
        last: list[svc.VerifyWorkflowResponse] = []

        async def settled() -> bool:
            last[:] = [await verify(stub, name)]
            return counts(last[0]) == {"contact": (3, 2, 4)} and last[0].result.counts.in_flight == 0

        await eventually(settled, lambda: f"3 missing, 2 extra, 4 different, none in flight: {last}", 120, POLL)

        await set_desired(k8s_cluster, namespace, name, "STOPPED")
        await phase(k8s_cluster, namespace, name, "STOPPED")
        resp = await verify(stub, name)
        assert counts(resp) == {"contact": (3, 2, 4)}, resp
        contact = resp.streams[0]
        assert (list(contact.missing_keys), list(contact.extra_keys), list(contact.different_keys)) == \
            (deleted_keys, extra_keys, edited_keys)
        # the summary is kept as status.lastVerify, as embedded
        got = await stub.GetWorkflow(svc.GetWorkflowRequest(name=f"workflows/{name}"))
        c = got.status.last_verify.counts
        assert (c.missing, c.extra, c.different) == (3, 2, 4) and got.status.last_verify.HasField("verify_time")

        # 3. --repair queues the differences in the repair shards; the workers' next pass writes them
        resp = await verify(stub, name, repair=True)
        assert [(s.stream, s.queued) for s in resp.streams] == [("contact", 9)], resp
        repairs = f"syncplane.io/workflow={name},syncplane.io/record=repair"
        queued = await records(k8s_cluster, namespace, repairs)
        assert sorted(doc["key"] for _, doc in queued) == sorted(deleted_keys + extra_keys + edited_keys), queued
        for shard, doc in queued:   # each in the shard its name says, which goes with the Workflow
            assert shard["metadata"]["name"] == record_shard(name, REPAIR, doc["stream"], doc["key"])[0]
            assert shard["metadata"]["ownerReferences"][0]["kind"] == "Workflow"
        await set_desired(k8s_cluster, namespace, name, "RUNNING")
        await eventually(lambda: _true(actual_profiles(sb) == expected), lambda: "the repair: "
                         + diff(expected, actual_profiles(sb)), 300, POLL)

        async def drained() -> bool:
            return not await records(k8s_cluster, namespace, repairs)

        await eventually(drained, "the workers removed the repairs they sent", 120, POLL)
        await set_desired(k8s_cluster, namespace, name, "STOPPED")
        await phase(k8s_cluster, namespace, name, "STOPPED")
        resp = await verify(stub, name)
        assert counts(resp) == {"contact": (0, 0, 0)}, resp

        # no secret in what the Jobs wrote, nor in the Workflow
        result = await kubectl(k8s_cluster, "get", "configmap", result_configmap_name(name), "-n", namespace,
                               "-o", "json")
        wf = json.dumps(await workflow(k8s_cluster, namespace, name))
        for text in (result, wf, *(p.read_text(errors="replace") for p in containers.glob("*verify*.log"))):
            assert SECRET_VALUE not in text
        jobs = json.loads(await kubectl(k8s_cluster, "get", "jobs", "-n", namespace, "-o", "json"))["items"]
        assert len(jobs) >= 5 and all(j["metadata"]["ownerReferences"][0]["name"] == name for j in jobs)


@pytest.mark.timeout(600)
async def test_a_verify_that_cannot_run_answers_why(k8s_cluster, namespace, operator, sandbox, stub,
                                                    tmp_path: Path) -> None:
    """A Secret the workflow references is missing: FAILED_PRECONDITION with the credentials' reason, at
    once (not at the deadline); and with no kubelet to run the Job, UNAVAILABLE before the deadline."""
    sb = sandbox
    name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "10-contacts-ingress.yaml", workers=1)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.VerifyWorkflow(svc.VerifyWorkflowRequest(name=f"workflows/{name}"), timeout=6)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
    assert "wrote no result" in str(raised.value.details()) and "kubectl describe job" in str(raised.value.details())
    async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await verify(stub, name)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION, raised.value
    assert "d365-sandbox" in str(raised.value.details()) or "acs-sandbox" in str(raised.value.details()), \
        raised.value.details()
    assert SECRET_VALUE not in str(raised.value.details())


async def _true(value: bool) -> bool:
    return value
