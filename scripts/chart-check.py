#!/usr/bin/env python3
"""`make chart`: lint, render and check the Helm chart.

1. `helm lint --strict` with every charts/syncplane/ci/*-values.yaml scenario;
2. `helm template` of every scenario (and of the optional features), then over the output:
   - no pod runs as root, allows privilege escalation, is privileged or has a writable root filesystem,
     and every pod has the RuntimeDefault seccomp profile;
   - every resource carries the app.kubernetes.io/* labels;
   - RBAC: what each Role/ClusterRole grants equals VERBS below, and every verb there is backed by a call
     in the code (a regex over the file that makes it). A code change that stops calling an API fails
     here until the grant goes too.
3. With --kubeconfig, `kubectl apply --dry-run=server` of every rendered scenario (the k8s test tier does
   this against the test cluster).

Exit status 0 when everything holds; each problem is printed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "syncplane"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
NAMESPACE = "syncplane"
# Optional features rendered on top of the defaults (not installable in the test cluster: no cert-manager
# or prometheus-operator CRDs there).
EXTRA_RENDERS = {
    "cert-manager+servicemonitor": ["--set", "server.tls.certManager.enabled=true",
                                    "--set", "server.tls.certManager.issuerRef.name=ca-issuer",
                                    "--set", "serviceMonitor.enabled=true"],
    "two-watch-namespaces": ["--set", "watchNamespaces={team-a,team-b}"],
    "monitoring": ["--set", "serviceMonitor.enabled=true", "--set", "dashboards.enabled=true",
                   "--set", "watchNamespaces={team-a,team-b}"],
}
REQUIRED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
                   "app.kubernetes.io/part-of", "helm.sh/chart")


@dataclass(frozen=True)
class Verb:
    """One granted (API group, resource, verb) and the code that needs it."""

    group: str
    resource: str
    verb: str
    file: str           # relative to the repository root
    evidence: str       # regex that must match in `file`
    why: str


def _verbs(group: str, resource: str, verbs: str, file: str, evidence: str, why: str) -> list[Verb]:
    return [Verb(group, resource, v, file, evidence, why) for v in verbs.split()]


HANDLERS = "operator/syncplane_operator/handlers.py"
RECONCILER = "operator/syncplane_operator/reconciler.py"
LEADER = "operator/syncplane_operator/leader.py"
STORE = "server/syncplane/store/kubernetes.py"
HEARTBEAT = "server/syncplane/worker/platform/kubernetes.py"
RECORDS = "server/syncplane/state/kube_records.py"
BUILDERS = "operator/syncplane_operator/builders.py"

# Role name suffix -> the verbs that role must grant, exactly.
VERBS: dict[str, list[Verb]] = {
    "operator": [
        *_verbs("syncplane.io", "workflows", "list watch", HANDLERS, r"@kopf\.on\.event\(GROUP, VERSION, PLURAL",
                "kopf lists and watches the Workflows it handles"),
        *_verbs("syncplane.io", "workflows", "patch", RECONCILER, r"patch_namespaced_custom_object\(",
                "the operator's finalizer, added with a Workflow's first workers and removed once they drained"),
        *_verbs("syncplane.io", "workflows/status", "patch", RECONCILER, r"patch_namespaced_custom_object_status",
                "the reconciler's status patch (status is a subresource)"),
        *_verbs("apps", "deployments", "list watch", HANDLERS, r'kopf\.index\("apps", "v1", "deployments"',
                "worker Deployment index"),
        *_verbs("apps", "deployments", "create", RECONCILER, r"create_namespaced_deployment", "start"),
        *_verbs("apps", "deployments", "patch", RECONCILER, r"patch_namespaced_deployment", "scale to 0 (stop)"),
        *_verbs("apps", "deployments", "update", RECONCILER, r"replace_namespaced_deployment",
                "a new applied spec or replica count"),
        *_verbs("", "pods", "list watch", HANDLERS, r'kopf\.index\("", "v1", "pods"', "crash loops, rejections"),
        *_verbs("coordination.k8s.io", "leases", "list watch", HANDLERS,
                r'kopf\.index\("coordination\.k8s\.io", "v1", "leases"', "the workers' heartbeats"),
        *_verbs("", "configmaps", "get", RECONCILER, r"read_namespaced_config_map",
                "the applied-spec snapshot, read back after a restart"),
        *_verbs("", "configmaps", "get patch", BUILDERS, r'"verbs": \["get", "patch"\],\s*"resourceNames"',
                "granted by name in each Workflow's own worker Role (a Role grants only what its maker holds)"),
        *_verbs("", "configmaps", "create", RECONCILER, r"create_namespaced_config_map", "the snapshot on start"),
        *_verbs("", "configmaps", "list", RECONCILER, r"list_namespaced_config_map",
                "the workflow's spec snapshots, to prune"),
        *_verbs("", "configmaps", "delete", RECONCILER, r"delete_namespaced_config_map",
                "all but the applied and newest snapshots (the admission policy holds it to those names)"),
        *_verbs("", "events", "create", RECONCILER, r"kopf\.event\(", "Events on transitions"),
        *_verbs("", "serviceaccounts", "create", RECONCILER, r"create_namespaced_service_account",
                "each Workflow's own worker ServiceAccount"),
        *_verbs("", "serviceaccounts", "get patch", RECONCILER,
                r"read_namespaced_service_account,\s*core\.patch_namespaced_service_account",
                "an existing one brought back to the builder's (workload identity annotations, labels; the admission "
                "policy holds it to `syncplane-worker-<workflow>` labelled with its workflow)"),
        *_verbs("rbac.authorization.k8s.io", "roles", "create", RECONCILER, r"create_namespaced_role,",
                "each Workflow's own worker Role (its ConfigMaps by name)"),
        *_verbs("rbac.authorization.k8s.io", "roles", "get patch", RECONCILER,
                r"read_namespaced_role, rbac\.patch_namespaced_role,",
                "an existing Role brought back to the builder's name list (the admission policy holds it to "
                "`syncplane-worker-<workflow>-objects` labelled with its workflow)"),
        *_verbs("rbac.authorization.k8s.io", "rolebindings", "create", RECONCILER,
                r"create_namespaced_role_binding", "that account bound to the workers' Role and to its own"),
        *_verbs("rbac.authorization.k8s.io", "rolebindings", "get patch delete", RECONCILER,
                r"read_namespaced_role_binding,\s*rbac\.patch_namespaced_role_binding, "
                r"rbac\.delete_namespaced_role_binding",
                "an existing RoleBinding brought back to the builder's (deleted and made again for another roleRef; "
                "the admission policy holds it to `syncplane-worker-<workflow>[-objects]` labelled with its workflow)"),
        *_verbs("rbac.authorization.k8s.io", "roles", "bind", "operator/syncplane_operator/builders.py",
                r'"roleRef"', "binding the workers' Role (by name) without holding its verbs"),
        *_verbs("batch", "jobs", "create", RECONCILER, r"create_namespaced_job", "a verify Job per request"),
    ],
    "operator-leader-election": [
        *_verbs("coordination.k8s.io", "leases", "get", LEADER, r"read_namespaced_lease", "who leads"),
        *_verbs("coordination.k8s.io", "leases", "create", LEADER, r"create_namespaced_lease", "first leader"),
        *_verbs("coordination.k8s.io", "leases", "update", LEADER, r"replace_namespaced_lease",
                "renew, take over, release"),
    ],
    "server": [
        *_verbs("syncplane.io", "workflows", "get", STORE, r"get_namespaced_custom_object", "GetWorkflow"),
        *_verbs("syncplane.io", "workflows", "list", STORE, r"list_namespaced_custom_object\(GROUP",
                "ListWorkflows, the start of a watch"),
        *_verbs("syncplane.io", "workflows", "watch", STORE, r"Watch\(\)\.stream\(self\.custom\.list_namespaced",
                "WatchWorkflows"),
        *_verbs("syncplane.io", "workflows", "create", STORE, r"create_namespaced_custom_object", "CreateWorkflow"),
        *_verbs("syncplane.io", "workflows", "update", STORE, r"replace_namespaced_custom_object",
                "UpdateWorkflow, Start/Stop/Restart (spec only)"),
        *_verbs("syncplane.io", "workflows", "delete", STORE, r"delete_namespaced_custom_object", "DeleteWorkflow"),
        *_verbs("", "configmaps", "get", RECORDS, r"self\.read\(",
                "ListDeadLetters (each shard by name; ConfigMapStore.read)"),
        *_verbs("", "configmaps", "patch", RECORDS, r"self\.merge_patch\(",
                "RetryDeadLetters (the retry mark; ConfigMapStore.merge_patch)"),
        *_verbs("", "configmaps", "list watch", "server/syncplane/verify/kube.py",
                r"w\.stream\(self\.core\.list_namespaced_config_map",
                "VerifyWorkflow lists, then watches `<workflow>-verify` for its Job's result"),
    ],
    "worker": [
        *_verbs("coordination.k8s.io", "leases", "patch", HEARTBEAT, r"patch_namespaced_lease", "heartbeat"),
        *_verbs("coordination.k8s.io", "leases", "create", HEARTBEAT, r"create_namespaced_lease",
                "first heartbeat"),
        *_verbs("coordination.k8s.io", "leases", "delete", HEARTBEAT, r"delete_namespaced_lease",
                "heartbeat removed on a clean stop"),
        *_verbs("", "configmaps", "create", "server/syncplane/state", r"create_namespaced_config_map",
                "the `<workflow>-checkpoints` ConfigMap if it was deleted while the worker ran, the first record "
                "of a dead-letter, held-record or repair shard, a verify Job's first `<workflow>-verify` (get and "
                "patch: the Workflow's own Role, by name)"),
    ],
}


def helm_binary() -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.k8s.cluster import check_binaries, default_bin_dir

    bin_dir = default_bin_dir()
    check_binaries(bin_dir)
    return bin_dir / "helm"


def run(args: list[str | Path], env: dict[str, str] | None = None) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"`{' '.join(map(str, args))}` exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout


def helm_env() -> dict[str, str]:
    # No user Helm config or cache: the check is the same on every machine.
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"syncplane-chart-check-{os.getuid()}"
    return {**os.environ, "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_CONFIG_HOME": str(tmp / "config"),
            "HELM_DATA_HOME": str(tmp / "data")}


def render(helm: Path, *args: str, release: str = "syncplane", namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    out = run([helm, "template", release, CHART, "--namespace", namespace, *args], env=helm_env())
    return [doc for doc in yaml.safe_load_all(out) if doc]


def renders(helm: Path) -> dict[str, list[dict[str, Any]]]:
    out = {path.name: render(helm, "-f", str(path)) for path in SCENARIOS}
    for name, args in EXTRA_RENDERS.items():
        out[name] = render(helm, *args)
    return out


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for doc in docs:
        kind = doc["kind"]
        if kind == "Pod":
            specs.append((f"Pod/{doc['metadata']['name']}", doc["spec"]))
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            specs.append((f"{kind}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]))
        elif kind == "CronJob":
            specs.append((f"{kind}/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def security_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Root, privilege escalation, privileged, writable root FS, no seccomp: every one is a problem."""
    problems = []
    for where, spec in pod_specs(docs):
        pod = spec.get("securityContext") or {}
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            problems.append(f"{where}: shares a host namespace")
        if any("hostPath" in v for v in spec.get("volumes") or []):
            problems.append(f"{where}: mounts a hostPath")
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            c = container.get("securityContext") or {}
            name = f"{where} container {container['name']}"

            def setting(key: str, c: dict[str, Any] = c, pod: dict[str, Any] = pod) -> Any:
                return c.get(key, pod.get(key))

            if setting("runAsNonRoot") is not True:
                problems.append(f"{name}: runAsNonRoot is not true")
            if setting("runAsUser") == 0 or setting("runAsGroup") == 0:
                problems.append(f"{name}: runs as uid/gid 0")
            if c.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{name}: allowPrivilegeEscalation is not false")
            if c.get("privileged"):
                problems.append(f"{name}: privileged")
            if c.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{name}: the root filesystem is writable")
            if "ALL" not in ((c.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{name}: capabilities are not all dropped")
            if (c.get("capabilities") or {}).get("add"):
                problems.append(f"{name}: adds capabilities")
            seccomp = (c.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
            if seccomp != "RuntimeDefault":
                problems.append(f"{name}: seccomp profile is {seccomp!r}, not RuntimeDefault")
    return problems


def label_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        labels = doc["metadata"].get("labels") or {}
        missing = [k for k in REQUIRED_LABELS if k not in labels]
        if missing:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: missing labels {missing}")
    return problems


def is_user_role(doc: dict[str, Any]) -> bool:
    """A ClusterRole aggregated into the built-in view/edit/admin: users' rights, not a component's."""
    labels = doc["metadata"].get("labels") or {}
    return doc["kind"] == "ClusterRole" and any(k.startswith("rbac.authorization.k8s.io/aggregate-to-")
                                                for k in labels)


def granted(docs: list[dict[str, Any]], fullname: str = "syncplane") -> dict[str, set[tuple[str, str, str]]]:
    """Role name suffix -> {(group, resource, verb)}; the same rules in several namespaces must agree."""
    out: dict[str, set[tuple[str, str, str]]] = {}
    for doc in docs:
        if doc["kind"] not in ("Role", "ClusterRole") or is_user_role(doc):
            continue
        suffix = doc["metadata"]["name"].removeprefix(f"{fullname}-")
        rules = {(g, r, v) for rule in doc.get("rules") or [] for g in rule.get("apiGroups", [])
                 for r in rule.get("resources", []) for v in rule.get("verbs", [])}
        if suffix in out and out[suffix] != rules:
            raise SystemExit(f"{doc['kind']} {doc['metadata']['name']} differs between namespaces")
        out[suffix] = rules
    return out


def expected(role: str) -> set[tuple[str, str, str]]:
    return {(v.group, v.resource, v.verb) for v in VERBS[role]}


def rbac_problems(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for role, rules in granted(docs).items():
        if role not in VERBS:
            problems.append(f"role {role!r} is not described in scripts/chart-check.py VERBS")
            continue
        if any("*" in part for rule in rules for part in rule):
            problems.append(f"role {role}: wildcard grant")
        for g, r, v in sorted(rules - expected(role)):
            problems.append(f"role {role} grants {v} on {g or 'core'}/{r}, which no code calls")
        for g, r, v in sorted(expected(role) - rules):
            problems.append(f"role {role} lacks {v} on {g or 'core'}/{r}, which the code calls")
    for doc in docs:
        if is_user_role(doc):
            for rule in doc.get("rules") or []:
                if rule.get("apiGroups") != ["syncplane.io"] or rule.get("resources") != ["workflows"]:
                    problems.append(f"ClusterRole {doc['metadata']['name']}: a user role grants only on workflows")
        elif doc["kind"] == "ClusterRole" and not doc["metadata"]["name"].endswith("-operator"):
            problems.append(f"ClusterRole {doc['metadata']['name']}: only the operator may be cluster-wide")
    return problems


def evidence_problems() -> list[str]:
    """Every verb must be called by the code it cites."""
    problems = []
    for role, verbs in VERBS.items():
        for v in verbs:
            path = ROOT / v.file
            files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
            found = any(re.search(v.evidence, f.read_text()) for f in files if f.exists())
            if found:
                continue
            problems.append(f"role {role}: {v.verb} on {v.group or 'core'}/{v.resource} ({v.why}): "
                            f"/{v.evidence}/ not found in {v.file}")
    return problems


def verb_table() -> str:
    lines = []
    for role, verbs in VERBS.items():
        for v in verbs:
            lines.append(f"  {role:26} {v.verb:7} {v.group or 'core'}/{v.resource:18} {v.why}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", help="also `kubectl apply --dry-run=server` every scenario there")
    parser.add_argument("--verbs", action="store_true", help="print the verb table and exit")
    args = parser.parse_args()
    if args.verbs:
        print(verb_table())
        return 0
    helm = helm_binary()
    problems: list[str] = []
    for path in SCENARIOS:
        result = subprocess.run([str(helm), "lint", "--strict", str(CHART), "-f", str(path), "--namespace",
                                 NAMESPACE], capture_output=True, text=True, env=helm_env())
        status = "ok" if result.returncode == 0 else "FAILED"
        print(f"helm lint --strict -f ci/{path.name}: {status}")
        if result.returncode:
            problems.append(f"helm lint --strict -f {path.name}:\n{result.stdout}{result.stderr}")
    for name, docs in renders(helm).items():
        found = security_problems(docs) + label_problems(docs) + rbac_problems(docs)
        print(f"helm template ({name}): {len(docs)} resources, {len(found)} problem(s)")
        problems += [f"{name}: {p}" for p in found]
        if args.kubeconfig:
            kubectl = helm.parent / "kubectl"
            manifest = yaml.safe_dump_all(docs)
            result = subprocess.run([str(kubectl), "--kubeconfig", args.kubeconfig, "apply", "--dry-run=server",
                                     "-f", "-"], input=manifest, capture_output=True, text=True)
            if result.returncode:
                problems.append(f"{name}: kubectl apply --dry-run=server:\n{result.stderr}")
    problems += evidence_problems()
    print("RBAC verbs, each backed by a call in the code:\n" + verb_table())
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
