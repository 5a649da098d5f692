"""Issue 17 items 4 and 5 on the test cluster: traces and metrics over OTLP from the API server, the
operator and a worker pod.

`syncplane server --backend kubernetes` and `syncplane operator` run as processes, the worker pod's
container runs under the fake kubelet, all exporting to the OTLP receiver this test runs
(tests/otlp.py). The StartWorkflow call records its trace context in the Workflow's spec; the
operator carries it in the run's applied-spec snapshot (the ConfigMap the pod mounts), so the
worker's first pass joins that trace, down to its batches. Metrics arrive from all three processes,
and no exported attribute holds the sandbox's secrets or tokens."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.backends import eventually
from tests.integration.ingress_env import ingress_spec
from tests.k8s.kubelet import FakeKubelet
from tests.k8s.test_operator import operator_process
from tests.k8s.test_worker_data import create_secrets, kubectl
from tests.otlp import Received, Span, ancestors, assert_no_secret, by_id, export_env, receiver

__all__ = ["receiver"]   # the fixture, used by name
pytestmark = pytest.mark.k8s
TOKEN = "otlp-test-token"


@pytest.mark.timeout(600)
async def test_start_on_kubernetes_traces_to_the_workers_batches_and_every_process_exports_metrics(
        k8s_cluster: Any, workflow_crd: str, namespace: str, receiver: tuple[str, Received],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    endpoint, received = receiver
    for key, value in {**export_env(endpoint), "KUBECONFIG": str(k8s_cluster.kubeconfig)}.items():
        monkeypatch.setenv(key, value)   # the server, the operator and the kubelet's containers inherit it
    sb = await start_sandbox(seed=SeedSpec(contacts=120, seed=5))
    (tmp_path / "token").write_text(TOKEN)
    (tmp_path / "token").chmod(0o600)   # the server refuses a token file others can read
    port_file = tmp_path / "port"
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("server", "operator")}
    server = subprocess.Popen(  # noqa: ASYNC220 (started once; the test then talks to it over gRPC)
        [sys.executable, "-m", "syncplane", "server", "--backend", "kubernetes", "--namespace", namespace,
         "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--no-console", "--auth", "token",
         "--token-file", str(tmp_path / "token"), "--log-level", "WARNING"],
        stdout=logs["server"], stderr=subprocess.STDOUT)
    operator = operator_process(namespace, logs["operator"])
    try:
        await create_secrets(k8s_cluster, namespace, sb)

        async def bound() -> bool:
            return port_file.exists() and port_file.read_text().strip() != ""

        await eventually(bound, "the server's port file", 60)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers"), \
                grpc.aio.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as channel:
            stub = svc_grpc.WorkflowServiceStub(channel)
            created = await stub.CreateWorkflow(svc.CreateWorkflowRequest(
                workflow_id="traced", workflow=pb.Workflow(spec=ingress_spec(sb, batch_size=50))), metadata=auth)

            async def stopped() -> bool:
                wf = await stub.GetWorkflow(svc.GetWorkflowRequest(name=created.name), metadata=auth)
                return bool(wf.status.phase == pb.PHASE_STOPPED)

            await eventually(stopped, "the operator's first status", 90)
            await stub.StartWorkflow(svc.StartWorkflowRequest(name=created.name), metadata=auth)

            def start_span() -> Span | None:
                return next((s for s in received.spans if s.span.name.endswith("/StartWorkflow")), None)

            def chain_of(batch: Span) -> list[str]:
                return [s.span.name for s in ancestors(batch, by_id(received.spans))]

            def first_batch() -> Span | None:
                start = start_span()
                return None if start is None else next(
                    (s for s in received.spans if s.span.trace_id == start.span.trace_id and s.span.name == "batch"
                     and chain_of(s)[-2:] == ["pass", start.span.name]), None)

            async def traced() -> bool:
                return first_batch() is not None

            await eventually(traced, lambda: f"a trace from StartWorkflow to a worker batch; spans: "
                             f"{sorted({(s.service, s.span.name) for s in received.spans})} (logs in {tmp_path})",
                             240, 0.5)
            start, batch = start_span(), first_batch()
            assert start is not None and batch is not None
            assert start.service == "syncplane-server" and batch.service == "syncplane-worker"
            first_pass = ancestors(batch, by_id(received.spans))[-2]
            assert first_pass.attributes["workflow"] == "traced" and first_pass.attributes["pass"] == "1"

            # The trace context travelled in the run's applied-spec snapshot, the ConfigMap the pod mounts.
            deployment = json.loads(await kubectl(k8s_cluster, "get", "deployment", "traced-worker", "-n",
                                                  namespace, "-o", "json"))
            snapshot = deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
            cm = json.loads(await kubectl(k8s_cluster, "get", "configmap", snapshot, "-n", namespace, "-o", "json"))
            assert json.loads(cm["data"]["spec.json"])["traceParent"].split("-")[1] == start.span.trace_id.hex()

        async def measured() -> bool:
            got = received.metrics
            return ("syncplane.records.written" in got.get("syncplane-worker", set())
                    and "rpc.server.call.duration" in got.get("syncplane-server", set())
                    and {"syncplane.operator.reconciles", "syncplane.operator.reconcile.duration"}
                    <= got.get("syncplane-operator", set()))

        await eventually(measured, lambda: f"metrics from the worker, the server and the operator: "
                                           f"{received.metrics}", 60)
        reconciles = [s for s in received.spans if s.service == "syncplane-operator" and s.span.name == "reconcile"]
        assert reconciles and all(s.attributes["workflow"] == "traced" for s in reconciles)

        secrets = {v for data in sb.secrets().values() for k, v in data.items() if "secret" in k.lower() and v}
        tokens = set(sb.d365_tokens._tokens) | set(sb.acs_tokens._tokens)
        assert secrets and tokens
        assert_no_secret(received, secrets | tokens | {TOKEN, "eyJzYnguZDM2NSJ9.", "eyJzYnguYWNzIn0."})
    finally:
        for proc in (server, operator):
            proc.terminate()
        for proc in (server, operator):
            await asyncio.to_thread(proc.wait, 60)
        for log in logs.values():
            log.close()
        await sb.stop()
