"""Acceptance tests of the k8s tier's test cluster itself."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.k8s import cluster as cluster_module
from tests.k8s.cluster import (
    ClusterError,
    TestCluster,
    check_binaries,
    default_bin_dir,
    free_ports,
    kubernetes_version,
)

pytestmark = pytest.mark.k8s

DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: pause
        image: registry.k8s.io/pause:3.10
"""


def _ready(obj: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in obj["status"].get("conditions", []))


def test_deployment_becomes_available_with_ready_fake_pods(k8s_cluster: TestCluster, namespace: str) -> None:
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=DEPLOYMENT)
    k8s_cluster.kubectl(
        "wait", "-n", namespace, "--for=condition=Available", "deployment/web", "--timeout=120s", timeout=130
    )
    pods = json.loads(
        k8s_cluster.kubectl("get", "pods", "-n", namespace, "-l", "app=web", "-o", "json").stdout
    )
    ready = [p for p in pods["items"] if _ready(p)]
    assert len(ready) == 2, json.dumps(pods, indent=1)[:3000]
    for pod in ready:
        assert pod["status"]["phase"] == "Running"
        assert pod["spec"]["nodeName"] == k8s_cluster.node_name


def test_fake_node_is_ready(k8s_cluster: TestCluster) -> None:
    table = k8s_cluster.kubectl("get", "nodes", "--no-headers").stdout
    assert table.split()[:2] == [k8s_cluster.node_name, "Ready"], table
    node = json.loads(k8s_cluster.kubectl("get", "node", k8s_cluster.node_name, "-o", "json").stdout)
    assert _ready(node)
    assert node["metadata"]["labels"]["type"] == "kwok"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert not node["spec"].get("taints"), node["spec"]


def test_fake_node_heartbeats_through_a_lease(k8s_cluster: TestCluster) -> None:
    """Without a renewed Lease the node-lifecycle controller turns the node NotReady within a minute."""
    status, lease = k8s_cluster.api(
        "GET", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{k8s_cluster.node_name}"
    )
    assert status == 200, lease
    assert lease["spec"]["holderIdentity"]  # kwok's controller id
    assert lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["spec"]["renewTime"]


def test_helm_runs_against_the_cluster(k8s_cluster: TestCluster) -> None:
    version = k8s_cluster.helm("version", "--short").stdout
    assert version.startswith("v"), version
    assert k8s_cluster.helm("list", "--all-namespaces", "-o", "json").stdout.strip() == "[]"


def test_api_server_reports_the_go_mod_version(k8s_cluster: TestCluster) -> None:
    status, body = k8s_cluster.api("GET", "/version")
    assert status == 200, body
    assert body["gitVersion"] == kubernetes_version() == "v1.36.3"


def test_stop_leaves_no_cluster_process() -> None:
    cluster = TestCluster()
    cluster.start()
    pids, tmp = cluster.pids, cluster.tmp
    assert tmp is not None
    try:
        assert len(pids) == 5
        assert all(psutil.Process(pid).is_running() for pid in pids)
    finally:
        cluster.stop()
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert cluster.survivors(tmp) == []
    leftovers = [
        p.pid for p in psutil.process_iter(["cmdline"]) if str(tmp) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
    assert not tmp.exists()


def test_missing_binaries_fail_with_build_instructions(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match=r"make k8s-binaries") as excinfo:
        TestCluster(bin_dir=tmp_path).start()
    assert "kube-apiserver" in str(excinfo.value)


def test_failed_start_reports_the_log_tail_and_cleans_up(tmp_path: Path) -> None:
    """An API server that dies at once: start() fails with its log, and etcd is stopped again."""
    real = default_bin_dir()
    check_binaries(real)
    for name in os.listdir(real):
        (tmp_path / name).symlink_to(real / name)
    (tmp_path / "kube-apiserver").unlink()
    broken = tmp_path / "kube-apiserver"
    broken.write_text("#!/bin/sh\necho 'boom: no such flag' >&2\nexit 3\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)

    cluster = TestCluster(bin_dir=tmp_path, start_timeout=30)
    with pytest.raises(ClusterError) as excinfo:
        cluster.start()
    message = str(excinfo.value)
    assert "kube-apiserver exited" in message
    assert "exited with code 3" in message
    assert "boom: no such flag" in message
    assert cluster.tmp is None
    assert len(cluster.started) == 2  # etcd, then the broken API server
    assert not any(psutil.pid_exists(pid) for pid in cluster.started)


def test_survivor_check_sees_a_cluster_process_it_did_not_start(tmp_path: Path) -> None:
    """stop()'s process-table check also finds a bin-dir process naming the temp dir, not only its pids."""
    cluster = TestCluster()
    check_binaries(cluster.bin_dir)
    client, peer = free_ports(2)
    stray = psutil.Popen(
        [
            str(cluster.bin_dir / "etcd"),
            f"--data-dir={tmp_path / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=default=http://127.0.0.1:{peer}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        found = cluster.survivors(tmp_path)
        assert [line.split(":")[0] for line in found] == [f"pid {stray.pid}"]
    finally:
        stray.kill()
        stray.wait(timeout=10)
    assert cluster.survivors(tmp_path) == []


def test_start_retries_once_when_a_picked_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """free_ports() cannot reserve a port: if one is taken meanwhile, start() tries again on fresh ones."""
    calls = []
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]

        def ports_with_one_taken(count: int) -> list[int]:
            ports = free_ports(count)
            calls.append(ports)
            return [taken, *ports[1:]] if len(calls) == 1 else ports  # etcd's client port first

        monkeypatch.setattr(cluster_module, "free_ports", ports_with_one_taken)
        with TestCluster() as cluster:
            assert len(calls) == 2
            assert cluster.api("GET", "/readyz")[0] == 200
