"""The Helm chart against the real test cluster.

- every ci/ scenario passes `kubectl apply --dry-run=server`, installs with `helm install --wait`, its
  operator and server Deployments become Available (KWOK's fake pods), the CRD is there, and
  `helm uninstall` leaves none of the chart's resources behind (the CRD stays);
- the full lifecycle runs with the operator, the API server and a worker each logged in with a token of the
  chart's ServiceAccount for it (so under exactly the chart's RBAC), started with the arguments and
  environment of the chart's Deployments; every API call they make is recorded, and every verb the chart
  grants must have been used (RBAC sufficient and minimal);
- two operators with the chart's leader election: only one acts, the other takes over when it dies.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import yaml
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

from syncplane.client import ClientConfig
from syncplane.client import channel as client_channel
from syncplane.contract.names import (
    KEEP_SPEC_SNAPSHOTS,
    checkpoint_configmap_name,
    worker_configmap_names,
    worker_labels,
    worker_service_account_name,
)
from syncplane.model.convert import from_resource
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane_sandbox import Sandbox, SeedSpec, start_sandbox
from tests.chart_tools import check
from tests.factories import literals
from tests.k8s.test_children_converge import may, tamper_children
from tests.k8s.test_operator import AVAILABLE, LocalWorker, get, wait
from tests.processes import stop_process

pytestmark = pytest.mark.k8s
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "syncplane"
DEFAULTS = ROOT / "server" / "syncplane" / "defaults"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
CONTACTS = 300   # three pages at batchSize 100




def release_name() -> str:
    return f"sp{uuid.uuid4().hex[:6]}"


def make_tls_secrets(cluster: Any, namespace: str, tmp: Path) -> None:
    """What a user of ci/tls-values.yaml creates before installing."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "1", "-subj", "/CN=syncplane-server", "-keyout", str(tmp / "tls.key"),
                    "-out", str(tmp / "tls.crt")], check=True, capture_output=True)
    cluster.kubectl("create", "secret", "tls", "syncplane-tls", "-n", namespace, f"--cert={tmp / 'tls.crt'}",
                    f"--key={tmp / 'tls.key'}")
    cluster.kubectl("create", "secret", "generic", "syncplane-token", "-n", namespace,
                    "--from-literal=token=a-token-for-the-test")


def install(cluster: Any, release: str, namespace: str, *args: str) -> None:
    cluster.helm("install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "180s", *args,
                 timeout=240)


