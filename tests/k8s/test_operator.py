"""The operator under KopfRunner against the real test cluster: the lifecycle
with workers running locally against the API server and heartbeating
through Leases, as the fake pods' containers would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from kopf.testing import KopfRunner

from syncplane.contract.names import (
    GENERATION_ANNOTATION,
    KEEP_SPEC_SNAPSHOTS,
    WORKFLOW_LABEL,
    checkpoint_configmap_name,
    spec_configmap_name,
)
from tests.factories import UNREACHABLE_SECRETS, literals
from tests.k8s.kubelet import map_mounts, project_secrets
from tests.k8s.syncplane_fixtures import SECRET_VALUE

pytestmark = pytest.mark.k8s
DEFAULTS = Path(__file__).resolve().parents[2] / "server" / "syncplane" / "defaults"
# Not condition=Available: a Deployment scaled to 0 is trivially Available.
AVAILABLE = "jsonpath={.status.availableReplicas}=1"


def get(cluster: Any, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json").stdout)


def wait(cluster: Any, namespace: str, target: str, condition: str, timeout: int = 90) -> None:
    res = cluster.kubectl("wait", f"--for={condition}", target, "-n", namespace, f"--timeout={timeout}s",
                          check=False)
    assert res.returncode == 0, f"{target} never met {condition}: {res.stderr}\n" + cluster.kubectl(
        "get", target, "-n", namespace, "-o", "yaml", check=False).stdout


def patch(cluster: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    cluster.kubectl("patch", "workflow", name, "-n", namespace, "--type", "merge", "-p", json.dumps({"spec": spec}))


def _secret_data(cluster: Any, namespace: str, name: str) -> dict[str, str] | None:
    res = cluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(res.stdout).get("data") or {} if res.returncode == 0 else None


class LocalWorker:
    """Plays the container of a fake pod: runs `syncplane worker` on this machine."""

    def __init__(self, cluster: Any, namespace: str, workflow: str, tmp: Path, admin: Any = None) -> None:
        admin = admin or cluster   # the kubelet's own access, for the Secret volumes
        deployment = get(cluster, namespace, "deployment", f"{workflow}-worker")
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        self.generation = int(annotations["syncplane.io/applied-generation"])
        volume = deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
        self.configmap = volume
        cm = get(cluster, namespace, "configmap", volume)
        spec_file = tmp / f"{volume}.json"
        spec_file.write_text(cm["data"]["spec.json"])
        pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", f"syncplane.io/workflow={workflow}",
                                          "-o", "json").stdout)["items"]
        spec_hash = annotations["syncplane.io/spec-hash"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")
                and p["metadata"].get("annotations", {}).get("syncplane.io/spec-hash") == spec_hash]
        assert live, f"no live pod runs spec {spec_hash}"
        self.pod = live[0]["metadata"]["name"]
        pod_tmp = tmp / f"{self.pod}-tmp"   # the pod's own /tmp (an emptyDir): local state is never shared
        pod_tmp.mkdir(exist_ok=True)
        # as the kubelet does: a token bound to the pod, when the cluster object can make one
        kubeconfig = cluster.kubeconfig_for(self.pod) if hasattr(cluster, "kubeconfig_for") else cluster.kubeconfig
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_UID": live[0]["metadata"]["uid"],
               "TMPDIR": str(pod_tmp)}
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        uid = args[args.index("--workflow-uid") + 1]  # what the operator passes on: the Workflow's uid
        # the kubelet mounts the referenced Secrets (it reads them as itself: here the test's admin)
        mounts = project_secrets(deployment["spec"]["template"]["spec"], lambda name: _secret_data(
            admin, namespace, name), tmp / f"{self.pod}-secrets")
        secrets_dir = map_mounts([args[args.index("--secrets-dir") + 1]], mounts)[0]
        self.log = open(tmp / f"{self.pod}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "syncplane", "worker", "--workflow", workflow, "--generation", str(self.generation),
             "--spec-file", str(spec_file), "--platform", "kubernetes", "--namespace", namespace,
             "--pod-name", self.pod, "--workflow-uid", uid, "--secrets-dir", secrets_dir], env=env, stdout=self.log,
            stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.log.close()


def create_workflow(cluster: Any, namespace: str, tmp: Path, secrets: bool = True) -> tuple[str, str]:
    """The default ingress workflow, stopped; with the Secrets it references unless told otherwise."""
    if secrets:
        for secret in ("d365-sandbox", "acs-sandbox"):
            # nothing listens at its token URL: the connectors retry, the worker stays up
            cluster.kubectl("create", "secret", "generic", secret, "-n", namespace,
                            *literals({**UNREACHABLE_SECRETS[secret], "clientSecret": SECRET_VALUE}))
    doc = yaml.safe_load((DEFAULTS / "10-contacts-ingress.yaml").read_text())
    path = tmp / "wf.yaml"
    path.write_text(yaml.safe_dump(doc))
    cluster.kubectl("apply", "-n", namespace, "-f", str(path))
    name = doc["metadata"]["name"]
    wait(cluster, namespace, f"workflow/{name}", "jsonpath={.status.phase}=STOPPED")
    return name, f"workflow/{name}"


def operator_process(namespace: str, log: IO[bytes], metrics_port: int | None = None) -> subprocess.Popen[bytes]:
    """`syncplane operator` as its own process, watching ``namespace``, its output into ``log``; serving its
    /metrics on 127.0.0.1:``metrics_port`` if given (:func:`operator_reconciles`)."""
    metrics = ["--metrics-listen", f"127.0.0.1:{metrics_port}"] if metrics_port else []
    return subprocess.Popen([sys.executable, "-m", "syncplane", "operator", "--standalone", "--namespace",
                             namespace, *metrics, "--liveness", "http://127.0.0.1:0/healthz"],
                            env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)


def operator_reconciles(metrics_port: int) -> float:
    """The reconciles an operator process has counted (``syncplane.operator.reconciles``, every outcome),
    from its /metrics on 127.0.0.1:``metrics_port`` (parsed by prometheus_client); 0 before it serves them."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    return sum(sample.value for family in text_string_to_metric_families(text)
               if family.name == "syncplane_operator_reconciles" for sample in family.samples
               if sample.name.endswith("_total"))


