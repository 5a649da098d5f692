"""Fixtures of syncplane's own k8s tests (the cluster itself is in conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kopf.testing import KopfRunner

CRD = Path(__file__).resolve().parents[2] / "charts" / "syncplane" / "crds" / "workflows.syncplane.io.yaml"


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
