"""Fixtures of the k8s tier: one real control plane per session, one namespace per test.

A missing binary or a failed start is an error of every test here, never a skip.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from tests.image.buildah import Image, Runtime
from tests.k8s.cluster import TestCluster

START_SECONDS = pytest.StashKey[float]()


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest) -> Iterator[TestCluster]:
    cluster = TestCluster()
    cluster.start()
    assert cluster.start_seconds is not None
    request.config.stash[START_SECONDS] = cluster.start_seconds
    try:
        yield cluster
    finally:
        cluster.stop()  # raises if any cluster process survives


@pytest.fixture
def namespace(k8s_cluster: TestCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace, whose `default` service account exists (so pods are admitted)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:6]}"
    k8s_cluster.kubectl("create", "namespace", name)
    k8s_cluster.wait_until(
        f"service account {name}/default",
        lambda: k8s_cluster.api("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0] == 200,
    )
    yield name
    k8s_cluster.kubectl("delete", "namespace", name, "--wait=false")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    seconds = config.stash.get(START_SECONDS, None)
    if seconds is not None:
        terminalreporter.write_line(f"k8s test cluster ready (fake node Ready) in {seconds:.1f}s")


@pytest.fixture(scope="session")
def worker_image() -> Iterator[Runtime]:
    """The built image (scripts/build-image.sh, cached) as the fake kubelet's container runtime."""
    image = Image.build()
    container = image.container(f"syncplane-test-kubelet-{uuid.uuid4().hex[:8]}")
    try:
        yield Runtime(image, container)
    finally:
        image.remove(container)
