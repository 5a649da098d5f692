"""Fixtures of syncplane's own k8s tests (the cluster itself is in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

CRD = Path(__file__).resolve().parents[2] / "charts" / "syncplane" / "crds" / "workflows.syncplane.io.yaml"


@pytest.fixture(scope="session")
def workflow_crd(k8s_cluster) -> str:
    """The generated Workflow CRD, applied with kubectl and Established."""
    k8s_cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    k8s_cluster.kubectl("wait", "--for=condition=Established", "crd/workflows.syncplane.io", "--timeout=60s")
    return "workflows.syncplane.io"
