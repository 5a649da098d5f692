"""issue 17: uninstalled while Workflows exist, the operator leaves them stuck on its finalizer once they
are deleted; an operator started again finishes their drain and removes the finalizer, with no hand edit."""

from __future__ import annotations

import signal

import pytest
from kopf.testing import KopfRunner

from tests.k8s.test_operator import create_workflow, get, operator_process, start_until_available, wait

pytestmark = pytest.mark.k8s


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
