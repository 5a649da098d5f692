"""Every child the operator makes converges to its builder's output on reconcile (brief s7-bugs 1: an
existing per-Workflow Role kept its old name list, and its workers were then forbidden their own ConfigMaps).

A table of children, each changed behind the operator's back (an old operator's Role, a RoleBinding to
another Role, a ServiceAccount and a checkpoints ConfigMap that lost their labels, a worker Deployment with
another image): after an edit and a restart each holds what the builder says again, its ServiceAccount may
do what the workers need (the API server's own RBAC answer), and the new Secret the edit references is
mounted for the workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from syncplane.contract.names import worker_configmap_names, worker_service_account_name
from syncplane.credentials import load_local_secrets
from syncplane.model.convert import spec_from_dict
from syncplane_operator.builders import (
    WorkerImage,
    build_checkpoint_configmap,
    build_worker_identity,
    unconverged,
)
from tests.factories import UNREACHABLE_SECRETS, literals
from tests.k8s.kubelet import project_secrets
from tests.k8s.syncplane_fixtures import SECRET_VALUE
from tests.k8s.test_operator import AVAILABLE, create_workflow, get, patch, start_until_available, wait

pytestmark = pytest.mark.k8s


def _builders(name: str, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> the builder's output of each child the test changes."""
    identity = build_worker_identity(name, namespace, WorkerImage().worker_role)
    checkpoints = build_checkpoint_configmap(name, namespace)
    checkpoints.pop("data")   # the workers'
    return {(b["kind"].lower(), b["metadata"]["name"]): b for b in [*identity, checkpoints]}


def tamper_children(cluster: Any, namespace: str, name: str, *, keep_labels: bool = False) -> None:
    """Each child made to differ from its builder, as an older operator or a hand edit leaves it.
    ``keep_labels``: the worker identity keeps its `syncplane.io/workflow` label (under the chart's admission
    policy the operator writes only a workflow's own, labelled identity; one without the label is not its own)."""
    account = worker_service_account_name(name)
    own = f"{account}-objects"
    cluster.kubectl("patch", "role", own, "-n", namespace, "--type", "merge", "-p", json.dumps(
        {"rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"],
                    "resourceNames": [f"{name}-checkpoints"]}]}))
    cluster.kubectl("delete", "rolebinding", account, "-n", namespace)   # roleRef cannot be patched
    cluster.kubectl("create", "rolebinding", account, "-n", namespace, "--role", "another-role",
                    f"--serviceaccount={namespace}:{account}")
    if keep_labels:
        cluster.kubectl("label", "rolebinding", account, "-n", namespace, f"syncplane.io/workflow={name}")
    cluster.kubectl("patch", "rolebinding", own, "-n", namespace, "--type", "merge", "-p", json.dumps(
        {"subjects": [{"kind": "ServiceAccount", "name": "someone-else", "namespace": namespace}]}))
    if not keep_labels:
        cluster.kubectl("label", "serviceaccount", account, "-n", namespace, "syncplane.io/workflow-")
    cluster.kubectl("label", "configmap", f"{name}-checkpoints", "-n", namespace, "syncplane.io/workflow-")


def may(cluster: Any, namespace: str, name: str, verb: str, what: str) -> bool:
    account = f"system:serviceaccount:{namespace}:{worker_service_account_name(name)}"
    return bool(cluster.kubectl("auth", "can-i", verb, what, "-n", namespace, f"--as={account}",
                                check=False).stdout.strip() == "yes")


def test_an_edit_and_restart_bring_every_child_back_to_its_builder(k8s_cluster, namespace, operator, tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)
    start_until_available(k8s_cluster, namespace, name)
    builders = _builders(name, namespace)
    for (kind, child), want in builders.items():
        assert unconverged(want, get(k8s_cluster, namespace, kind, child)) == {}, (kind, child)

    # the Deployment is converged on any reconcile (the operator's resync is 2 s here): another image comes back
    deployment = f"deployment/{name}-worker"
    image = get(k8s_cluster, namespace, "deployment", f"{name}-worker")["spec"]["template"]["spec"]["containers"][0][
        "image"]
    k8s_cluster.kubectl("set", "image", deployment, "-n", namespace, "worker=elsewhere/other:1")
    wait(k8s_cluster, namespace, deployment, "jsonpath={.spec.template.spec.containers[0].image}=" + image)

    tamper_children(k8s_cluster, namespace, name)
    last_shard = worker_configmap_names(name)[-1]
    assert not may(k8s_cluster, namespace, name, "get", f"configmap/{last_shard}")   # red before the fix

    # the edit: the destination's credentials in another Secret; then the restart (stop, start) applies it
    patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")
    k8s_cluster.kubectl("create", "secret", "generic", "acs-rotated", "-n", namespace,
                        *literals({**UNREACHABLE_SECRETS["acs-sandbox"], "clientSecret": SECRET_VALUE}))
    patch(k8s_cluster, namespace, name, {"destination": {"credentials": {"name": "acs-rotated"}}})
    start_until_available(k8s_cluster, namespace, name)
    wait(k8s_cluster, namespace, deployment, AVAILABLE)

    for (kind, child), want in builders.items():
        assert unconverged(want, get(k8s_cluster, namespace, kind, child)) == {}, (kind, child)
    for configmap in worker_configmap_names(name):
        assert may(k8s_cluster, namespace, name, "get", f"configmap/{configmap}"), configmap
        assert may(k8s_cluster, namespace, name, "patch", f"configmap/{configmap}"), configmap
    # the checkpoints kept their data (the workers'), only the labels came back
    assert get(k8s_cluster, namespace, "configmap", f"{name}-checkpoints")["metadata"]["labels"][
        "syncplane.io/workflow"] == name
    # the workers get the new Secret: the kubelet projects it into the pod (it reads Secrets as itself)
    pod_spec = get(k8s_cluster, namespace, "deployment", f"{name}-worker")["spec"]["template"]["spec"]
    mounts = project_secrets(pod_spec, lambda s: json.loads(k8s_cluster.kubectl(
        "get", "secret", s, "-n", namespace, "-o", "json").stdout)["data"], tmp_path / "secrets")
    args = pod_spec["containers"][0]["args"]
    secrets_dir = mounts[args[args.index("--secrets-dir") + 1]]
    snapshot = get(k8s_cluster, namespace, "configmap", pod_spec["volumes"][0]["configMap"]["name"])
    loaded = load_local_secrets(spec_from_dict(json.loads(snapshot["data"]["spec.json"])), Path(secrets_dir))
    assert set(loaded) == {"d365-sandbox", "acs-rotated"}, loaded   # what the worker loads at its start
    patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")


