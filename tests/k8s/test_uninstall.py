"""issue 17: the operator's finalizer. Only a Workflow that ever had workers carries it (a cold start over
stopped Workflows patches none of them, and one never started is deleted with no operator at all); it is
removed once the workers drained. Uninstalled while Workflows exist, the operator leaves those that had
workers stuck on it once they are deleted; an operator started again finishes their drain and removes the
finalizer, with no hand edit."""

from __future__ import annotations

import json
import signal

import pytest
from kopf.testing import KopfRunner

from syncplane.contract.names import FINALIZER, WORKFLOW_LABEL
from tests.k8s.test_operator import create_workflow, get, operator_process, start_until_available, wait

pytestmark = pytest.mark.k8s
HOLD = "test.syncplane.io/hold"   # a finalizer of the test's own: a worker pod that stays terminating


def test_a_workflow_never_started_has_no_finalizer_and_is_deleted_without_the_operator(
        k8s_cluster, workflow_crd, namespace, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    with open(tmp_path / "operator.log", "wb") as log:
        operator = operator_process(namespace, log)
        try:
            name, target = create_workflow(k8s_cluster, namespace, tmp_path)   # reconciled: STOPPED
            assert "finalizers" not in get(k8s_cluster, namespace, "workflow", name)["metadata"]
        finally:
            operator.send_signal(signal.SIGTERM)
            operator.wait(timeout=60)
    k8s_cluster.kubectl("delete", "workflow", name, "-n", namespace, "--wait=false")
    wait(k8s_cluster, namespace, target, "delete", timeout=60)


@pytest.mark.operator_resync(600)
def test_a_started_workflow_keeps_its_finalizer_until_its_workers_drained(k8s_cluster, namespace, operator,
                                                                          tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)
    start_until_available(k8s_cluster, namespace, name)
    assert get(k8s_cluster, namespace, "workflow", name)["metadata"]["finalizers"] == [FINALIZER]
    pods = json.loads(k8s_cluster.kubectl("get", "pods", "-n", namespace, "-l", f"{WORKFLOW_LABEL}={name}",
                                          "-o", "json").stdout)["items"]
    pod = pods[0]["metadata"]["name"]
    k8s_cluster.kubectl("patch", "pod", pod, "-n", namespace, "--type", "merge",
                        "-p", json.dumps({"metadata": {"finalizers": [HOLD]}}))
    try:
        k8s_cluster.kubectl("delete", "workflow", name, "-n", namespace, "--wait=false")
        # the operator scales the workers to 0; their pod is terminating, not gone (the test holds it) ...
        wait(k8s_cluster, namespace, f"deployment/{name}-worker", "jsonpath={.spec.replicas}=0")
        k8s_cluster.wait_until(f"pod {pod} terminating", lambda: get(
            k8s_cluster, namespace, "pod", pod)["metadata"].get("deletionTimestamp"))
        # ... so the Workflow waits on its finalizer
        held = get(k8s_cluster, namespace, "workflow", name)["metadata"]
        assert held.get("deletionTimestamp") and held["finalizers"] == [FINALIZER]
    finally:
        k8s_cluster.kubectl("patch", "pod", pod, "-n", namespace, "--type", "json",
                            "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]))
    # the pod gone, the Workflow goes: its finalizer removed on the pod's watch event (the resync is 10 minutes)
    wait(k8s_cluster, namespace, target, "delete", timeout=60)


@pytest.mark.parametrize("workers", ["gone", "still-deployed"])
def test_an_operator_started_again_releases_workflows_deleted_while_it_was_gone(
        k8s_cluster, workflow_crd, namespace, monkeypatch, tmp_path, workers):
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    with open(tmp_path / "operator.log", "wb") as log:
        first = operator_process(namespace, log)
        try:
            name, target = create_workflow(k8s_cluster, namespace, tmp_path)
            start_until_available(k8s_cluster, namespace, name)
        finally:
            first.send_signal(signal.SIGTERM)   # helm uninstall: the operator's pod goes
            first.wait(timeout=60)
    k8s_cluster.kubectl("delete", "workflow", name, "-n", namespace, "--wait=false")
    stuck = get(k8s_cluster, namespace, "workflow", name)
    assert stuck["metadata"].get("deletionTimestamp") and stuck["metadata"]["finalizers"] == [
        "syncplane.io/finalizer"], "without an operator the Workflow waits on its finalizer"
    if workers == "gone":
        k8s_cluster.kubectl("delete", "deployment", f"{name}-worker", "-n", namespace, "--wait=true")
    args = ["run", "--standalone", "--namespace", namespace, "-m", "syncplane_operator.handlers"]
    with KopfRunner(args, timeout=90) as again:
        wait(k8s_cluster, namespace, target, "delete", timeout=80)
    assert again.exception is None, again.output
