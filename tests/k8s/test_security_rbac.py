"""Issue 13 item 2 on the test cluster: what each identity of the chart may reach, as a table of
`kubectl auth can-i --as <identity>` (the API server's own RBAC answer), asserted row by row.

The workers read no Secret at all — not the API server's TLS key, not an unreferenced Secret, not
even the ones their workflow references: the operator mounts those into the worker pod (the kubelet
reads them). Each Workflow's workers have an identity of their own (`syncplane-worker-<workflow>`, made
by the operator) with a Role of its own: get and patch on exactly its workflow's ConfigMaps, by name
(checkpoints, dead-letter and held-record shards), and no list: it reads no other workflow's data.
RBAC also gives it Lease verbs and ConfigMap create in the namespace, since a worker's heartbeat Lease
is named after its pod and create cannot be narrowed by name; the chart's ValidatingAdmissionPolicy
narrows those writes to its own workflow's objects.
`kubectl auth can-i` asks RBAC only, so the second table makes the requests themselves (server-side
dry runs, with a real pod-bound worker token): each kind x (own, other workflow) x verb."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from syncplane.contract.names import (
    DEAD_LETTER,
    HELD,
    RECORD_LABEL,
    REPAIR,
    WORKFLOW_LABEL,
    checkpoint_configmap_name,
    checkpoint_labels,
    record_shard,
    spec_configmap_name,
    verify_configmap_name,
    worker_configmap_names,
    worker_labels,
    worker_service_account_name,
)
from syncplane.verify.kube import result_labels
from syncplane_operator.builders import build_worker_identity
from tests.k8s.test_chart import chart_release, token_kubeconfig  # noqa: F401  (the fixture: the chart installed)

pytestmark = [pytest.mark.k8s, pytest.mark.security]

OWN, OTHER = "alpha", "beta"   # the worker's own workflow, and another one in the same namespace

# (identity, verb, resource, name or "" for the collection) -> allowed
TABLE: list[tuple[str, str, str, str, bool]] = [
    # the workers
    ("worker", "get", "secrets", "{tls}", False),             # the API server's TLS key
    ("worker", "get", "secrets", "unrelated", False),         # a Secret no workflow references
    ("worker", "get", "secrets", "{token}", False),  # the API token Secret (token auth mode)
    ("worker", "get", "secrets", "d365-sandbox", False),      # even a referenced one: mounted, not read
    ("worker", "list", "secrets", "", False),
    ("worker", "get", "leases", "{leader}", False),           # the operator's leader Lease
    ("worker", "update", "leases", "{leader}", False),
    ("worker", "patch", "leases", "{leader}", True),          # RBAC's answer; the admission policy denies it
    # reads: its own workflow's ConfigMaps by name, nothing else (issue 13 item 2: no other workflow's
    # checkpoints, dead letters, held records or repairs, which carry customer data; its verify Jobs run as
    # this identity and write `<workflow>-verify`)
    ("worker", "list", "configmaps", "", False),
    ("worker", "watch", "configmaps", "", False),
    *[("worker", verb, "configmaps", f"{wf}-{obj}", wf == OWN)
      for wf in (OWN, OTHER)
      for obj in ("checkpoints", "verify", "dl-0", "dl-f", "held-0", "held-f", "repair-0", "repair-f")
      for verb in ("get", "patch")],
    ("worker", "delete", "configmaps", f"{OWN}-dl-0", False),
    ("worker", "update", "configmaps", f"{OWN}-checkpoints", False),
    ("worker", "get", "configmaps", f"{OWN}-spec-0123456789", False),    # the operator's snapshot: mounted
    ("worker", "get", "configmaps", f"{OWN}-dl-0123456789abcdef", False),  # the earlier per-record names
    ("worker", "get", "configmaps", f"{OWN}-repair-0123456789abcdef", False),
    ("worker", "get", "configmaps", "unrelated", False),
    ("worker", "create", "configmaps", "", True),     # RBAC's answer; the policy narrows it (second table)
    ("worker", "get", "workflows.syncplane.io", "", False),
    ("worker", "create", "deployments.apps", "", False),
    ("worker", "create", "pods", "", False),
    ("worker", "create", "jobs.batch", "", False),
    # the API server
    ("server", "get", "secrets", "{tls}", False),
    ("server", "get", "secrets", "unrelated", False),
    ("server", "get", "secrets", "{token}", False),  # the API token Secret (token auth mode)
    ("server", "list", "secrets", "", False),
    ("server", "update", "leases", "{leader}", False),
    ("server", "get", "configmaps", f"{OTHER}-dl-0", True),        # ListDeadLetters reads the shards
    ("server", "patch", "configmaps", f"{OTHER}-dl-0", True),      # RetryDeadLetters marks dead letters
    ("server", "list", "configmaps", "", True),                       # VerifyWorkflow: `<workflow>-verify`
    ("server", "delete", "configmaps", "other-checkpoints", False),
    ("server", "patch", "workflows.syncplane.io/status", "", False),  # the operator owns status
    ("server", "create", "deployments.apps", "", False),
    ("server", "watch", "configmaps", "", True),                      # VerifyWorkflow waits for its result
    ("server", "create", "jobs.batch", "", False),                    # the operator runs verify Jobs
    # the operator
    ("operator", "get", "secrets", "{tls}", False),
    ("operator", "get", "secrets", "unrelated", False),
    ("operator", "get", "secrets", "{token}", False),  # the API token Secret (token auth mode)
    ("operator", "list", "secrets", "", False),
    ("operator", "update", "leases", "{leader}", True),
    ("operator", "update", "leases", "another-lease", False),
    ("operator", "patch", "leases", "{leader}", False),
    ("operator", "delete", "configmaps", "other-checkpoints", True),   # RBAC's answer (snapshots are pruned);
                                                                       # the policy denies it
    ("operator", "create", "roles.rbac.authorization.k8s.io", "", True),    # each Workflow's own worker Role
    ("operator", "update", "roles.rbac.authorization.k8s.io", "", False),
    ("operator", "bind", "roles.rbac.authorization.k8s.io", "admin", False),
    ("operator", "patch", "workflows.syncplane.io/status", "", True),
    ("operator", "create", "deployments.apps", "", True),
    ("operator", "create", "jobs.batch", "", True),                    # a verify Job per request
    ("operator", "delete", "jobs.batch", "", False),
    ("operator", "create", "deployments.apps", "@kube-system", False),   # not cluster-wide by default
]


def account_of(namespace: str, release: str, who: str) -> str:
    name = worker_service_account_name(OWN) if who == "worker" else f"{release}-syncplane-{who}"
    return f"system:serviceaccount:{namespace}:{name}"


def make_worker_identity(cluster: Any, namespace: str, release: str, workflow: str) -> None:
    """What the operator makes on a start, made here under the operator's own identity (so its grants
    are tested too, the API server's escalation check included): the workflow's ServiceAccount, its
    RoleBinding to the chart's worker Role, its own Role of ConfigMap names and that Role's binding."""
    role = f"{release}-syncplane-worker"
    docs = build_worker_identity(workflow, namespace, role)
    cluster.kubectl("create", "-n", namespace, f"--as={account_of(namespace, release, 'operator')}", "-f", "-",
                    input="\n---\n".join(json.dumps(d) for d in docs))


def can_i(cluster: Any, namespace: str, release: str, who: str, verb: str, resource: str, name: str) -> bool:
    account = account_of(namespace, release, who)
    ns = namespace
    if name.startswith("@"):
        ns, name = name[1:], ""
    name = name.format(tls=f"{release}-syncplane-server-tls", leader=f"{release}-syncplane-operator-leader",
                       token=f"{release}-syncplane-server-token")
    target = f"{resource}/{name}" if name else resource
    res = cluster.kubectl("auth", "can-i", verb, target, "-n", ns, f"--as={account}", check=False)
    answer = res.stdout.strip()
    assert answer in ("yes", "no"), res.stderr
    return answer == "yes"


def test_each_identity_reaches_only_what_the_table_says(k8s_cluster, namespace, chart_release):  # noqa: F811
    make_worker_identity(k8s_cluster, namespace, chart_release, OWN)
    got = [(who, verb, resource, name, can_i(k8s_cluster, namespace, chart_release, who, verb, resource, name))
           for who, verb, resource, name, _ in TABLE]
    table = "\n".join(f"{who:9} {verb:7} {resource}/{name or '*'}: {'yes' if ok else 'no'}"
                      for who, verb, resource, name, ok in got)
    print("kubectl auth can-i --as <identity>:\n" + table)
    wrong = [(g, want) for g, (*_, want) in zip(got, TABLE, strict=True) if g[4] != want]
    assert wrong == [], table


# -- the workers' writes: RBAC plus the chart's admission policy, as real requests ----------------------------
POD = {OWN: f"{OWN}-worker-5c4f8d7b9-abcde", OTHER: f"{OTHER}-worker-5c4f8d7b9-fghij"}
KINDS = ("checkpoints", "dead letter", "held record", "repair", "verify result", "heartbeat")
Row = tuple[str, str, dict[str, Any], dict[str, Any] | None, bool]   # what, verb, object, merge patch, allowed


def configmap(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {}}


def lease(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name, "labels": labels},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 15}}


def object_of(kind: str, workflow: str, labelled: str = "") -> dict[str, Any]:
    """A workflow's object of a kind, as the worker or operator makes it (``labelled``: another label)."""
    labelled = labelled or workflow
    record = {WORKFLOW_LABEL: labelled}
    if kind == "checkpoints":
        return configmap(checkpoint_configmap_name(workflow), checkpoint_labels(labelled))
    if kind == "verify result":   # a verify Job's answer (it runs as the workers' identity)
        return configmap(verify_configmap_name(workflow), result_labels(labelled))
    if kind in ("dead letter", "held record", "repair"):
        which = {"dead letter": DEAD_LETTER, "held record": HELD, "repair": REPAIR}[kind]
        return configmap(record_shard(workflow, which, "contacts", "k1")[0], {**record, RECORD_LABEL: which})
    return lease(POD[workflow], record)