def leftovers(cluster: Any, release: str, namespace: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={release}"
    kinds = "deployments,replicasets,pods,services,serviceaccounts,roles,rolebindings,secrets,configmaps," \
            "poddisruptionbudgets"
    names = cluster.kubectl("get", kinds, "-n", namespace, "-l", selector, "-o", "name").stdout.split()
    names += cluster.kubectl("get", "clusterroles,clusterrolebindings,validatingadmissionpolicies,"
                             "validatingadmissionpolicybindings", "-l", selector, "-o", "name").stdout.split()
    return names


@pytest.mark.timeout(900)   # the first k8s test also pays for the session cluster
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_install_and_uninstall(k8s_cluster, namespace, tmp_path, scenario):
    release = release_name()
    values = yaml.safe_load(scenario.read_text()) or {}
    # The rendered manifest is accepted by the API server as is.
    docs = check.render(check.helm_binary(), "-f", str(scenario), release=release, namespace=namespace)
    dry = k8s_cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(docs), check=False)
    assert dry.returncode == 0, dry.stderr
    if values.get("server", {}).get("tls", {}).get("existingSecret"):
        make_tls_secrets(k8s_cluster, namespace, tmp_path)
    install(k8s_cluster, release, namespace, "-f", str(scenario))

    k8s_cluster.wait_established("workflows.syncplane.io")
    deployments = json.loads(k8s_cluster.kubectl("get", "deployments", "-n", namespace, "-l",
                                                 f"app.kubernetes.io/instance={release}", "-o", "json").stdout)
    names = sorted(d["metadata"]["name"] for d in deployments["items"])
    server_enabled = values.get("server", {}).get("enabled", True)
    assert names == sorted([f"{release}-syncplane-operator"] + ([f"{release}-syncplane-server"] if server_enabled
                                                                 else []))
    for deployment in deployments["items"]:
        replicas = deployment["spec"]["replicas"]
        assert replicas >= 1
        wait(k8s_cluster, namespace, f"deployment/{deployment['metadata']['name']}",
             f"jsonpath={{.status.availableReplicas}}={replicas}")
    cluster_roles = k8s_cluster.kubectl("get", "clusterroles", "-l", f"app.kubernetes.io/instance={release}",
                                        "-o", "name").stdout.split()
    # the users' view/edit rights on Workflows, aggregated into the built-in roles (userRoles.aggregate, on by
    # default), plus the operator's own ClusterRole only when it is cluster-wide
    expected_roles = [f"{release}-syncplane-operator"] if values.get("clusterWide") else []
    if values.get("userRoles", {}).get("aggregate", True):
        expected_roles += [f"{release}-syncplane-workflows-edit", f"{release}-syncplane-workflows-view"]
    assert sorted(cluster_roles) == sorted(f"clusterrole.rbac.authorization.k8s.io/{r}" for r in expected_roles)
    # the three policies (each workflow's workers keep to their own objects; the operator deletes only spec
    # snapshots and writes only each workflow's own worker identity), each with its binding (rbac.create)
    policies = k8s_cluster.kubectl("get", "validatingadmissionpolicies,validatingadmissionpolicybindings", "-l",
                                   f"app.kubernetes.io/instance={release}", "-o", "name").stdout.split()
    kinds = sorted(p.split("/")[0].split(".")[0] for p in policies)
    assert kinds == (["validatingadmissionpolicy"] * 3 + ["validatingadmissionpolicybinding"] * 3
                     if values.get("rbac", {}).get("create", True) else []), policies
    assert leftovers(k8s_cluster, release, namespace)

    k8s_cluster.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", timeout=180)
    k8s_cluster.wait_until("every chart resource gone", lambda: leftovers(k8s_cluster, release, namespace) == [])
    assert k8s_cluster.kubectl("get", "crd", "workflows.syncplane.io", check=False).returncode == 0


# ------------------------------------------------------------------ running under the chart's RBAC


def token_kubeconfig(cluster: Any, namespace: str, account: str, path: Path,
                     proxy: RecordingProxy | None = None, pod: str = "") -> Path:
    """A kubeconfig that logs in as the ServiceAccount (a bound token from the TokenRequest API),
    optionally through a recording proxy; with ``pod``, bound to that Pod as the kubelet's tokens are
    (the API server then names the pod in the caller's user info)."""
    bound = ["--bound-object-kind=Pod", f"--bound-object-name={pod}"] if pod else []
    token = cluster.kubectl("create", "token", account, "-n", namespace, "--duration=2h", *bound).stdout.strip()
    admin = json.loads(cluster.kubeconfig.read_text())
    clusters = admin["clusters"]
    if proxy is not None:
        clusters = [{"name": clusters[0]["name"], "cluster": {"server": f"http://127.0.0.1:{proxy.port}"}}]
    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": clusters,
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": account, "context": {"cluster": admin["clusters"][0]["name"], "user": account}}],
        "current-context": account,
    }
    path.write_text(json.dumps(config))
    return path


