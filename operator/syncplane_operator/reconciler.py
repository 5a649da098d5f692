"""The Kubernetes driver of the lifecycle core.

Level-based: every call recomputes from the Workflow, the snapshot ConfigMap
and what the indexes show (Deployment, pods, heartbeat Leases), then creates
or scales children and returns the status patch and the transition to post.
Called by the reconcile queue (handlers.py, wakers.py) when an event of the Workflow or
of its children wakes it, and on a slow resync.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from syncplane.contract import names as L
from syncplane.contract.names import VERIFY_REQUEST_ANNOTATION
from syncplane.credentials import secret_references
from syncplane.lifecycle import DEFAULT_POLICY, Policy
from syncplane.lifecycle import reconcile as decide
from syncplane.lifecycle.drift import LIFECYCLE_FIELDS, spec_hash
from syncplane.model.convert import spec_from_dict, spec_to_dict
from syncplane.model.kube import status_patch, workflow_from_body
from syncplane.proto.enums import phase_name
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.verify.kube import VerifyRequest, parse_outcome, result_configmap_name
from syncplane.verify.run import workers_running
from syncplane_operator.builders import (
    IMMUTABLE_FIELDS,
    WorkerImage,
    build_checkpoint_configmap,
    build_spec_configmap,
    build_verify_job,
    build_worker_deployment,
    build_worker_identity,
    built_digest,
    deployment_to_replace,
    identity_hash,
    unconverged,
)
from syncplane_operator.observe import observe
from syncplane_operator.telemetry import observed_reconcile


@dataclass(frozen=True)
class Transition:
    """A phase change, posted as one Kubernetes Event."""

    type: str      # Normal | Warning
    reason: str    # the new phase, e.g. Running
    message: str   # "STOPPED -> STARTING" (an ERROR adds its reason and message)


@dataclass(frozen=True)
class Reconciled:
    changes: dict[str, Any]               # the status merge patch; empty for a no-op
    transition: Transition | None = None


@dataclass
class Clients:
    core: Any
    apps: Any
    rbac: Any = None
    custom: Any = None
    batch: Any = None
    # Snapshot ConfigMaps are immutable: cache them by name.
    snapshots: dict[str, pb.WorkflowSpec] = field(default_factory=dict)
    # Worker Deployment uid → what this process last wrote to it (`builders.deployment_to_replace`).
    written: dict[str, tuple[str, int]] = field(default_factory=dict)


async def load_snapshot(api: Clients, namespace: str, workflow: str, spec_hash: str,
                        generation: int) -> pb.WorkflowSpec | None:
    """The applied spec of the run that ``generation`` started (None: no run, or its snapshot is gone);
    a run started by an operator before per-run snapshots has the snapshot named by the hash alone."""
    if not spec_hash:
        return None
    from kubernetes_asyncio.client.exceptions import ApiException

    for name in L.spec_configmap_names(workflow, spec_hash, generation):
        key = f"{namespace}/{name}"
        if key in api.snapshots:
            return api.snapshots[key]
        try:
            cm = await api.core.read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                continue
            raise
        api.snapshots[key] = spec_from_dict(json.loads(cm.data[L.SPEC_KEY]))
        return api.snapshots[key]
    return None


async def prune_snapshots(api: Clients, namespace: str, workflow: str, in_use: Iterable[str]) -> None:
    """Delete the workflow's spec snapshot ConfigMaps but those ``in_use`` (names) and the newest
    ``L.KEEP_SPEC_SNAPSHOTS``: one is made per run, so they would otherwise pile up. Called after a snapshot
    is made. A snapshot already gone is fine; other API errors are raised.

    Deleted by the operator rather than by the garbage collector: a snapshot must outlive the worker
    Deployment's ReplicaSets (a stopped workflow's applied spec is read for drift and by verify Jobs, and a
    verify Job's own snapshot has no ReplicaSet), and owning it by a ReplicaSet would need another watch and
    a patch once the Deployment controller made one. The chart narrows the operator's ConfigMap deletes to
    these names (validatingadmissionpolicy.yaml)."""
    from kubernetes_asyncio.client.exceptions import ApiException

    selector = ",".join(f"{k}={v}" for k, v in {**L.COMPONENT_WORKER, L.WORKFLOW_LABEL: workflow}.items())
    listed = await api.core.list_namespaced_config_map(namespace, label_selector=selector)
    snapshots = {str(cm.metadata.name): int((cm.metadata.annotations or {}).get(L.GENERATION_ANNOTATION) or 0)
                 for cm in listed.items}
    for name in L.stale_spec_snapshots(workflow, snapshots, in_use):
        try:
            await api.core.delete_namespaced_config_map(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        api.snapshots.pop(f"{namespace}/{name}", None)


async def _create(call: Any, namespace: str, body: dict[str, Any]) -> bool:
    """Create a child; False when it was already there (children are idempotent)."""
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await call(namespace, body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        return False
    return True


@observed_reconcile
async def reconcile(body: kopf.Body, logger: Any, api: Clients, image: WorkerImage,
                    deployments: Iterable[Mapping[str, Any]], pods: Iterable[Mapping[str, Any]],
                    leases: Iterable[Mapping[str, Any]], policy: Policy = DEFAULT_POLICY) -> Reconciled:
    """Create or scale the children; the status patch to write and the transition to post (none when
    the phase stays: a no-op reconcile writes nothing)."""
    name, namespace = body.metadata.name, body.metadata.namespace
    if not name or not namespace:  # a namespaced resource always has both: say so if one does not
        raise kopf.PermanentError(f"a Workflow without a name or namespace ({name!r}, {namespace!r})")
    if body.metadata.get("deletionTimestamp"):
        await finalize(api, body, deployments, pods)
        return Reconciled({})
    try:
        wf = workflow_from_body(body)
    except Exception as exc:  # the CRD schema should make this unreachable
        raise kopf.PermanentError(f"invalid Workflow: {exc}") from exc
    applied = await load_snapshot(api, namespace, name, wf.status.applied_spec_hash, wf.status.applied_generation)
    deployment = next(iter(deployments), None)
    now = datetime.now(UTC)
    observed = observe(dict(deployment) if deployment else None, [dict(p) for p in pods],
                       [dict(x) for x in leases], wf.status.applied_generation, now)
    outcome = decide(wf, applied, observed, now, policy)
    status = outcome.status
    if (outcome.apply is not None or outcome.target_workers > 0) and not await hold_for_drain(api, body):
        return Reconciled({})  # deleted meanwhile: no children for a Workflow that is gone
    if outcome.restarted:
        logger.info("workflow %s/%s: automatic restart %d after %s", namespace, name, status.auto_restart.count,
                    wf.status.last_error.reason)
    if outcome.apply is not None:
        cm = build_spec_configmap(name, namespace, applied_view_resource(outcome.apply), status.applied_spec_hash,
                                  status.applied_generation)
        kopf.adopt(cm, owner=body)
        await _create(api.core.create_namespaced_config_map, namespace, cm)
        await prune_snapshots(api, namespace, name, [cm["metadata"]["name"]])
        await ensure_checkpoints(api, body)
        applied = outcome.apply
    await converge(api, body, deployment, outcome.target_workers, status, image,
                   list(secret_references(applied)) if applied is not None else [])
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await ensure_verify_job(api, body, wf, applied, image)
    except ApiException as exc:   # a verify that cannot start never holds up the workflow's own reconcile
        kopf.warn(body, reason="VerifyNotStarted", message=f"cannot create the verify Job: HTTP {exc.status} "
                  f"{exc.reason}")
        logger.warning("workflow %s/%s: cannot create the verify Job: HTTP %s %s", namespace, name, exc.status,
                       exc.reason)
    changes = status_patch(body.get("status") or {}, status)
    return Reconciled(changes, transition(wf.status.phase, status))


def transition(before: int, status: pb.WorkflowStatus) -> Transition | None:
    """Pure: the Event of a phase change, None when the phase stays.

    A Workflow without a status is STOPPED (the state every Workflow starts in, DESIGN.md §1: it has no
    workers), so the first status of one created STOPPED is no transition and posts no Event: a cold start
    over 1,000 such Workflows wrote 1,000 "created: STOPPED" Events (issue 17: "each transition writes exactly
    one Event"), about as much API server work as their 1,000 status writes. One created RUNNING is posted
    ``STOPPED -> STARTING``, as a start of an existing one is."""
    if status.phase == (before or pb.PHASE_STOPPED):
        return None
    message = f"{phase_name(before or pb.PHASE_STOPPED)} -> {phase_name(status.phase)}"
    if status.phase == pb.PHASE_ERROR:
        return Transition("Warning", phase_name(status.phase).title(),
                          f"{message}: {status.last_error.reason}: {status.last_error.message}")
    return Transition("Normal", phase_name(status.phase).title(), message)


def post_transition(body: kopf.Body, change: Transition | None, logger: Any) -> None:
    """One Event per transition (kopf posts it in the background); logged at INFO."""
    if change is None:
        return
    kopf.event(body, type=change.type, reason=change.reason, message=change.message)
    logger.info("workflow %s/%s: %s", body.metadata.namespace, body.metadata.name, change.message)


async def patch_status(api: Clients, body: kopf.Body, changes: Mapping[str, Any]) -> None:
    """A merge patch of the status subresource (the operator owns ``status``)."""
    await api.custom.patch_namespaced_custom_object_status(
        "syncplane.io", "v1", str(body.metadata.namespace), "workflows", str(body.metadata.name),
        {"status": dict(changes)}, _content_type="application/merge-patch+json")


def applied_view_resource(spec: pb.WorkflowSpec) -> dict[str, Any]:
    """The snapshot as users write it (camelCase): what the workers run, and the trace context of the
    Start or Restart that applied it (``traceParent``: their first pass joins that trace, as on the
    embedded backend). The other lifecycle fields (desired state, restart nonce) are not the run's."""
    data = spec_to_dict(spec)
    for name in LIFECYCLE_FIELDS:  # the same rule as drift: lifecycle fields are not what workers run
        if name != "trace_parent":
            data.pop(spec.DESCRIPTOR.fields_by_name[name].json_name, None)
    return data


async def ensure_checkpoints(api: Clients, owner: kopf.Body) -> None:
    """On a start, before any worker runs: the workers' checkpoints ConfigMap, owned by the
    Workflow. Created if missing; one already there keeps its data (checkpoints outlive stop/start: they
    are the workers') and gets the builder's labels back (:func:`ensure_child`)."""
    namespace = str(owner.metadata.namespace)
    cm = build_checkpoint_configmap(str(owner.metadata.name), namespace)
    kopf.adopt(cm, owner=owner)
    await ensure_child(api, namespace, cm, owned={k: v for k, v in cm.items() if k != "data"})


async def ensure_worker_identity(api: Clients, owner: kopf.Body, image: WorkerImage) -> None:
    """Before a worker Deployment (or a verify Job) is created or replaced: the workflow's own
    ServiceAccount, its RoleBinding to the chart's worker Role, and its own Role (its ConfigMaps by name)
    with its RoleBinding (`builders.build_worker_identity`), owned by the Workflow. Each is created if
    missing and brought back to the builder's output if it differs (:func:`ensure_child`): a Role whose
    name list an upgrade changed, ServiceAccount annotations set by a later `helm upgrade` (workload
    identity) reach the Workflows that exist."""
    namespace = str(owner.metadata.namespace)
    for body in build_worker_identity(str(owner.metadata.name), namespace, image.worker_role, image):
        kopf.adopt(body, owner=owner)
        await ensure_child(api, namespace, body)


def _child_calls(api: Clients, kind: str) -> tuple[Any, Any, Any, Any]:
    """(create, read, patch, delete) of a child kind; delete None where a patch always does (each call
    named in full: scripts/chart-check.py finds the operator's grants by them)."""
    core, rbac = api.core, api.rbac
    return {
        "ServiceAccount": (core.create_namespaced_service_account, core.read_namespaced_service_account,
                           core.patch_namespaced_service_account, None),
        "ConfigMap": (core.create_namespaced_config_map, core.read_namespaced_config_map,
                      core.patch_namespaced_config_map, None),
        "Role": (rbac.create_namespaced_role, rbac.read_namespaced_role, rbac.patch_namespaced_role, None),
        "RoleBinding": (rbac.create_namespaced_role_binding, rbac.read_namespaced_role_binding,
                        rbac.patch_namespaced_role_binding, rbac.delete_namespaced_role_binding),
    }[kind]


async def ensure_child(api: Clients, namespace: str, body: dict[str, Any],
                       owned: Mapping[str, Any] | None = None) -> None:
    """Create the child ``body`` (a ServiceAccount, ConfigMap, Role or RoleBinding); if it exists, converge
    it: a JSON merge patch of what it lacks of ``owned`` (``body`` unless told: the fields the operator
    owns), nothing when it holds them all (`builders.unconverged`). A child differing in a field the API
    server will not change (`builders.IMMUTABLE_FIELDS`) is deleted and created again. API errors but
    409 on create and 404 on delete are raised."""
    from kubernetes_asyncio.client.exceptions import ApiException

    create, read, patch, delete = _child_calls(api, body["kind"])
    if await _create(create, namespace, body):
        return
    name = body["metadata"]["name"]
    have = api.core.api_client.sanitize_for_serialization(await read(name, namespace))
    changes = unconverged(owned if owned is not None else body, have)
    if not changes:
        return
    if delete is not None and set(changes) & set(IMMUTABLE_FIELDS.get(body["kind"], ())):
        try:
            await delete(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        await _create(create, namespace, body)
        return
    await patch(name, namespace, changes, _content_type="application/merge-patch+json")


async def converge(api: Clients, owner: kopf.Body, deployment: Mapping[str, Any] | None, target: int,
                   status: pb.WorkflowStatus, image: WorkerImage, secrets: Sequence[str] = ()) -> None:
    """Create, scale or replace the worker Deployment; ``secrets`` (the applied spec's references)
    are mounted into its pods."""
    name, namespace = owner.metadata.name, owner.metadata.namespace
    if target == 0:
        if deployment is not None and (deployment.get("spec") or {}).get("replicas", 1) != 0:
            await api.apps.patch_namespaced_deployment(L.worker_deployment_name(str(name)), namespace,
                                                       {"spec": {"replicas": 0}})
        return
    identity = identity_hash(build_worker_identity(str(name), str(namespace), image.worker_role, image))
    want = build_worker_deployment(str(name), str(namespace), status.applied_spec_hash, status.applied_generation,
                                   target, image, uid=str(owner.metadata.uid or ""), secrets=secrets,
                                   identity=identity)
    kopf.adopt(want, owner=owner)
    if deployment is None:
        await ensure_worker_identity(api, owner, image)
        await _create(api.apps.create_namespaced_deployment, str(namespace), want)
        return
    # Whatever the Deployment lacks of the builder's output is brought back by a replace: a new applied spec
    # (its hash), a scale, a Deployment from before per-workflow identities (another account), an identity
    # changed since (an upgrade changing the workers' Role, new ServiceAccount annotations: ensured first),
    # a pod template field an upgrade changed or someone edited (image, mounts, probes, resources). What the
    # API server defaults in is no difference (`builders.unconverged`), so a no-op reconcile writes nothing;
    # nor does a difference that outlives our own write (a mutating admission policy: `deployment_to_replace`).
    uid = str((deployment.get("metadata") or {}).get("uid") or "")
    if deployment_to_replace(want, deployment, api.written.get(uid)):
        await ensure_worker_identity(api, owner, image)
        done = await api.apps.replace_namespaced_deployment(L.worker_deployment_name(str(name)), namespace, want)
        api.written[uid] = (built_digest(want), int(done.metadata.generation or 0))


async def ensure_verify_job(api: Clients, owner: kopf.Body, wf: pb.Workflow, applied: pb.WorkflowSpec | None,
                            image: WorkerImage) -> None:
    """The Job of the verify the server asked for (annotation ``verify.syncplane.io/request``), unless it
    exists (409) or its outcome is already written (``<workflow>-verify``: a Job removed after its TTL is
    not run again). It compares the spec the workers run while they run, else the current spec (its
    snapshot ConfigMap made here, as a start would), as the workflow's own identity."""
    from kubernetes_asyncio.client.exceptions import ApiException

    request = VerifyRequest.parse((owner.metadata.annotations or {}).get(VERIFY_REQUEST_ANNOTATION))
    if request is None:
        return
    name, namespace = str(owner.metadata.name), str(owner.metadata.namespace)
    try:
        done = await api.core.read_namespaced_config_map(result_configmap_name(name), namespace)
        if parse_outcome(done.data, request.id) is not None:
            return
    except ApiException as exc:
        if exc.status != 404:
            raise
    running = workers_running(wf) and applied is not None
    spec = applied if running and applied is not None else wf.spec
    hash_ = wf.status.applied_spec_hash if running else spec_hash(spec)
    generation = wf.status.applied_generation if running else wf.generation
    if not running:
        cm = build_spec_configmap(name, namespace, applied_view_resource(spec), hash_, generation)
        kopf.adopt(cm, owner=owner)
        await _create(api.core.create_namespaced_config_map, namespace, cm)
        await prune_snapshots(api, namespace, name, [cm["metadata"]["name"], *L.spec_configmap_names(
            name, wf.status.applied_spec_hash, wf.status.applied_generation)])
    await ensure_worker_identity(api, owner, image)
    job = build_verify_job(name, namespace, request, hash_, running, image, uid=str(owner.metadata.uid or ""),
                           secrets=list(secret_references(spec)), generation=generation)
    kopf.adopt(job, owner=owner)
    await _create(api.batch.create_namespaced_job, namespace, job)


async def finalize(api: Clients, owner: kopf.Body, deployments: Iterable[Mapping[str, Any]],
                   pods: Iterable[Mapping[str, Any]]) -> None:
    """A Workflow being deleted: before it goes, its workers drain (a delete loses nothing: they stop on
    SIGTERM with their checkpoints still there); owner references then let the garbage collector remove
    every child. Scales the worker Deployment to 0 and, once none of its pods is left (``pods``: kopf's
    index; each pod's watch events queue the next call), removes :data:`L.FINALIZER`. Nothing when the
    Workflow has no such finalizer (it never had workers: it goes at once, its children after it).

    Raises ``kopf.TemporaryError`` when the Workflow changed between its body and the patch (409)."""
    finalizers = list(owner.metadata.get("finalizers") or [])
    if L.FINALIZER not in finalizers:
        return
    await converge(api, owner, next(iter(deployments), None), 0, pb.WorkflowStatus(), WorkerImage())
    if any(draining(pod) for pod in pods):
        return
    await _set_finalizers(api, owner, [f for f in finalizers if f != L.FINALIZER])


def draining(pod: Mapping[str, Any]) -> bool:
    """Pure: whether a worker pod still holds up its Workflow's deletion: it may still be running or
    stopping (terminating pods included). A pod that has ended (phase ``Succeeded`` or ``Failed``, e.g.
    evicted, or left by a node's graceful shutdown) runs nothing and is not deleted by scaling to 0:
    waiting for it would hold the Workflow, and so its ReplicaSet's garbage collection, forever."""
    return (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")


async def hold_for_drain(api: Clients, owner: kopf.Body) -> bool:
    """Before the operator first creates a Workflow's workers (and the checkpoints they run with):
    :data:`L.FINALIZER`, so that its deletion waits for :func:`finalize`. A Workflow never started has
    none (the spec snapshot of a verify Job needs none: the garbage collector removes it), so a cold
    start over stopped Workflows writes only their status (and one Event each). Nothing when it is there
    already.

    Returns False when the Workflow is gone (404): nothing may then be created for it. Raises
    ``kopf.TemporaryError`` on a 409 (see :func:`finalize`)."""
    finalizers = list(owner.metadata.get("finalizers") or [])
    return L.FINALIZER in finalizers or await _set_finalizers(api, owner, [*finalizers, L.FINALIZER])


async def _set_finalizers(api: Clients, owner: kopf.Body, finalizers: list[str]) -> bool:
    """A merge patch of the Workflow's ``metadata.finalizers``, on the condition that it is still at the body's
    ``resourceVersion`` (a merge patch replaces the whole list: another controller's finalizer added
    meanwhile must not be lost). A 409 is ``kopf.TemporaryError``: the queue retries on the newer body that
    the watch brings. Returns False when the Workflow is already gone (404), True when patched."""
    from kubernetes_asyncio.client.exceptions import ApiException

    meta = owner.metadata
    try:
        await api.custom.patch_namespaced_custom_object(
            "syncplane.io", "v1", str(meta.namespace), "workflows", str(meta.name),
            {"metadata": {"finalizers": finalizers, "resourceVersion": meta.get("resourceVersion")}},
            _content_type="application/merge-patch+json")
    except ApiException as exc:
        if exc.status == 409:
            raise kopf.TemporaryError(f"{meta.namespace}/{meta.name} changed meanwhile: its finalizers are "
                                      "written again from its newer body", delay=1) from exc
        if exc.status != 404:
            raise
        return False
    return True
