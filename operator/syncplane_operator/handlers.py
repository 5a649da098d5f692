"""kopf registrations, kept thin: every body lives in reconciler.py.

Event-driven: a Workflow is reconciled when a watch event of it or of one of its
children (worker Deployment, pods, heartbeat Leases, each watched once by kopf)
queues it, and otherwise only every SYNCPLANE_OPERATOR_RESYNC seconds (60), for
what no event signals (a heartbeat going stale), or when an automatic restart
falls due; a Workflow at rest (desired STOPPED, STOPPED) waits for events alone.
A deleted Workflow that had workers is released by the same reconcile once they
drained (the operator's own finalizer: reconciler.finalize).
One work queue with SYNCPLANE_OPERATOR_WORKERS (8) reconcile workers serves
every Workflow (wakers.ReconcileQueue): no task per Workflow.

Run: `kopf run -m syncplane_operator.handlers --all-namespaces` (or
`syncplane operator`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from collections.abc import Hashable, Mapping
from typing import Any

import kopf

from syncplane.contract import names as L
from syncplane.kubeclient import api_client as kube_api_client
from syncplane.lifecycle import DEFAULT_POLICY, Policy
from syncplane_operator.builders import WorkerImage
from syncplane_operator.leader import LeaderElection
from syncplane_operator.reconciler import Clients, patch_status, post_transition, reconcile
from syncplane_operator.wakers import ReconcileQueue

GROUP, VERSION, PLURAL = "syncplane.io", "v1", "workflows"
WORKERS = {L.WORKFLOW_LABEL: kopf.PRESENT}
# worker pods only: a verify Job's pod carries the workflow label too, but is no worker
WORKER_PODS: dict[str, Any] = {L.WORKFLOW_LABEL: kopf.PRESENT, L.COMPONENT_LABEL: L.COMPONENT_WORKER[L.COMPONENT_LABEL]}
LOG = logging.getLogger("syncplane.operator")
DEFAULT_RESYNC = 60.0
DEFAULT_WORKERS = 8


def resync_from_environment() -> float:
    """SYNCPLANE_OPERATOR_RESYNC: seconds between reconciles of a Workflow that no event woke (60)."""
    return float(os.environ.get("SYNCPLANE_OPERATOR_RESYNC", DEFAULT_RESYNC))


def policy_from_environment() -> Policy:
    """The status rules' seconds (lifecycle.Policy): SYNCPLANE_DEGRADED_AFTER (60),
    SYNCPLANE_RESTART_BACKOFF (5) and SYNCPLANE_RESTART_BACKOFF_CAP (300)."""
    env = os.environ.get
    return Policy(degraded_after=float(env("SYNCPLANE_DEGRADED_AFTER", DEFAULT_POLICY.degraded_after)),
                  restart_backoff=float(env("SYNCPLANE_RESTART_BACKOFF", DEFAULT_POLICY.restart_backoff)),
                  restart_backoff_cap=float(env("SYNCPLANE_RESTART_BACKOFF_CAP",
                                                DEFAULT_POLICY.restart_backoff_cap)))


def string_map_from_environment(variable: str) -> tuple[tuple[str, str], ...]:
    """A JSON object of strings in ``variable`` (the chart renders `worker.serviceAccount.annotations`
    and `.labels` so), as sorted (key, value) pairs; unset or empty: none. Raises ValueError naming the
    variable when it is not such an object (the operator does not start)."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{variable} is not JSON: {exc}") from exc
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{variable} must be a JSON object of strings")
    return tuple(sorted(value.items()))


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    # kopf's own bookkeeping goes into annotations under our prefix, not status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=L.PREFIX)
    settings.persistence.diffbase_storage = NoDiffBase()
    # No kopf handler needs a finalizer (no on.delete, daemon or timer), so kopf adds none. The operator
    # owns L.FINALIZER itself (reconciler.hold_for_drain / finalize): only a Workflow that ever had workers
    # carries it. kopf's own name must differ from ours: kopf removes its finalizer from any object that
    # no handler of its needs one for.
    settings.persistence.finalizer = f"{L.PREFIX}/kopf-finalizer"
    # Pinned timeouts: a watch that silently stalls is re-established.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    # Only warnings and errors of kopf's own logs become Events: the transitions are posted explicitly
    # (reconciler.post_transition), and a handler's "succeeded." is not news.
    settings.posting.level = logging.WARNING
    logging.getLogger("kopf.objects").addFilter(routine_at_debug)
    # The Helm chart installs the CRD first: without scanning, no cluster-wide CRD/Namespace read is needed.
    settings.scanning.disabled = os.environ.get("SYNCPLANE_OPERATOR_SCANNING", "true") == "false"
    logging.getLogger().setLevel(os.environ.get("SYNCPLANE_LOG_LEVEL", "INFO").upper())
    from kubernetes_asyncio import client

    api_client = await kube_api_client()
    memo.api = Clients(core=client.CoreV1Api(api_client), apps=client.AppsV1Api(api_client),
                       rbac=client.RbacAuthorizationV1Api(api_client), custom=client.CustomObjectsApi(api_client),
                       batch=client.BatchV1Api(api_client))
    memo.api_client = api_client
    memo.policy = policy_from_environment()
    memo.resync = resync_from_environment()
    env = os.environ.get
    memo.image = WorkerImage(image=env("SYNCPLANE_WORKER_IMAGE", WorkerImage.image),
                             pull_policy=env("SYNCPLANE_WORKER_IMAGE_PULL_POLICY", WorkerImage.pull_policy),
                             worker_role=env("SYNCPLANE_WORKER_ROLE", WorkerImage.worker_role),
                             account_annotations=string_map_from_environment("SYNCPLANE_WORKER_SA_ANNOTATIONS"),
                             account_labels=string_map_from_environment("SYNCPLANE_WORKER_SA_LABELS"))
    # With replicas, only the Lease holder gets past startup (kopf starts no watch before then).
    memo.leader = LeaderElection.from_environment(api_client)
    if memo.leader is not None:
        await memo.leader.acquire()
        memo.leader_task = asyncio.create_task(memo.leader.keep())
    # kopf's indexes are live objects, handed to handlers as keyword arguments: the queue's workers read them.
    memo.indexes = {name: kwargs[name] for name in ("worker_deployments", "worker_pods", "worker_leases")}
    memo.reconciles = ReconcileQueue(functools.partial(_reconcile_once, memo), memo.resync,
                                     int(env("SYNCPLANE_OPERATOR_WORKERS", DEFAULT_WORKERS)))


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff-base: every Workflow's essence is empty, so kopf sees no change to hand to a handler
    and writes nothing. The diff-base serves on.create/on.update/on.resume/on.field handlers, and this
    operator has none (the reconcile is level-based, a deletion included: reconciler.finalize). The
    default (an annotation holding the Workflow's spec as JSON) cost a PATCH of every Workflow at
    its first sight and at each spec edit, a deep copy of each watch event's body, and a second copy
    of the spec in every body kept."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return {}

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return {}

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def routine_at_debug(record: logging.LogRecord) -> bool:
    """kopf logs each handler's success at INFO; each watch event of a worker runs one: routine, DEBUG."""
    if record.levelno == logging.INFO and str(record.msg).endswith(" succeeded."):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(logging.DEBUG)
    return True


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod: the service account; elsewhere: $KUBECONFIG (as for the workers).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    """Release what `configure` made, and only that: startup may have failed part way (the API
    client not made, the leader Lease never acquired)."""
    reconciles = memo.get("reconciles")
    if reconciles is not None:
        await reconciles.stop()
    task = memo.get("leader_task")
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await memo.leader.release()  # held: keep() was running
    api_client = memo.get("api_client")
    if api_client is not None:
        await api_client.close()


def _key(namespace: str | None, labels: Any) -> tuple[str | None, str]:
    return namespace, str(labels.get(L.WORKFLOW_LABEL, ""))


# The handlers are coroutines: kopf runs a plain function in a thread pool, one hop per watch event.
@kopf.index("apps", "v1", "deployments", labels=WORKERS)
async def worker_deployments(namespace: str | None, labels: Any, body: kopf.Body, **_: Any) -> Any:
    return {_key(namespace, labels): kept(body)}


@kopf.index("", "v1", "pods", labels=WORKER_PODS)
async def worker_pods(namespace: str | None, labels: Any, body: kopf.Body, **_: Any) -> Any:
    return {_key(namespace, labels): kept(body)}


@kopf.index("coordination.k8s.io", "v1", "leases", labels=WORKERS)
async def worker_leases(namespace: str | None, labels: Any, body: kopf.Body, **_: Any) -> Any:
    return {_key(namespace, labels): kept(body)}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def workflow_changed(memo: Any, event: Mapping[str, Any], body: kopf.Body, namespace: str | None, name: str,
                     **_: Any) -> None:
    """Every watch event of a Workflow (the first listing included) queues its reconcile with its
    newest body."""
    key = (namespace, name)
    # Started here, not at startup: kopf.event (a transition's Event) needs the event queue that kopf sets in
    # the context of its per-object processing, which the workers' tasks inherit when created here.
    memo.reconciles.start()
    if event.get("type") == "DELETED":
        memo.reconciles.forget(key)
    else:
        memo.reconciles.update(key, kept(body))


#: Annotations that copy a whole object as JSON, never read here: `kubectl apply`'s, and the diff-base
#: that operators before :class:`NoDiffBase` wrote on every Workflow.
COPIES = frozenset({"kubectl.kubernetes.io/last-applied-configuration", f"{L.PREFIX}/last-handled-configuration"})


def kept(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the queue and the indexes keep of a body: all but ``metadata.managedFields`` (the API server's
    field-ownership bookkeeping, often larger than the rest and never read here) and the annotations
    in :data:`COPIES` (each as large as the spec). A new dict: kopf's own body is left as it is."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    annotations = metadata.get("annotations")
    if annotations and not COPIES.isdisjoint(annotations):
        metadata["annotations"] = {k: v for k, v in annotations.items() if k not in COPIES}
    return {**body, "metadata": metadata}


@kopf.on.event("apps", "v1", "deployments", labels=WORKERS)
@kopf.on.event("", "v1", "pods", labels=WORKER_PODS)
@kopf.on.event("coordination.k8s.io", "v1", "leases", labels=WORKERS)
async def worker_changed(memo: Any, namespace: str | None, labels: Any, **_: Any) -> None:
    memo.reconciles.wake(_key(namespace, labels))


async def _reconcile_once(memo: Any, key: Hashable, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """One reconcile of a Workflow's newest body (the queue never runs two of one Workflow at once);
    the status patch it wrote, if any."""
    # Reconciles of a Workflow must not overlap. (When a timer ran beside the change handlers, one that
    # read the body before a Start but the indexes after it decided STOPPED -> STOPPING and scaled the
    # new workers to 0.) With the queue waiting for a reconcile's own status write to come back before
    # reconciling again, whatever created the children the indexes show ran before this call's body.
    indexes = memo.indexes
    deployments, pods, leases = (indexes[i].get(key, []) for i in
                                 ("worker_deployments", "worker_pods", "worker_leases"))
    live = kopf.Body(body)  # type: ignore[arg-type]
    result = await reconcile(live, LOG, memo.api, memo.image, deployments, pods, leases, policy=memo.policy)
    if result.changes:
        await patch_status(memo.api, live, result.changes)
    post_transition(live, result.transition, LOG)
    return result.changes or None