def merge_patch(cluster: Any, kubeconfig: Path, namespace: str, obj: dict[str, Any], body: dict[str, Any]) -> bool:
    """A dry-run merge patch with the kubeconfig's token: True on 200, False on 403 (RBAC or admission)."""
    token = json.loads(kubeconfig.read_text())["users"][0]["user"]["token"]
    ca = json.loads(cluster.kubeconfig.read_text())["clusters"][0]["cluster"]["certificate-authority"]
    group = "/api/v1" if obj["apiVersion"] == "v1" else f"/apis/{obj['apiVersion']}"
    path = f"{group}/namespaces/{namespace}/{obj['kind'].lower()}s/{obj['metadata']['name']}?dryRun=All"
    req = urllib.request.Request(cluster.server + path, data=json.dumps(body).encode(), method="PATCH", headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/merge-patch+json"})
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=ca), timeout=30) as resp:
            return bool(resp.status == 200)
    except urllib.error.HTTPError as exc:
        assert exc.code == 403, exc.read()
        return False


def request(cluster: Any, kubeconfig: Path, namespace: str, verb: str, obj: dict[str, Any],
            patch: dict[str, Any] | None = None) -> bool:
    """One server-side dry run as the worker: True when the API server would do it, False when RBAC or
    admission refuses it (any other failure fails the test)."""
    where = ["-n", namespace, f"--kubeconfig={kubeconfig}", "--dry-run=server"]
    target = [obj["kind"].lower(), obj["metadata"]["name"]]
    if verb == "create":
        res = cluster.kubectl("create", *where, "-f", "-", input=json.dumps(obj), check=False)
    elif verb == "patch":   # the API call itself: `kubectl patch` reads the object first (a verb of its own)
        body = patch or {"metadata": {"annotations": {"syncplane.io/probe": "1"}}}
        return merge_patch(cluster, kubeconfig, namespace, obj, body)
    else:
        res = cluster.kubectl("delete", *target, *where, check=False)
    if res.returncode == 0:
        return True
    assert "denied request" in res.stderr or "forbidden" in res.stderr.lower(), res.stderr
    return False


