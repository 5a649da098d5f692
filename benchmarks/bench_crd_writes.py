"""The API server's cost of one Workflow write (issue 17), on the real test cluster (tests/k8s/cluster.py).

``count`` Workflows (the default ingress one, STOPPED) get ``count`` status merge patches (what the
operator writes: ``PATCH .../workflows/<name>/status``), then ``count`` spec merge patches
(``spec.batchSize``), one at a time over one keep-alive connection. Each run is measured twice, in
alternating rounds on the same cluster:

- ``generated``: the CRD as ``make proto`` generates it (its ``x-kubernetes-validations`` CEL rules);
- ``no_cel``: the same CRD with every CEL rule removed (a scratch copy, only to measure what the rules
  cost: it is never installed anywhere else).

The baseline, ``configmap``: as many merge patches of a ConfigMap of about the Workflow's size (the API
server's own cost of a write, with no CRD machinery). Figures per write: the API server's CPU
milliseconds (user + system, psutil) and its request milliseconds
(``apiserver_request_duration_seconds_sum`` for that verb and resource), etcd's CPU milliseconds. Each
figure is the median over the rounds; the machine is shared, so compare within a run only.

``python -m benchmarks.bench_crd_writes [COUNT [ROUNDS]]`` (500, 3), or ``python -m benchmarks --only
crd_writes``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import yaml

from tests.k8s.cluster import TestCluster
from tests.k8s.syncplane_fixtures import CONTACTS, CRD, apply_crd, without_cel

NS = "writes"
API = f"/apis/syncplane.io/v1/namespaces/{NS}/workflows"
MERGE = "application/merge-patch+json"


def cel_rules(node: Any) -> int:
    """How many CEL rules ``node`` holds (a rule shared by two fields counts twice: it runs twice)."""
    if isinstance(node, dict):
        return len(node.get("x-kubernetes-validations", [])) + sum(cel_rules(v) for v in node.values())
    if isinstance(node, list):
        return sum(cel_rules(v) for v in node)
    return 0


class _Writer:
    """Requests over one connection to the API server; a status >= 300 raises RuntimeError."""

    def __init__(self, cluster: TestCluster) -> None:
        self.conn = cluster.connection(timeout=60)

    def ok(self, method: str, path: str, body: Any, content_type: str = MERGE) -> None:
        self.conn.request(method, path, body=json.dumps(body), headers={"Content-Type": content_type})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: HTTP {resp.status} {data[:300]!r}")


def _measure(cluster: TestCluster, verb_resource: tuple[str, str], writes: Callable[[], int]) -> dict[str, float]:
    apiserver = psutil.Process(cluster.pids_by_name["kube-apiserver"])
    etcd = psutil.Process(cluster.pids_by_name["etcd"])
    seconds0 = cluster.requests_by_kind("apiserver_request_duration_seconds_sum")[verb_resource]
    cpu0, etcd0, t0 = sum(apiserver.cpu_times()[:2]), sum(etcd.cpu_times()[:2]), time.monotonic()
    n = writes()
    wall = time.monotonic() - t0
    cpu, etcd_cpu = sum(apiserver.cpu_times()[:2]) - cpu0, sum(etcd.cpu_times()[:2]) - etcd0
    seconds = cluster.requests_by_kind("apiserver_request_duration_seconds_sum")[verb_resource] - seconds0
    return {"api_server_cpu_ms": 1000 * cpu / n, "request_ms": 1000 * seconds / n, "etcd_cpu_ms": 1000 * etcd_cpu / n,
            "wall_ms": 1000 * wall / n}


def run(count: int = 500, rounds: int = 3) -> dict[str, Any]:
    """Measure as the module docstring says; per variant and kind of write (``status``, ``spec``), the
    median per-write figures (milliseconds) over ``rounds`` rounds, and each round's."""
    generated = yaml.safe_load(CRD.read_text())
    variants = {"generated": generated, "no_cel": without_cel(generated)}
    names = [f"wf-{i:04d}" for i in range(count)]
    doc = yaml.safe_load(CONTACTS.read_text())
    samples: dict[str, list[dict[str, float]]] = {}
    with TestCluster() as cluster:
        cluster.kubectl("create", "namespace", NS)
        apply_crd(cluster, generated)
        write = _Writer(cluster)
        for name in names:
            write.ok("POST", API, {**doc, "metadata": {"name": name}}, "application/json")
        # the baseline: ConfigMaps of the Workflow's size, written the same way
        size = len(json.dumps(doc))
        for name in names:
            write.ok("POST", f"/api/v1/namespaces/{NS}/configmaps",
                     {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                      "data": {"spec": "x" * size, "n": "0"}}, "application/json")
        serial = iter(range(1, 10**9))

        def status_writes() -> int:
            for name in names:
                write.ok("PATCH", f"{API}/{name}/status",
                         {"status": {"phase": "STOPPED", "backlog": next(serial), "observedGeneration": 1}})
            return len(names)

        def spec_writes() -> int:
            for name in names:
                write.ok("PATCH", f"{API}/{name}", {"spec": {"batchSize": 1 + next(serial) % 1000}})
            return len(names)

        def configmap_writes() -> int:
            for name in names:
                write.ok("PATCH", f"/api/v1/namespaces/{NS}/configmaps/{name}", {"data": {"n": str(next(serial))}})
            return len(names)

        for _ in range(rounds):
            for variant, crd in variants.items():
                apply_crd(cluster, crd, cel=variant == "generated")
                samples.setdefault(f"{variant}/status", []).append(
                    _measure(cluster, ("PATCH", "workflows/status"), status_writes))
                samples.setdefault(f"{variant}/spec", []).append(
                    _measure(cluster, ("PATCH", "workflows"), spec_writes))
            samples.setdefault("configmap", []).append(_measure(cluster, ("PATCH", "configmaps"), configmap_writes))
        write.conn.close()
    out: dict[str, Any] = {"workflows": count, "rounds": rounds, "cel_rules": cel_rules(generated),
                           "workflow_json_bytes": size}
    for key, rows in samples.items():
        median = {figure: round(statistics.median(r[figure] for r in rows), 2) for figure in rows[0]}
        node = out
        for part in key.split("/"):
            node = node.setdefault(part, {})
        node.update(median, each_round=[{k: round(v, 2) for k, v in r.items()} for r in rows])
    return out


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 500
    rounds = int(argv[1]) if len(argv) > 1 else 3
    print(json.dumps(run(count, rounds), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
