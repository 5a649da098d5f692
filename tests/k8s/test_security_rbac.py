"""Issue 13 item 2 on the test cluster: what each identity of the chart may reach, as a table of
`kubectl auth can-i --as <identity>` (the API server's own RBAC answer), asserted row by row.

The workers read no Secret at all — not the API server's TLS key, not an unreferenced Secret, not
even the ones their workflow references: the operator mounts those into the worker pod (the kubelet
reads them). What RBAC cannot narrow is left as it is and shown as such: a worker's heartbeat Lease
and its dead-letter and held-record ConfigMaps have names made at run time (pod name, record hash),
so its Lease and ConfigMap verbs are namespace-wide (see README, "Security model")."""

from __future__ import annotations

from typing import Any

import pytest

from tests.k8s.test_chart import chart_release  # noqa: F401  (the fixture: the chart installed)

pytestmark = [pytest.mark.k8s, pytest.mark.security]

# (identity, verb, resource, name or "" for the collection) -> allowed
TABLE: list[tuple[str, str, str, str, bool]] = [
    # the workers
    ("worker", "get", "secrets", "{tls}", False),             # the API server's TLS key
    ("worker", "get", "secrets", "unrelated", False),         # a Secret no workflow references
    ("worker", "get", "secrets", "d365-sandbox", False),      # even a referenced one: mounted, not read
    ("worker", "list", "secrets", "", False),
    ("worker", "get", "leases", "{leader}", False),           # the operator's leader Lease
    ("worker", "update", "leases", "{leader}", False),
    ("worker", "patch", "leases", "{leader}", True),          # heartbeat Leases are named by pod: not narrowable
    ("worker", "get", "configmaps", "other-checkpoints", True),
    ("worker", "patch", "configmaps", "other-checkpoints", True),
    ("worker", "get", "workflows.syncplane.io", "", False),
    ("worker", "create", "deployments.apps", "", False),
    ("worker", "create", "pods", "", False),
    # the API server
    ("server", "get", "secrets", "{tls}", False),
    ("server", "get", "secrets", "unrelated", False),
    ("server", "list", "secrets", "", False),
    ("server", "update", "leases", "{leader}", False),
    ("server", "patch", "configmaps", "other-checkpoints", True),   # RetryDeadLetters labels dead letters
    ("server", "delete", "configmaps", "other-checkpoints", False),
    ("server", "patch", "workflows.syncplane.io/status", "", False),  # the operator owns status
    ("server", "create", "deployments.apps", "", False),
    # the operator
    ("operator", "get", "secrets", "{tls}", False),
    ("operator", "get", "secrets", "unrelated", False),
    ("operator", "list", "secrets", "", False),
    ("operator", "update", "leases", "{leader}", True),
    ("operator", "update", "leases", "another-lease", False),
    ("operator", "patch", "leases", "{leader}", False),
    ("operator", "delete", "configmaps", "other-checkpoints", False),
    ("operator", "patch", "workflows.syncplane.io/status", "", True),
    ("operator", "create", "deployments.apps", "", True),
    ("operator", "create", "deployments.apps", "@kube-system", False),   # not cluster-wide by default
]


def can_i(cluster: Any, namespace: str, release: str, who: str, verb: str, resource: str, name: str) -> bool:
    account = f"system:serviceaccount:{namespace}:{release}-syncplane-{who}"
    ns = namespace
    if name.startswith("@"):
        ns, name = name[1:], ""
    name = name.format(tls=f"{release}-syncplane-server-tls", leader=f"{release}-syncplane-operator-leader")
    target = f"{resource}/{name}" if name else resource
    res = cluster.kubectl("auth", "can-i", verb, target, "-n", ns, f"--as={account}", check=False)
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), res.stderr
    return answer == "yes"


def test_each_identity_reaches_only_what_the_table_says(k8s_cluster, namespace, chart_release):  # noqa: F811
    got = [(who, verb, resource, name, can_i(k8s_cluster, namespace, chart_release, who, verb, resource, name))
           for who, verb, resource, name, _ in TABLE]
    table = "\n".join(f"{who:9} {verb:7} {resource}/{name or '*'}: {'yes' if ok else 'no'}"
                      for who, verb, resource, name, ok in got)
    print("kubectl auth can-i --as <identity>:\n" + table)
    wrong = [(g, want) for g, (*_, want) in zip(got, TABLE, strict=True) if g[4] != want]
    assert wrong == [], table