def start_until_available(cluster: Any, namespace: str, name: str) -> None:
    patch(cluster, namespace, name, {"desiredState": "RUNNING"})
    wait(cluster, namespace, f"workflow/{name}", "jsonpath={.status.phase}=STARTING")
    wait(cluster, namespace, f"deployment/{name}-worker", AVAILABLE)


def test_lifecycle_under_the_operator(k8s_cluster, namespace, operator, tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)

    # 1. start: STARTING until the Deployment is Available and the worker heartbeats, then RUNNING
    patch(k8s_cluster, namespace, name, {"desiredState": "RUNNING"})
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STARTING")
    wait(k8s_cluster, namespace, f"deployment/{name}-worker", AVAILABLE)
    assert get(k8s_cluster, namespace, "workflow", name)["status"]["phase"] == "STARTING"
    worker = LocalWorker(k8s_cluster, namespace, name, tmp_path)
    try:
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=RUNNING")
        wf = get(k8s_cluster, namespace, "workflow", name)
        assert wf["status"]["appliedGeneration"] == worker.generation
        conditions = {c["type"]: c["status"] for c in wf["status"]["conditions"]}
        assert conditions["Ready"] == "True"
        first_configmap = worker.configmap

        # 2. edit while running: SpecDrift with the field paths; the Deployment is untouched
        before = get(k8s_cluster, namespace, "deployment", f"{name}-worker")["metadata"]["generation"]
        patch(k8s_cluster, namespace, name, {"batchSize": 250})
        wait(k8s_cluster, namespace, target, "jsonpath={.status.drift.detected}=true")
        wf = get(k8s_cluster, namespace, "workflow", name)
        assert wf["status"]["drift"]["changedFields"] == ["spec.batchSize"]  # the resource's own spelling
        assert {c["type"]: c["status"] for c in wf["status"]["conditions"]}["SpecDrift"] == "True"
        assert get(k8s_cluster, namespace, "deployment", f"{name}-worker")["metadata"]["generation"] == before

        # 3. stop: STOPPING, 0 replicas; when the fake pod is gone its container (our worker) gets SIGTERM
        patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
        wait(k8s_cluster, namespace, f"deployment/{name}-worker", "jsonpath={.spec.replicas}=0")
        wait(k8s_cluster, namespace, f"pod/{worker.pod}", "delete")
    finally:
        worker.stop()
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")

    # 4. start again: a new snapshot ConfigMap, drift cleared
    patch(k8s_cluster, namespace, name, {"desiredState": "RUNNING"})
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STARTING")
    wait(k8s_cluster, namespace, f"deployment/{name}-worker", AVAILABLE)
    worker = LocalWorker(k8s_cluster, namespace, name, tmp_path)
    try:
        assert worker.configmap != first_configmap
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=RUNNING")
        wf = get(k8s_cluster, namespace, "workflow", name)
        assert not wf["status"].get("drift", {}).get("detected")
        events = k8s_cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                                     f"involvedObject.name={name}", "-o", "json").stdout
        reasons = {e["reason"] for e in json.loads(events)["items"]}
        assert {"Starting", "Running", "Stopping", "Stopped"} <= reasons
    finally:
        patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
        worker.stop()