class RecordingProxy:
    """A plain-HTTP loopback front of the API server that records every (group, resource, verb) a client
    uses, so the test sees what each component really calls under its ServiceAccount."""

    HOP = {"host", "content-length", "transfer-encoding", "connection", "accept-encoding", "content-encoding"}

    def __init__(self, upstream: str, ca_file: str) -> None:
        self.upstream, self.ca_file = upstream, ca_file
        self.calls: set[tuple[str, str, str]] = set()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "recording proxy did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        context = ssl.create_default_context(cafile=self.ca_file)
        self.session = ClientSession(connector=TCPConnector(ssl=context), timeout=ClientTimeout(total=None),
                                     auto_decompress=False)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._forward)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.calls.add(classify(request.method, request.path, request.query))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
        body = await request.read()  # none at all when empty: aiohttp would label b"" octet-stream (415)
        async with self.session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                        data=body or None) as upstream:
            response = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in self.HOP})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    def close(self) -> None:
        async def stop() -> None:
            await self.session.close()  # ends the watch streams still relayed, then the handlers
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class SandboxThread:
    """The sandbox emulators on an event loop of their own, for a synchronous test."""

    def __init__(self, contacts: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sandbox: Sandbox = asyncio.run_coroutine_threadsafe(
            start_sandbox(seed=SeedSpec(contacts=contacts, seed=7)), self.loop).result(60)

    def profiles(self) -> int:
        return len(self.sandbox.acs.profiles.rows)

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the sandbox's loop (its state is not thread-safe)."""
        async def call() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sandbox.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def classify(method: str, path: str, query: Any) -> tuple[str, str, str]:
    """An API request as (group, resource[/subresource], verb), as RBAC sees it."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return ("", path, method.lower())   # discovery and the like
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]
    resource = rest[0] if rest else ""
    named = len(rest) >= 2
    if len(rest) >= 3:
        resource += "/" + rest[2]
    if method == "GET":
        verb = "watch" if str(query.get("watch", "")).lower() in ("true", "1") else ("get" if named else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if named else "deletecollection"}[method]
    return (group, resource, verb)


def container_of(cluster: Any, namespace: str, deployment: str) -> dict[str, Any]:
    body = get(cluster, namespace, "deployment", deployment)
    container: dict[str, Any] = body["spec"]["template"]["spec"]["containers"][0]
    return container


def pod_env(container: dict[str, Any], pod_name: str, namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet would set it (the downward API fields it uses)."""
    fields = {"metadata.name": pod_name, "metadata.namespace": namespace}
    env = {}
    for item in container.get("env", []):
        env[item["name"]] = item["value"] if "value" in item else fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


class Process:
    """A local process playing a chart pod's container, with its log kept for the assertions."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "syncplane", *args], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


# What an RBAC refusal looks like in a client's log: the API server's Status says "... is forbidden: User ..."
# with reason Forbidden, and client libraries print the HTTP status as "(403)", "403 Forbidden" or "code": 403.
# A bare 403 is not enough: it also turns up inside resource versions, uids and timestamps of logged objects.
REFUSED = re.compile(r'forbidden|\(403\)|\b403 forbidden|"code":\s*403\b|status[ =:]+403\b', re.IGNORECASE)


def forbidden(text: str) -> list[str]:
    """Each RBAC refusal in a log, as the 300 characters around it (log lines can hold whole objects)."""
    return [text[max(0, m.start() - 150):m.end() + 150] for m in REFUSED.finditer(text)]


def local_env(kubeconfig: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "SYNCPLANE_"))}
    return {**env, **extra, "KUBECONFIG": str(kubeconfig)}


@pytest.fixture
def chart_release(k8s_cluster, namespace) -> Iterator[str]:
    """The namespaced scenario installed (two operator replicas, leader election), uninstalled afterwards."""
    release = release_name()
    install(k8s_cluster, release, namespace, "-f", str(CHART / "ci" / "namespaced-values.yaml"))
    yield release
    k8s_cluster.helm("uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", timeout=180)


def start_operator(cluster: Any, namespace: str, release: str, tmp: Path, pod: str,
                   proxy: RecordingProxy | None = None) -> Process:
    container = container_of(cluster, namespace, f"{release}-syncplane-operator")
    kubeconfig = token_kubeconfig(cluster, namespace, f"{release}-syncplane-operator", tmp / f"{pod}.kubeconfig",
                                  proxy)
    # the pod's fixed ports, on loopback port 0 here: several processes (and other tests) share this machine
    args = [a if not a.startswith("--liveness=") else "--liveness=http://127.0.0.1:0/healthz"
            for a in container["args"] if not a.startswith("--metrics-listen")]
    env = local_env(kubeconfig, {**pod_env(container, pod, namespace), "SYNCPLANE_OPERATOR_RESYNC": "2"})
    return Process(args, env, tmp / f"{pod}.log")


def phase(stub: Any, name: str) -> str:
    wf = stub.GetWorkflow(svc.GetWorkflowRequest(name=f"workflows/{name}"))
    return str(pb.Phase.Name(wf.status.phase))


@pytest.mark.timeout(900)
def test_lifecycle_under_the_charts_rbac(k8s_cluster, workflow_crd, namespace, chart_release, tmp_path):
    release = chart_release
    # Real records flow (from the sandbox), so the worker also commits its cursors to the checkpoints ConfigMap.
    sandbox = SandboxThread(CONTACTS)
    sb = sandbox.sandbox
    # what a user creates: the credentials Secrets
    for name, data in sb.secrets().items():
        k8s_cluster.kubectl("create", "secret", "generic", name, "-n", namespace, *literals(data))
    ca = json.loads(k8s_cluster.kubeconfig.read_text())["clusters"][0]["cluster"]["certificate-authority"]
    proxies = {who: RecordingProxy(k8s_cluster.server, ca) for who in ("operator", "server", "worker")}
    operator = start_operator(k8s_cluster, namespace, release, tmp_path, "operator-0", proxies["operator"])
    server_container = container_of(k8s_cluster, namespace, f"{release}-syncplane-server")
    server_kubeconfig = token_kubeconfig(k8s_cluster, namespace, f"{release}-syncplane-server",
                                         tmp_path / "server.kubeconfig", proxies["server"])
    # Loopback: no TLS or token needed; everything else as in the chart's Deployment.
    server_args = [a for a in server_container["args"]
                   if not a.startswith(("--listen", "--tls-", "--token-file", "--console-listen", "--metrics-listen"))]
    port_file = tmp_path / "port"
    server = Process([*server_args, "--listen=127.0.0.1:0", f"--port-file={port_file}", "--console-listen=127.0.0.1:0"],
                     local_env(server_kubeconfig, pod_env(server_container, "server-0", namespace)),
                     tmp_path / "server.log")
    workers: list[LocalWorker] = []
    channel = None
    try:
        k8s_cluster.wait_until("the server's port file", lambda: port_file.exists() and port_file.read_text() != "",
                               timeout=60)
        # The chart's server authenticates each caller's own token: a user bound to `edit` in the namespace
        # (the chart aggregates the workflow rights into it).
        k8s_cluster.kubectl("create", "serviceaccount", "a-user", "-n", namespace)
        k8s_cluster.kubectl("create", "rolebinding", "a-user-edit", "--clusterrole=edit",
                            f"--serviceaccount={namespace}:a-user", "-n", namespace)
        user_token = k8s_cluster.kubectl("create", "token", "a-user", "-n", namespace).stdout.strip()
        k8s_cluster.wait_until("edit to aggregate the workflow rights", lambda: k8s_cluster.kubectl(
            "auth", "can-i", "patch", "workflows.syncplane.io", "-n", namespace,
            f"--as=system:serviceaccount:{namespace}:a-user", check=False).stdout.strip() == "yes")
        channel = client_channel(ClientConfig(address=f"127.0.0.1:{port_file.read_text().strip()}",
                                              token=user_token))
        stub = svc_grpc.WorkflowServiceStub(channel)
        doc = yaml.safe_load((DEFAULTS / "10-contacts-ingress.yaml").read_text())
        doc["spec"]["source"]["endpoint"], doc["spec"]["destination"]["endpoint"] = sb.d365_url, sb.acs_url
        doc["spec"].update(batchSize=100, pollInterval="1s")
        poisoned = sandbox.run(lambda: sorted(sb.d365.table("contacts").rows)[0])
        sandbox.run(lambda: sb.acs.poison_keys("profile", poisoned))
        workflow_id, wf = from_resource(doc)
        stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id=workflow_id, workflow=wf))
        k8s_cluster.wait_until("STOPPED", lambda: phase(stub, workflow_id) == "PHASE_STOPPED")
        listed = stub.ListWorkflows(svc.ListWorkflowsRequest(page_size=10))
        assert [w.name for w in listed.workflows] == [f"workflows/{workflow_id}"]
        watch = stub.WatchWorkflows(svc.WatchWorkflowsRequest(start_revision=0), timeout=60)
        events = iter(watch)
        assert next(events).workflow.name == f"workflows/{workflow_id}"   # the initial listing

        # the workflow's worker ServiceAccount as an earlier release left it (labelled with its workflow since
        # a6232c8: the chart's admission policy lets the operator write only such an account), without the
        # workload identity the values now configure: the operator annotates it (issue 13 item 2)
        k8s_cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": worker_service_account_name(workflow_id), "labels": worker_labels(workflow_id)}}))
        # start: the operator creates the worker Deployment under the workflow's own ServiceAccount
        stub.StartWorkflow(svc.StartWorkflowRequest(name=f"workflows/{workflow_id}"))
        # then the live watch (status updates by the operator may come first)
        assert any(e.workflow.spec.desired_state == pb.DESIRED_STATE_RUNNING for e in events)
        watch.cancel()
        # `kubectl wait` fails at once on an object that does not exist yet: first, that the operator created it.
        k8s_cluster.wait_until("the operator to create the worker Deployment", lambda: k8s_cluster.kubectl(
            "get", "deployment", f"{workflow_id}-worker", "-n", namespace, check=False).returncode == 0)
        wait(k8s_cluster, namespace, f"deployment/{workflow_id}-worker", AVAILABLE)
        pod_spec = get(k8s_cluster, namespace, "deployment", f"{workflow_id}-worker")["spec"]["template"]["spec"]
        # the workflow's own ServiceAccount, created by the operator and bound to the chart's worker Role
        assert pod_spec["serviceAccountName"] == worker_service_account_name(workflow_id)
        values = yaml.safe_load((CHART / "ci" / "namespaced-values.yaml").read_text())["worker"]["serviceAccount"]
        account = get(k8s_cluster, namespace, "serviceaccount", worker_service_account_name(workflow_id))["metadata"]
        assert account["annotations"] == values["annotations"]
        assert account["labels"].items() >= values["labels"].items()
        # each worker logs in with a token bound to its pod (the admission policy then holds it to its own
        # pod's heartbeat Lease)
        as_worker = SimpleNamespace(kubectl=k8s_cluster.kubectl, kubeconfig_for=lambda pod: token_kubeconfig(
            k8s_cluster, namespace, worker_service_account_name(workflow_id), tmp_path / f"{pod}.kubeconfig",
            proxies["worker"], pod=pod))
        assert pod_spec["containers"][0]["image"] == container_of(
            k8s_cluster, namespace, f"{release}-syncplane-operator")["image"]
        workers.append(LocalWorker(as_worker, namespace, workflow_id, tmp_path))
        k8s_cluster.wait_until("RUNNING", lambda: phase(stub, workflow_id) == "PHASE_RUNNING", timeout=90)
        # the worker syncs every contact but the poisoned one, committing a cursor to the checkpoints
        # ConfigMap after each page; the poisoned one is a dead letter, in a shard ConfigMap
        k8s_cluster.wait_until(f"{CONTACTS - 1} profiles", lambda: sandbox.profiles() == CONTACTS - 1, timeout=120)
        parent = f"workflows/{workflow_id}"
        k8s_cluster.wait_until("the dead letter, listed by the server", lambda: [
            (d.key, d.http_status) for d in stub.ListDeadLetters(svc.ListDeadLettersRequest(parent=parent)).dead_letters
        ] == [(poisoned, 400)])
        (letter,) = json.loads(k8s_cluster.kubectl("get", "configmaps", "-n", namespace, "-l",
                                                   "syncplane.io/record=dead-letter", "-o", "json").stdout)["items"]
        uid = get(k8s_cluster, namespace, "workflow", workflow_id)["metadata"]["uid"]
        assert [o["uid"] for o in letter["metadata"]["ownerReferences"]] == [uid]
        k8s_cluster.wait_until("the dead-letter count in the status", lambda: stub.GetWorkflow(
            svc.GetWorkflowRequest(name=parent)).status.dead_letters == 1)
        checkpoints = checkpoint_configmap_name(workflow_id)

        def committed() -> bool:
            return k8s_cluster.kubectl("get", "configmap", checkpoints, "-n", namespace, "-o", "jsonpath={.data}",
                                       check=False).stdout.strip() not in ("", "{}")

        k8s_cluster.wait_until("a committed cursor", committed)
        # the ConfigMap (created by the operator on start) is deleted by hand while the worker runs:
        # the worker's next commit, after a new contact is written, creates it again
        k8s_cluster.kubectl("delete", "configmap", checkpoints, "-n", namespace)
        sandbox.run(lambda: sb.d365.table("contacts").upsert(
            firstname="New", lastname="Person", emailaddress1="new.person@example.com"))
        k8s_cluster.wait_until("the new profile", lambda: sandbox.profiles() == CONTACTS, timeout=60)
        k8s_cluster.wait_until("the checkpoints ConfigMap created again by the worker", committed)
        owners = get(k8s_cluster, namespace, "configmap", checkpoints)["metadata"].get("ownerReferences", [])
        assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [("Workflow", workflow_id, uid)], owners

        # the destination accepts the poisoned record now: a retry (the server marks the dead letter)
        # has the worker send it again and delete the dead letter
        sandbox.run(sb.acs.clear_poison)
        assert stub.RetryDeadLetters(svc.RetryDeadLettersRequest(parent=parent)).marked_count == 1
        k8s_cluster.wait_until("the retried profile", lambda: sandbox.profiles() == CONTACTS + 1, timeout=60)
        k8s_cluster.wait_until("no dead letters", lambda: not stub.ListDeadLetters(
            svc.ListDeadLettersRequest(parent=parent)).dead_letters, timeout=60)
        k8s_cluster.wait_until("a dead-letter count of 0 in the status", lambda: stub.GetWorkflow(
            svc.GetWorkflowRequest(name=parent)).status.dead_letters == 0)

        # edit while running: drift
        wf = stub.GetWorkflow(svc.GetWorkflowRequest(name=f"workflows/{workflow_id}"))
        wf.spec.batch_size = 250
        from google.protobuf import field_mask_pb2

        stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=wf, update_mask=field_mask_pb2.FieldMask(
            paths=["spec.batch_size"])))
        k8s_cluster.wait_until("drift", lambda: stub.GetWorkflow(
            svc.GetWorkflowRequest(name=f"workflows/{workflow_id}")).status.drift.detected)

        # stop: scaled to 0, the worker drains and removes its Lease
        stub.StopWorkflow(svc.StopWorkflowRequest(name=f"workflows/{workflow_id}"))
        wait(k8s_cluster, namespace, f"pod/{workers[0].pod}", "delete")
        workers[0].stop()
        k8s_cluster.wait_until("STOPPED", lambda: phase(stub, workflow_id) == "PHASE_STOPPED", timeout=90)

        # the workers' identity as an older operator or a hand edit left it, still labelled with its workflow (a Role
        # of fewer names, a RoleBinding to another Role, ...): the restart brings each back under the chart's grants
        # and admission policy (get, patch, delete of its own labelled identity only)
        tamper_children(k8s_cluster, namespace, workflow_id, keep_labels=True)
        # restart: a new snapshot (the updated Deployment), then delete
        stub.StartWorkflow(svc.StartWorkflowRequest(name=f"workflows/{workflow_id}"))
        wait(k8s_cluster, namespace, f"deployment/{workflow_id}-worker", AVAILABLE)
        for name in worker_configmap_names(workflow_id):
            assert may(k8s_cluster, namespace, workflow_id, "patch", f"configmap/{name}"), name
        assert get(k8s_cluster, namespace, "rolebinding", worker_service_account_name(workflow_id))["roleRef"][
            "name"] == f"{release}-syncplane-worker"
        workers.append(LocalWorker(as_worker, namespace, workflow_id, tmp_path))
        k8s_cluster.wait_until("RUNNING again", lambda: phase(stub, workflow_id) == "PHASE_RUNNING", timeout=90)
        assert workers[1].configmap != workers[0].configmap
        stub.StopWorkflow(svc.StopWorkflowRequest(name=f"workflows/{workflow_id}"))
        wait(k8s_cluster, namespace, f"pod/{workers[1].pod}", "delete")
        workers[1].stop()
        k8s_cluster.wait_until("STOPPED again", lambda: phase(stub, workflow_id) == "PHASE_STOPPED", timeout=90)

        # three more runs, the spec edited before each (no worker: each stops while STARTING): a snapshot each,
        # and the operator prunes the workflow's older ones, keeping the applied and newest KEEP_SPEC_SNAPSHOTS
        for size in (300, 350, 400):
            wf = stub.GetWorkflow(svc.GetWorkflowRequest(name=parent))
            wf.spec.batch_size = size
            stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=wf, update_mask=field_mask_pb2.FieldMask(
                paths=["spec.batch_size"])))
            stub.StartWorkflow(svc.StartWorkflowRequest(name=parent))
            k8s_cluster.wait_until(f"STARTING at batch size {size}", lambda: phase(stub, workflow_id) in (
                "PHASE_STARTING", "PHASE_RUNNING"), timeout=90)
            stub.StopWorkflow(svc.StopWorkflowRequest(name=parent))
            k8s_cluster.wait_until("STOPPED", lambda: phase(stub, workflow_id) == "PHASE_STOPPED", timeout=90)

        def snapshots() -> list[str]:
            return [cm["metadata"]["name"] for cm in json.loads(k8s_cluster.kubectl(
                "get", "configmaps", "-n", namespace, "-l", f"syncplane.io/workflow={workflow_id}", "-o", "json",
            ).stdout)["items"] if cm["metadata"]["name"].startswith(f"{workflow_id}-spec-")]

        k8s_cluster.wait_until("the older snapshots pruned", lambda: len(snapshots()) == KEEP_SPEC_SNAPSHOTS)

        # verify: the server records the request and watches for the answer, the operator creates the Job (run
        # as the worker identity). No kubelet runs that Job's pod here (the workers above run by hand), so the
        # call ends with the reason before its deadline; the whole verify is tests/k8s/test_verify_kubernetes.py.
        verifying = stub.VerifyWorkflow.future(svc.VerifyWorkflowRequest(name=parent), timeout=30)
        k8s_cluster.wait_until("the operator to create the verify Job", lambda: json.loads(k8s_cluster.kubectl(
            "get", "jobs", "-n", namespace, "-o", "json").stdout)["items"] != [], timeout=30)
        failed = verifying.exception()
        assert isinstance(failed, grpc.Call) and failed.code() == grpc.StatusCode.UNAVAILABLE, failed
        assert "kubectl describe job" in str(failed.details()), failed.details()
        stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=f"workflows/{workflow_id}"))
        wait(k8s_cluster, namespace, f"workflow/{workflow_id}", "delete")
        events = json.loads(k8s_cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                                                f"involvedObject.name={workflow_id}", "-o", "json").stdout)
        assert {"Starting", "Running", "Stopping", "Stopped"} <= {e["reason"] for e in events["items"]}
    finally:
        if channel is not None:
            channel.close()
        for worker in workers:
            worker.stop()
        server.stop()
        operator.stop()
        for proxy in proxies.values():
            proxy.close()
        sandbox.close()
    logs = {"operator": operator.output, "server": server.output,
            **{f"worker {w.pod}": (tmp_path / f"{w.pod}.log").read_text(errors="replace") for w in workers}}
    for who, text in logs.items():
        assert forbidden(text) == [], f"{who} was refused by RBAC: {forbidden(text)}"
    assert "holds Lease" in operator.output
    assert sb.client_secret not in "".join(logs.values())

    # Minimal: every verb the chart grants was used by the component it is granted to (removing it would
    # make that call fail).
    rendered = check.render(check.helm_binary(), "-f", str(CHART / "ci" / "namespaced-values.yaml"),
                            release=release, namespace=namespace)
    grants = check.granted(rendered, fullname=f"{release}-syncplane")
    # `bind` is no request of its own: the API server checks it on each RoleBinding the operator creates;
    # nor are the ConfigMap verbs the operator grants in each Workflow's own worker Role: the API server
    # checks that the operator holds them when it creates that Role (escalation prevention)
    binds = {("rbac.authorization.k8s.io", "roles", "bind")
             if call == ("rbac.authorization.k8s.io", "rolebindings", "create") else call
             for call in proxies["operator"].calls}
    if ("rbac.authorization.k8s.io", "roles", "create") in binds:
        binds |= {("", "configmaps", "get"), ("", "configmaps", "patch")}
    used = {"operator": proxies["operator"].calls | binds, "operator-leader-election": proxies["operator"].calls,
            "server": proxies["server"].calls, "worker": proxies["worker"].calls}
    unused = {role: sorted(rules - used[role]) for role, rules in grants.items()}
    assert unused == {role: [] for role in grants}, f"granted but never used: {unused}"


def lease_holder(cluster: Any, namespace: str, lease: str) -> str | None:
    res = cluster.kubectl("get", "lease", lease, "-n", namespace, "-o", "json", check=False)
    return json.loads(res.stdout)["spec"].get("holderIdentity", "") if res.returncode == 0 else None


@pytest.mark.timeout(900)
def test_two_operators_one_acts_and_the_other_takes_over(k8s_cluster, workflow_crd, namespace, chart_release,
                                                         tmp_path):
    release = chart_release
    lease = f"{release}-syncplane-operator-leader"
    first = start_operator(k8s_cluster, namespace, release, tmp_path, "operator-a")
    second = None
    try:
        k8s_cluster.wait_until("operator-a leading",
                               lambda: lease_holder(k8s_cluster, namespace, lease) == "operator-a")
        second = start_operator(k8s_cluster, namespace, release, tmp_path, "operator-b")
        k8s_cluster.wait_until("the second operator standing by", lambda: "standing by" in second.output)
        # only the leader acts: a new Workflow is handled (its status: STOPPED) by operator-a alone
        doc = yaml.safe_load((DEFAULTS / "10-contacts-ingress.yaml").read_text())
        k8s_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc))
        wait(k8s_cluster, namespace, "workflow/contacts-ingress", "jsonpath={.status.phase}=STOPPED")
        assert "contacts-ingress" in first.output and "contacts-ingress" not in second.output
        # the leader dies without releasing: the standby takes over once the Lease expires
        first.proc.kill()
        first.proc.wait()
        k8s_cluster.wait_until("operator-b taking over",
                               lambda: lease_holder(k8s_cluster, namespace, lease) == "operator-b")
        k8s_cluster.kubectl("patch", "workflow", "contacts-ingress", "-n", namespace, "--type", "merge",
                            "-p", json.dumps({"spec": {"desiredState": "RUNNING"}}))
        k8s_cluster.wait_until("operator-b creating the worker Deployment", lambda: k8s_cluster.kubectl(
            "get", "deployment", "contacts-ingress-worker", "-n", namespace, check=False).returncode == 0)
        wait(k8s_cluster, namespace, "deployment/contacts-ingress-worker", AVAILABLE)
        assert "contacts-ingress" in second.output
        k8s_cluster.kubectl("patch", "workflow", "contacts-ingress", "-n", namespace, "--type", "merge",
                            "-p", json.dumps({"spec": {"desiredState": "STOPPED"}}))
        wait(k8s_cluster, namespace, "deployment/contacts-ingress-worker", "jsonpath={.spec.replicas}=0")
        # a clean stop hands the Lease over at once
        second.stop()
        k8s_cluster.wait_until("the Lease released", lambda: lease_holder(k8s_cluster, namespace, lease) == "")
    finally:
        first.stop()
        if second is not None:
            second.stop()
    for proc in (first, second):
        assert proc is not None and forbidden(proc.output) == [], forbidden(proc.output)

