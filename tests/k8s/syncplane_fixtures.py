"""Fixtures of syncplane's own k8s tests (the cluster itself is in conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner

from tests.k8s.cluster import TestCluster

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "charts" / "syncplane" / "crds" / "workflows.syncplane.io.yaml"
CONTACTS = ROOT / "server" / "syncplane" / "defaults" / "10-contacts-ingress.yaml"


def without_cel(node: Any) -> Any:
    """A copy of ``node`` (a CRD, or any part of one) without its ``x-kubernetes-validations`` (CEL) rules."""
    if isinstance(node, dict):
        return {k: without_cel(v) for k, v in node.items() if k != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [without_cel(v) for v in node]
    return node


def apply_crd(cluster: TestCluster, crd: dict[str, Any], cel: bool = True, timeout: float = 60.0) -> None:
    """Apply the Workflow CRD ``crd`` (server-side, as kubectl) and wait until the API server enforces it:
    until a dry-run create that only a CEL rule refuses (an INGRESS Workflow with an egress section too)
    is refused iff ``cel``. Raises ClusterError (with the cluster's log tails) at ``timeout`` seconds."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(crd))
    cluster.wait_established("workflows.syncplane.io")
    probe = yaml.safe_load(CONTACTS.read_text())
    probe["metadata"] = {"name": "cel-probe"}
    probe["spec"]["egress"] = {"send": True}

    def enforced() -> bool:
        status, _ = cluster.api("POST", "/apis/syncplane.io/v1/namespaces/default/workflows?dryRun=All", probe)
        return (status == 422) == cel

    cluster.wait_until(f"the API server enforcing the CRD just applied ({'with' if cel else 'without'} CEL)",
                       enforced, timeout)


@pytest.fixture(scope="session")
def workflow_crd(k8s_cluster) -> str:
    """The generated Workflow CRD, applied with kubectl and Established."""
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    k8s_cluster.wait_established("workflows.syncplane.io")
    return "workflows.syncplane.io"


SECRET_VALUE = "sandbox-client-secret-value-42"


@pytest.fixture
def operator(k8s_cluster, workflow_crd, namespace, monkeypatch, request) -> Iterator[KopfRunner]:
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    # A quick resync for the tests of stale heartbeats; `@pytest.mark.operator_resync(600)` for a test that
    # the watch events alone drive.
    marker = request.node.get_closest_marker("operator_resync")
    monkeypatch.setenv("SYNCPLANE_OPERATOR_RESYNC", str(marker.args[0] if marker else 2))
    with KopfRunner(["run", "--standalone", "--namespace", namespace, "-m", "syncplane_operator.handlers"],
                    timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
    assert SECRET_VALUE not in runner.output, "a secret value reached the operator's log"