def test_bad_credentials_drive_error_with_the_reason(k8s_cluster, namespace, operator, tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path, secrets=False)
    start_until_available(k8s_cluster, namespace, name)
    worker = LocalWorker(k8s_cluster, namespace, name, tmp_path)
    try:
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=ERROR")
        error = get(k8s_cluster, namespace, "workflow", name)["status"]["lastError"]
        assert error["reason"] == "BAD_CREDENTIALS"
        assert "Secret" in error["message"] and "d365-sandbox" in error["message"]
        wait(k8s_cluster, namespace, f"deployment/{name}-worker", "jsonpath={.spec.replicas}=0")
    finally:
        worker.stop()
    patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")


def test_crash_looping_pod_drives_error(k8s_cluster, namespace, operator, tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)
    start_until_available(k8s_cluster, namespace, name)
    pods = json.loads(k8s_cluster.kubectl("get", "pods", "-n", namespace, "-l", f"syncplane.io/workflow={name}",
                                          "-o", "json").stdout)["items"]
    pod = pods[0]["metadata"]["name"]
    # Play the kubelet of a container that keeps dying.
    status = {"status": {"containerStatuses": [{
        "name": "worker", "image": "x", "imageID": "", "ready": False, "restartCount": 5, "started": False,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}
    k8s_cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type", "merge",
                        "-p", json.dumps(status))
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=ERROR")
    wf = get(k8s_cluster, namespace, "workflow", name)
    assert wf["status"]["lastError"]["reason"] == "CRASH_LOOP"
    assert {c["type"]: c["status"] for c in wf["status"]["conditions"]}["Degraded"] == "True"

    def warned() -> bool:   # kopf posts events from its own queue, after the status patch
        events = json.loads(k8s_cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                                                f"involvedObject.name={name}", "-o", "json").stdout)["items"]
        return any(e["type"] == "Warning" and e["reason"] == "Error" for e in events)

    k8s_cluster.wait_until("a Warning event on the Workflow", warned)


def test_delete_drains_and_leaves_no_orphans(k8s_cluster, namespace, operator, tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)
    start_until_available(k8s_cluster, namespace, name)
    selector = f"syncplane.io/workflow={name}"

    def children() -> list[str]:
        out = k8s_cluster.kubectl("get", "deployments,replicasets,pods,configmaps,leases", "-n", namespace, "-l",
                                  selector, "-o", "name").stdout
        return out.split()

    worker = LocalWorker(k8s_cluster, namespace, name, tmp_path)
    try:
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=RUNNING")
        # Every kind of child is there, the checkpoints ConfigMap and the spec snapshot included.
        assert {f"configmap/{name}-checkpoints", f"configmap/{worker.configmap}",
                f"deployment.apps/{name}-worker", f"pod/{worker.pod}"} <= set(children())
        finalizers = get(k8s_cluster, namespace, "workflow", name)["metadata"]["finalizers"]
        assert finalizers == ["syncplane.io/finalizer"]
        k8s_cluster.kubectl("delete", "workflow", name, "-n", namespace, "--wait=false")
        wait(k8s_cluster, namespace, f"pod/{worker.pod}", "delete")  # drained first
    finally:
        worker.stop()
    wait(k8s_cluster, namespace, target, "delete")
    k8s_cluster.wait_until("the garbage collector to remove every child", lambda: children() == [])


def test_operator_restart_mid_transition_converges(k8s_cluster, workflow_crd, namespace, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    monkeypatch.setenv("SYNCPLANE_OPERATOR_RESYNC", "2")
    args = ["run", "--standalone", "--namespace", namespace, "-m", "syncplane_operator.handlers"]
    # A real operator process, killed with SIGKILL in the middle of STARTING.
    with open(tmp_path / "operator.log", "wb") as log:
        first = operator_process(namespace, log)
        try:
            name, target = create_workflow(k8s_cluster, namespace, tmp_path)
            patch(k8s_cluster, namespace, name, {"desiredState": "RUNNING"})
            wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STARTING")
        finally:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    # The operator is gone mid-transition; the cluster moves on without it.
    wait(k8s_cluster, namespace, f"deployment/{name}-worker", AVAILABLE)
    worker = LocalWorker(k8s_cluster, namespace, name, tmp_path)
    try:
        with KopfRunner(args, timeout=60) as second:
            wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=RUNNING")
            patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
            wait(k8s_cluster, namespace, f"pod/{worker.pod}", "delete")
            worker.stop()
            wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")
        assert second.exception is None, second.output
    finally:
        worker.stop()


def test_operator_recovers_from_an_api_server_restart(k8s_cluster, namespace, operator, tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)
    k8s_cluster.restart("kube-apiserver")
    # The operator's watches broke and must be re-established: it still reacts.
    start_until_available(k8s_cluster, namespace, name)
    worker = LocalWorker(k8s_cluster, namespace, name, tmp_path)
    try:
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=RUNNING")
        patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
        wait(k8s_cluster, namespace, f"pod/{worker.pod}", "delete")
    finally:
        worker.stop()
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")


def test_spec_snapshots_are_pruned_to_the_applied_one_and_the_newest(k8s_cluster, namespace, operator, tmp_path):
    """Issue 15: a snapshot ConfigMap is made per run (``<workflow>-spec-<hash>-<generation>``) and none
    was ever deleted. After six runs, a spec edit before each, the workflow keeps the applied run's and
    the newest KEEP_SPEC_SNAPSHOTS; its other ConfigMaps (checkpoints) stay."""
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)

    def snapshots() -> dict[str, int]:
        items = json.loads(k8s_cluster.kubectl("get", "configmaps", "-n", namespace, "-l",
                                               f"{WORKFLOW_LABEL}={name}", "-o", "json").stdout)["items"]
        return {cm["metadata"]["name"]: int(cm["metadata"]["annotations"][GENERATION_ANNOTATION])
                for cm in items if cm["metadata"]["name"].startswith(f"{name}-spec-")}

    made: list[str] = []
    for run in range(6):
        patch(k8s_cluster, namespace, name, {"desiredState": "RUNNING", "batchSize": 100 + run})
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STARTING")
        status = get(k8s_cluster, namespace, "workflow", name)["status"]
        made.append(spec_configmap_name(name, status["appliedSpecHash"], int(status["appliedGeneration"])))
        patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")
    assert len(set(made)) == 6
    k8s_cluster.wait_until("the older snapshots pruned", lambda: set(snapshots()) == set(made[-KEEP_SPEC_SNAPSHOTS:]))
    assert get(k8s_cluster, namespace, "configmap", checkpoint_configmap_name(name))
