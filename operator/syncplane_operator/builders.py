"""Pure manifest builders: a workflow in, a Kubernetes object out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from syncplane.contract import names as L
from syncplane.contract.names import checkpoint_configmap_name, checkpoint_labels, worker_configmap_names
from syncplane.verify.kube import JOB_TTL, MAX_WAIT, VerifyRequest, job_name


@dataclass(frozen=True)
class WorkerImage:
    image: str = "ghcr.io/syncplane/syncplane:0.1.0"
    pull_policy: str = "IfNotPresent"
    # The Role (in each workflow's namespace) every workflow's own ServiceAccount is bound to.
    worker_role: str = "syncplane-worker"
    # Copied onto each Workflow's own worker ServiceAccount (chart `worker.serviceAccount.annotations`
    # and `.labels`), e.g. `azure.workload.identity/client-id`: (key, value) pairs.
    account_annotations: tuple[tuple[str, str], ...] = ()
    account_labels: tuple[tuple[str, str], ...] = ()
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "1"
    memory_limit: str = "512Mi"


def build_spec_configmap(workflow: str, namespace: str, spec: dict[str, Any], spec_hash: str,
                         generation: int) -> dict[str, Any]:
    """An immutable snapshot of the spec a run's workers run (with the trace context of the call that
    started it), named by its hash and the generation that applied it."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": L.spec_configmap_name(workflow, spec_hash, generation), "namespace": namespace,
                     "labels": L.worker_labels(workflow),
                     "annotations": {L.SPEC_HASH_ANNOTATION: spec_hash, L.GENERATION_ANNOTATION: str(generation)}},
        "immutable": True,
        "data": {L.SPEC_KEY: json.dumps(spec, sort_keys=True)},
    }