def test_a_worker_writes_only_its_own_workflows_objects(k8s_cluster, namespace, chart_release, tmp_path):  # noqa: F811
    """Issue 13 item 2, the kind: a worker pod can write only its own Workflow's Leases and ConfigMaps,
    whatever their names. Each kind x (own, other workflow) x (create, patch, delete), and the ways
    around it (a label or a name of the other workflow, the leader Lease, another pod's Lease of the
    same workflow, the operator's spec snapshot, an unrelated ConfigMap), as the worker pod's own token."""
    for workflow in (OWN, OTHER):
        make_worker_identity(k8s_cluster, namespace, chart_release, workflow)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": POD[OWN], "labels": {WORKFLOW_LABEL: OWN}},
           "spec": {"serviceAccountName": worker_service_account_name(OWN),
                    "containers": [{"name": "worker", "image": "syncplane"}]}}
    k8s_cluster.kubectl("create", "-n", namespace, "-f", "-", input=json.dumps(pod))
    worker = token_kubeconfig(k8s_cluster, namespace, worker_service_account_name(OWN), tmp_path / "worker",
                              pod=POD[OWN])
    leader = lease(f"{chart_release}-syncplane-operator-leader", {})
    sibling = lease(f"{OWN}-worker-5c4f8d7b9-zzzzz", {WORKFLOW_LABEL: OWN})
    def whose(wf: str) -> str:
        return "its own" if wf == OWN else "another"

    creates: list[Row] = [(f"{kind} of {whose(wf)} workflow", "create", object_of(kind, wf), None, wf == OWN)
                          for kind in KINDS for wf in (OWN, OTHER)]
    creates += [
        ("its own dead letter's name, the other workflow's label", "create",
         object_of("dead letter", OWN, labelled=OTHER), None, False),
        ("the other workflow's checkpoints name, its own label", "create",
         object_of("checkpoints", OTHER, labelled=OWN), None, False),
        ("another pod's heartbeat of its own workflow", "create", sibling, None, False),
        ("its workflow's spec snapshot (the operator's)", "create",
         configmap(f"{OWN}-spec-0123456789", {WORKFLOW_LABEL: OWN}), None, False),
        ("the operator's leader Lease", "create", leader, None, False),
    ]
    # a worker deletes only its heartbeat (records leave their shard by a patch)
    writes: list[Row] = [(f"{kind} of {whose(wf)} workflow", verb, object_of(kind, wf), None,
                          wf == OWN and (verb == "patch" or kind == "heartbeat"))
                         for kind in KINDS for wf in (OWN, OTHER) for verb in ("patch", "delete")]
    writes += [
        ("its own checkpoints, relabelled to the other workflow", "patch", object_of("checkpoints", OWN),
         {"metadata": {"labels": {WORKFLOW_LABEL: OTHER}}}, False),
        ("the other workflow's checkpoints, relabelled to its own", "patch", object_of("checkpoints", OTHER),
         {"metadata": {"labels": {WORKFLOW_LABEL: OWN}}}, False),
        ("the operator's leader Lease", "patch", leader, None, False),
        ("the operator's leader Lease", "delete", leader, None, False),
        ("another pod's heartbeat of its own workflow", "patch", sibling, None, False),
        ("an unrelated ConfigMap", "patch", configmap("unrelated", {}), None, False),
        ("an unrelated ConfigMap", "delete", configmap("unrelated", {}), None, False),
    ]
    got = [(what, verb, request(k8s_cluster, worker, namespace, verb, obj, patch), want)
           for what, verb, obj, patch, want in creates]
    # then the objects exist (made by their owners; here the admin), for the updates and deletes
    existing = [object_of(kind, wf) for kind in KINDS for wf in (OWN, OTHER)] + [
        leader, sibling, configmap("unrelated", {})]
    k8s_cluster.kubectl("create", "-n", namespace, "-f", "-", input="\n---\n".join(json.dumps(o) for o in existing))
    got += [(what, verb, request(k8s_cluster, worker, namespace, verb, obj, patch), want)
            for what, verb, obj, patch, want in writes]
    table = "\n".join(f"{verb:7} {what}: {'allowed' if ok else 'denied'}" for what, verb, ok, _ in got)
    print(f"as {worker_service_account_name(OWN)} (pod {POD[OWN]}):\n{table}")
    assert [(what, verb) for what, verb, ok, want in got if ok != want] == [], table
    # the policy binds the workers only: the API server still marks another workflow's dead letter
    server = token_kubeconfig(k8s_cluster, namespace, f"{chart_release}-syncplane-server", tmp_path / "server")
    assert request(k8s_cluster, server, namespace, "patch", object_of("dead letter", OTHER),
                   {"data": {"0123456789abcdef.retry": "true"}})



def test_the_operator_deletes_only_spec_snapshots(k8s_cluster, namespace, chart_release, tmp_path):  # noqa: F811
    """Issue 15: the operator prunes each workflow's spec snapshots (a ConfigMap per run), so RBAC grants it
    ConfigMap delete in the namespace; the chart's admission policy holds that to `<workflow>-spec-*`
    snapshots labelled with their workflow. Real dry-run deletes with the operator's own token."""
    operator = token_kubeconfig(k8s_cluster, namespace, f"{chart_release}-syncplane-operator", tmp_path / "operator")
    rows: list[tuple[str, dict[str, Any], bool]] = [
        ("a spec snapshot", configmap(spec_configmap_name(OWN, "0123456789abcdef", 4), worker_labels(OWN)), True),
        ("an earlier operator's per-spec snapshot", configmap(spec_configmap_name(OWN, "fedcba9876543210"),
                                                               worker_labels(OWN)), True),
        ("a snapshot's name, another workflow's label",
         configmap(spec_configmap_name(OWN, "0123456789abcdef", 5), worker_labels(OTHER)), False),
        *[(kind, object_of(kind, OWN), False) for kind in KINDS if kind != "heartbeat"],
        ("an unlabelled ConfigMap named like a snapshot", configmap("unrelated-spec-0123456789", {}), False),
    ]
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", "-", input="\n---\n".join(json.dumps(o) for _, o, _ in rows))
    # the API server applies a new policy once its informer has it: wait for that (a deadline, not a sleep)
    k8s_cluster.wait_until("the operator's admission policy in effect", lambda: not request(
        k8s_cluster, operator, namespace, "delete", object_of("checkpoints", OWN)), timeout=60)
    got = [(what, request(k8s_cluster, operator, namespace, "delete", obj)) for what, obj, _ in rows]
    assert got == [(what, want) for what, _, want in rows]

def test_the_operator_writes_only_each_workflows_own_worker_identity(k8s_cluster, namespace, chart_release,  # noqa: F811
                                                                     tmp_path):
    """Review of 629c010: RBAC grants the operator patch on every Role and ServiceAccount and patch and delete
    on every RoleBinding of its namespaces (it converges each Workflow's worker identity, names made at run
    time); the chart's admission policy holds those writes to a workflow's own identity, labelled with it and
    named `syncplane-worker-<workflow>[-objects]`. The kind: each kind x (a tenant's object, one labelled with
    a workflow but named otherwise, one named as a workflow's but labelled with another) x verb is refused;
    the workflow's own objects are not. Real dry runs with the operator's own token."""
    operator = token_kubeconfig(k8s_cluster, namespace, f"{chart_release}-syncplane-operator", tmp_path / "operator")
    make_worker_identity(k8s_cluster, namespace, chart_release, OWN)
    account = worker_service_account_name(OWN)

    def rbac(kind: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
        meta = {"name": name, "labels": labels}
        if kind == "ServiceAccount":
            return {"apiVersion": "v1", "kind": kind, "metadata": meta}
        if kind == "Role":   # verbs the operator holds, so RBAC's escalation check is not what refuses
            return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
                    "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]}
        return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
                "subjects": [{"kind": "User", "name": "tenant", "apiGroup": "rbac.authorization.k8s.io"}]}

    # (what, object) for each kind: a tenant's; labelled with the workflow but named otherwise; named as a
    # workflow's identity (gamma's) but labelled with another workflow
    others = [(f"{what} {kind}", rbac(kind, name, labels))
              for kind, own_name in (("Role", f"{account}-objects"), ("RoleBinding", account),
                                     ("ServiceAccount", account))
              for what, name, labels in (("a tenant's", "admin" if kind == "RoleBinding" else "tenant", {}),
                                         ("a workflow-labelled", f"tenant-{kind.lower()}", worker_labels(OWN)),
                                         ("another workflow's label on a", own_name.replace(OWN, "gamma"),
                                          worker_labels(OTHER)))]
    others += [("the workflow's own name, another workflow's label", rbac("RoleBinding", f"syncplane-worker-{OTHER}",
                                                                          worker_labels(OWN)))]
    k8s_cluster.kubectl("apply", "-n", namespace, "-f", "-", input="\n---\n".join(json.dumps(o) for _, o in others))
    empty: dict[str, Any] = {"rules": []}   # the reviewer's patch: a Role emptied
    rows: list[tuple[str, str, dict[str, Any], dict[str, Any] | None, bool]] = [
        (what, verb, obj, empty if obj["kind"] == "Role" else None, False)
        for what, obj in others for verb in (("patch",) if obj["kind"] == "ServiceAccount" else ("patch", "delete"))]
    mine = {d["kind"] + "/" + d["metadata"]["name"]: d for d in build_worker_identity(OWN, namespace, "unused")}
    rows += [
        ("its own Role", "patch", mine[f"Role/{account}-objects"], empty, True),
        ("its own Role's RoleBinding", "patch", mine[f"RoleBinding/{account}-objects"], None, True),
        ("its own Role's RoleBinding", "delete", mine[f"RoleBinding/{account}-objects"], None, True),
        ("its RoleBinding to the worker Role", "patch", mine[f"RoleBinding/{account}"], None, True),
        ("its RoleBinding to the worker Role", "delete", mine[f"RoleBinding/{account}"], None, True),
        ("its ServiceAccount", "patch", mine[f"ServiceAccount/{account}"], None, True),
        # RBAC grants no Role delete at all (the operator replaces only RoleBindings: roleRef is immutable)
        ("its own Role", "delete", mine[f"Role/{account}-objects"], None, False),
        ("its own Role, relabelled to another workflow", "patch", mine[f"Role/{account}-objects"],
         {"metadata": {"labels": {WORKFLOW_LABEL: OTHER}}}, False),
    ]
    # the API server applies a new policy once its informer has it: wait for that (a deadline, not a sleep)
    k8s_cluster.wait_until("the operator's identity policy in effect", lambda: not request(
        k8s_cluster, operator, namespace, "delete", others[3][1]), timeout=60)
    got = [(what, verb, request(k8s_cluster, operator, namespace, verb, obj, patch), want)
           for what, verb, obj, patch, want in rows]
    table = "\n".join(f"{verb:7} {what}: {'allowed' if ok else 'denied'}" for what, verb, ok, _ in got)
    print(f"as the operator:\n{table}")
    assert [(what, verb) for what, verb, ok, want in got if ok != want] == [], table


# -- workload identity: the chart's worker ServiceAccount settings on each Workflow's own account ----------------
WORKLOAD_IDENTITY = {"azure.workload.identity/client-id": "00000000-0000-0000-0000-0000000000aa"}


def test_each_workflows_account_carries_the_configured_workload_identity(k8s_cluster, workflow_crd, namespace,
                                                                        monkeypatch, tmp_path):
    """Issue 13 item 2: a per-Workflow worker ServiceAccount keeps the chart's worker ServiceAccount
    annotations and labels (`worker.serviceAccount.*`, the operator's SYNCPLANE_WORKER_SA_* variables),
    and an upgrade that sets them reaches the Workflows already running: an operator without them makes
    the identity (with its own Role of ConfigMap names), the next one, configured, annotates that account
    (the Deployment's identity digest)."""
    from kopf.testing import KopfRunner

    from tests.k8s.test_operator import create_workflow, get, start_until_available

    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    monkeypatch.setenv("SYNCPLANE_OPERATOR_RESYNC", "2")
    args = ["run", "--standalone", "--namespace", namespace, "-m", "syncplane_operator.handlers"]
    account = worker_service_account_name
    with KopfRunner(args, timeout=60) as first:
        name, _ = create_workflow(k8s_cluster, namespace, tmp_path)
        start_until_available(k8s_cluster, namespace, name)
    assert first.exception is None, first.output
    uid = get(k8s_cluster, namespace, "workflow", name)["metadata"]["uid"]
    before = get(k8s_cluster, namespace, "serviceaccount", account(name))["metadata"]
    assert not set(WORKLOAD_IDENTITY) & set(before.get("annotations") or {})
    role = get(k8s_cluster, namespace, "role", f"{account(name)}-objects")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"],
                              "resourceNames": worker_configmap_names(name)}]
    assert [o["uid"] for o in role["metadata"]["ownerReferences"]] == [uid]   # goes with the Workflow

    monkeypatch.setenv("SYNCPLANE_WORKER_SA_ANNOTATIONS", json.dumps(WORKLOAD_IDENTITY))
    monkeypatch.setenv("SYNCPLANE_WORKER_SA_LABELS", json.dumps({"azure.workload.identity/use": "true"}))
    with KopfRunner(args, timeout=60) as second:
        def meta() -> dict[str, Any]:
            return dict(get(k8s_cluster, namespace, "serviceaccount", account(name))["metadata"])

        k8s_cluster.wait_until("the workload identity on the workflow's account",
                               lambda: (meta().get("annotations") or {}).items() >= WORKLOAD_IDENTITY.items(),
                               timeout=60)
        assert meta()["labels"]["azure.workload.identity/use"] == "true"
        assert meta()["labels"][WORKFLOW_LABEL] == name
    assert second.exception is None, second.output