def _mutating_policy(cluster: Any, namespace: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A MutatingAdmissionPolicy (and its binding) setting ``imagePullPolicy: Always`` on every Deployment
    written in ``namespace``, as a cluster's "always pull" policy does; in the API version the server has."""
    served = cluster.kubectl("api-versions").stdout.split()
    kinds = cluster.kubectl("api-resources", "--api-group=admissionregistration.k8s.io", "-o", "name").stdout
    version = next((v for v in ("v1", "v1beta1", "v1alpha1") if f"admissionregistration.k8s.io/{v}" in served),
                   None) if "mutatingadmissionpolicies" in kinds else None
    assert version is not None, f"the test cluster serves no MutatingAdmissionPolicy: {served}"
    name = f"always-pull-{namespace}"
    api = f"admissionregistration.k8s.io/{version}"
    policy = {"apiVersion": api, "kind": "MutatingAdmissionPolicy", "metadata": {"name": name},
              "spec": {"matchConstraints": {
                  "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                  "resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE", "UPDATE"],
                                     "resources": ["deployments"]}]},
                  "failurePolicy": "Fail", "reinvocationPolicy": "Never",
                  "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression":
                      "[JSONPatch{op: 'replace', path: '/spec/template/spec/containers/0/imagePullPolicy',"
                      " value: 'Always'}]"}}]}}
    binding = {"apiVersion": api, "kind": "MutatingAdmissionPolicyBinding", "metadata": {"name": name},
               "spec": {"policyName": name}}
    return policy, binding


def test_a_deployment_that_admission_changes_is_not_rewritten_forever(k8s_cluster, workflow_crd, namespace,
                                                                       monkeypatch, tmp_path):
    """Review of 629c010 (reproduced: generation 2 → 190 in 19 s): a mutating admission policy changes every
    write of the worker Deployment, so it never equals the builder's output, and the operator replaced it on
    each reconcile, forever. Now the difference that outlives the operator's own write is left alone: over
    many reconciles (a 1 s resync) the Deployment's generation stays put, and the policy's value stays."""
    from tests.k8s.cluster import free_ports
    from tests.k8s.test_operator import operator_process, operator_reconciles

    policy, binding = _mutating_policy(k8s_cluster, namespace)
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    monkeypatch.setenv("SYNCPLANE_OPERATOR_RESYNC", "1")
    k8s_cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                              "items": [policy, binding]}))
    port = free_ports(1)[0]
    try:
        with open(tmp_path / "operator.log", "wb") as log:
            proc = operator_process(namespace, log, metrics_port=port)
            try:
                name, _ = create_workflow(k8s_cluster, namespace, tmp_path)
                deployment = f"{name}-worker"

                def pulls_always() -> bool:
                    d = get(k8s_cluster, namespace, "deployment", deployment)
                    return bool(d["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "Always")

                start_until_available(k8s_cluster, namespace, name)
                k8s_cluster.wait_until("the policy's value on the Deployment", pulls_always, 60)
                seen = operator_reconciles(port)
                k8s_cluster.wait_until("three reconciles", lambda: operator_reconciles(port) >= seen + 3, 60)
                generation = get(k8s_cluster, namespace, "deployment", deployment)["metadata"]["generation"]
                seen = operator_reconciles(port)
                k8s_cluster.wait_until("five more", lambda: operator_reconciles(port) >= seen + 5, 60)
                assert get(k8s_cluster, namespace, "deployment", deployment)["metadata"]["generation"] == generation
                assert pulls_always()
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    finally:
        k8s_cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=json.dumps(
            {"apiVersion": "v1", "kind": "List", "items": [binding, policy]}))