def build_checkpoint_configmap(workflow: str, namespace: str) -> dict[str, Any]:
    """The workers' `<workflow>-checkpoints` ConfigMap, empty (data key = stream, value = cursor).
    Created when the workflow first starts, never replaced nor deleted on stop (its data is the workers'); the caller
    makes the Workflow its owner so that deleting the Workflow deletes it."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": checkpoint_configmap_name(workflow), "namespace": namespace,
                     "labels": checkpoint_labels(workflow)},
        "data": {},
    }


def build_worker_identity(workflow: str, namespace: str, role: str,
                          image: WorkerImage | None = None) -> list[dict[str, Any]]:
    """The workflow's own worker identity, four objects:

    - the ServiceAccount `syncplane-worker-<workflow>`, with the chart's worker ServiceAccount
      annotations and labels (``image.account_annotations``/``account_labels``: workload identity);
    - a RoleBinding of it to ``role``, the chart's worker Role: its heartbeat Leases, and `create`
      on ConfigMaps (RBAC cannot limit create by name: the chart's ValidatingAdmissionPolicy narrows
      those writes to the workflow's own names; no Secrets, the operator mounts the referenced ones);
    - the Role `syncplane-worker-<workflow>-objects`: `get` and `patch` on exactly the ConfigMaps
      the workers use, by name (`contract.names.worker_configmap_names`: its checkpoints and its dead-letter
      and held-record shards), so a worker reads no other workflow's data; no `list`, `watch` or `delete`;
    - a RoleBinding of the account to that Role.

    The caller makes the Workflow their owner, so they go with it."""
    image = image or WorkerImage()
    account = L.worker_service_account_name(workflow)
    own = f"{account}-objects"
    meta = {"name": account, "namespace": namespace, "labels": L.worker_labels(workflow)}
    account_meta = {**meta, "labels": {**dict(image.account_labels), **L.worker_labels(workflow)},
                    **({"annotations": dict(image.account_annotations)} if image.account_annotations else {})}
    subjects = [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": account_meta},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role}, "subjects": subjects},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {**meta, "name": own},
         "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"],
                    "resourceNames": worker_configmap_names(workflow)}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {**meta, "name": own},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": own}, "subjects": subjects},
    ]


def identity_hash(identity: Sequence[dict[str, Any]]) -> str:
    """A digest of `build_worker_identity`'s objects, kept on the worker Deployment
    (``L.IDENTITY_ANNOTATION``): when it differs (an upgrade, new ServiceAccount annotations) the
    operator ensures the identity again before replacing the Deployment."""
    return hashlib.sha256(json.dumps(list(identity), sort_keys=True).encode()).hexdigest()[:16]


# Fields the API server refuses to change on an existing object: a child differing there is deleted and
# created again (RoleBinding: "cannot change roleRef", Kubernetes RBAC docs, "Command-line utilities").
IMMUTABLE_FIELDS: dict[str, tuple[str, ...]] = {"RoleBinding": ("roleRef",)}


def unconverged(want: Mapping[str, Any], have: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: what an existing child ``have`` (its JSON body, camelCase) lacks of the builder's ``want``, as
    a JSON merge patch (RFC 7386); empty when it holds everything ``want`` says (a no-op reconcile writes
    nothing).

    ``metadata``: only ``labels`` and ``annotations``, key by key (keys others added are kept); every other
    top-level field of ``want`` but ``apiVersion``/``kind``, compared as a subset: a map holds each of
    ``want``'s keys with a like value (what the API server defaults in is no difference), a list holds as
    many items, each like ``want``'s; a field that differs is patched whole (a merge patch replaces lists).
    Leave out of ``want`` a field that is not the operator's (a checkpoints ConfigMap's ``data``)."""
    patch: dict[str, Any] = {}
    meta_want, meta_have = want.get("metadata") or {}, have.get("metadata") or {}
    for part in ("labels", "annotations"):
        lacking = {k: v for k, v in (meta_want.get(part) or {}).items() if (meta_have.get(part) or {}).get(k) != v}
        if lacking:
            patch.setdefault("metadata", {})[part] = lacking
    for key, value in want.items():
        if key not in ("apiVersion", "kind", "metadata") and not _holds(have.get(key), value):
            patch[key] = value
    return patch


def built_digest(body: Mapping[str, Any]) -> str:
    """A digest of a builder's output (16 hex characters): what the operator last wrote, remembered."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def deployment_to_replace(want: Mapping[str, Any], have: Mapping[str, Any], written: tuple[str, int] | None) -> bool:
    """Pure: whether the operator replaces the worker Deployment ``have`` (its JSON body) by the builder's
    ``want``. ``written``: what this operator process last wrote to it, (``built_digest`` of that ``want``,
    the Deployment's ``metadata.generation`` that write left), or None (nothing yet).

    Only when ``have`` lacks something of ``want`` (`unconverged`) and either ``want`` changed since that
    write (a new applied spec, a scale, an upgrade) or someone changed the Deployment after it (its
    generation moved past it: a hand edit). A difference that outlives our own write is not ours to
    fight: a mutating admission policy or webhook that alters what we write (an image pull policy, an
    injected sidecar or env var), or a value the API server writes another way (``0.5`` CPU as ``500m``),
    would otherwise be replaced on every reconcile, forever. A generation below the written one is a
    stale view of our own write (the watch has not caught up): nothing to do."""
    if not unconverged(want, have):
        return False
    if written is None:
        return True
    digest, generation = written
    return digest != built_digest(want) or int((have.get("metadata") or {}).get("generation") or 0) > generation


def _holds(have: Any, want: Any) -> bool:
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and all(_holds(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return (isinstance(have, list) and len(have) == len(want)
                and all(_holds(h, w) for h, w in zip(have, want, strict=True)))
    return bool(have == want)


def secret_volume_name(index: int) -> str:
    return f"secret-{index}"


def build_worker_pod_spec(workflow: str, spec_configmap: str, args: list[str], image: WorkerImage,
                          secrets: Sequence[str] = (), serves_health: bool = True) -> dict[str, Any]:
    """The pod spec of the workflow's worker identity: its ServiceAccount, the spec ConfigMap at
    /etc/syncplane, ``secrets`` each mounted read-only (0440, group = the pod's fsGroup) at
    ``SECRETS_MOUNT/<name>`` (optional, so a missing Secret is reported by the program, not a pod stuck
    in ContainerCreating), a private /tmp; ``args`` the container's. With ``serves_health``, the
    health port and its probes (the workers'; a verify Job's container serves none)."""
    probe = {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 10, "timeoutSeconds": 2}
    container: dict[str, Any] = {
        "name": "worker",
        "image": image.image,
        "imagePullPolicy": image.pull_policy,
        "args": args,
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        **({"ports": [{"name": "health", "containerPort": L.HEALTH_PORT}],
            "readinessProbe": probe,
            "livenessProbe": {**probe, "failureThreshold": 6}} if serves_health else {}),
        "resources": {"requests": {"cpu": image.cpu_request, "memory": image.memory_request},
                      "limits": {"cpu": image.cpu_limit, "memory": image.memory_limit}},
        "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "spec", "mountPath": L.SPEC_MOUNT, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"},
                         *({"name": secret_volume_name(i), "mountPath": f"{L.SECRETS_MOUNT}/{s}", "readOnly": True}
                           for i, s in enumerate(secrets))],
    }
    return {
        "serviceAccountName": L.worker_service_account_name(workflow),
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": 60,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "spec", "configMap": {"name": spec_configmap}},
                    {"name": "tmp", "emptyDir": {}},
                    *({"name": secret_volume_name(i),
                       "secret": {"secretName": s, "optional": True, "defaultMode": 0o440}}
                      for i, s in enumerate(secrets))],
    }


def build_worker_deployment(workflow: str, namespace: str, spec_hash: str, generation: int, replicas: int,
                            image: WorkerImage | None = None, uid: str = "",
                            secrets: Sequence[str] = (), identity: str = "") -> dict[str, Any]:
    """The worker Deployment of an applied spec. ``secrets``: the Secret names the spec references,
    each mounted as `build_worker_pod_spec` says. ``identity``: `identity_hash` of the workers'
    identity, kept as an annotation of the Deployment."""
    image = image or WorkerImage()
    selector = {L.WORKFLOW_LABEL: workflow, **L.COMPONENT_WORKER}
    pod_labels = L.worker_labels(workflow)
    args = ["worker", "--workflow", workflow, "--generation", str(generation),
            "--spec-file", f"{L.SPEC_MOUNT}/{L.SPEC_KEY}", "--platform", "kubernetes",
            "--namespace", namespace, "--listen", f"0.0.0.0:{L.HEALTH_PORT}",
            "--secrets-dir", L.SECRETS_MOUNT,
            *(["--workflow-uid", uid] if uid else [])]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": L.worker_deployment_name(workflow), "namespace": namespace, "labels": pod_labels,
                     "annotations": {L.SPEC_HASH_ANNOTATION: spec_hash, L.GENERATION_ANNOTATION: str(generation),
                                     **({L.IDENTITY_ANNOTATION: identity} if identity else {})}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "progressDeadlineSeconds": 600,
            "strategy": {"type": "Recreate"},   # two generations never write at once
            "template": {
                "metadata": {"labels": pod_labels,
                             "annotations": {L.SPEC_HASH_ANNOTATION: spec_hash,
                                             L.GENERATION_ANNOTATION: str(generation)}},
                "spec": build_worker_pod_spec(workflow, L.spec_configmap_name(workflow, spec_hash, generation), args,
                                              image, secrets),
            },
        },
    }


def build_verify_job(workflow: str, namespace: str, request: VerifyRequest, spec_hash: str, running: bool,
                     image: WorkerImage | None = None, uid: str = "", secrets: Sequence[str] = (), *,
                     generation: int) -> dict[str, Any]:
    """The one-off Job of a ``syncplane verify`` on Kubernetes (syncplane.verify.kube): the worker pod
    spec (the workflow's own ServiceAccount, its Secrets mounted, the snapshot ``spec_hash`` of
    ``generation``: see ``spec_configmap_name``) running
    ``syncplane verify-job``; not retried (a second run would find what the first wrote), ended after
    ``activeDeadlineSeconds`` (the server stops waiting earlier), deleted ``ttlSecondsAfterFinished``
    after it ends. The caller makes the Workflow its owner."""
    image = image or WorkerImage()
    labels = {**L.MANAGED_BY, **L.COMPONENT_VERIFY, L.WORKFLOW_LABEL: workflow}
    args = ["verify-job", "--workflow", workflow, "--namespace", namespace,
            "--spec-file", f"{L.SPEC_MOUNT}/{L.SPEC_KEY}", "--secrets-dir", L.SECRETS_MOUNT,
            "--request", request.annotation(), *(["--running"] if running else []),
            *(["--workflow-uid", uid] if uid else [])]
    pod = build_worker_pod_spec(workflow, L.spec_configmap_name(workflow, spec_hash, generation), args, image, secrets,
                                serves_health=False)
    pod["restartPolicy"] = "Never"
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job_name(workflow, request.id), "namespace": namespace, "labels": labels,
                     "annotations": {L.VERIFY_REQUEST_ID_ANNOTATION: request.id}},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": int(MAX_WAIT),
            "ttlSecondsAfterFinished": JOB_TTL,
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }
