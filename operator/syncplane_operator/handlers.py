"""kopf registrations, kept thin: every body lives in reconciler.py.

Run: `kopf run -m syncplane_operator.handlers --all-namespaces` (or
`syncplane operator`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from syncplane.kubeclient import api_client as kube_api_client
from syncplane.lifecycle import DEFAULT_POLICY, Policy
from syncplane_operator import labels as L
from syncplane_operator.builders import WorkerImage
from syncplane_operator.leader import LeaderElection
from syncplane_operator.reconciler import Clients, drain_for_delete, reconcile

GROUP, VERSION, PLURAL = "syncplane.io", "v1", "workflows"
WORKERS = {L.WORKFLOW_LABEL: kopf.PRESENT}
TIMER_INTERVAL = float(os.environ.get("SYNCPLANE_OPERATOR_INTERVAL", "1.0"))


def policy_from_environment() -> Policy:
    """The status rules' seconds (lifecycle.Policy): SYNCPLANE_DEGRADED_AFTER (60),
    SYNCPLANE_RESTART_BACKOFF (5) and SYNCPLANE_RESTART_BACKOFF_CAP (300)."""
    env = os.environ.get
    return Policy(degraded_after=float(env("SYNCPLANE_DEGRADED_AFTER", DEFAULT_POLICY.degraded_after)),
                  restart_backoff=float(env("SYNCPLANE_RESTART_BACKOFF", DEFAULT_POLICY.restart_backoff)),
                  restart_backoff_cap=float(env("SYNCPLANE_RESTART_BACKOFF_CAP",
                                                DEFAULT_POLICY.restart_backoff_cap)))


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own bookkeeping goes into annotations under our prefix, not status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=L.PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=L.PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{L.PREFIX}/finalizer"
    # Pinned timeouts: a watch that silently stalls is re-established.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30
    settings.posting.level = 20
    # The Helm chart installs the CRD first: without scanning, no cluster-wide CRD/Namespace read is needed.
    settings.scanning.disabled = os.environ.get("SYNCPLANE_OPERATOR_SCANNING", "true") == "false"
    logging.getLogger().setLevel(os.environ.get("SYNCPLANE_LOG_LEVEL", "INFO").upper())
    from kubernetes_asyncio import client

    api_client = await kube_api_client()
    memo.api = Clients(core=client.CoreV1Api(api_client), apps=client.AppsV1Api(api_client),
                       rbac=client.RbacAuthorizationV1Api(api_client))
    memo.api_client = api_client
    memo.policy = policy_from_environment()
    memo.locks = {}
    env = os.environ.get
    memo.image = WorkerImage(image=env("SYNCPLANE_WORKER_IMAGE", WorkerImage.image),
                             pull_policy=env("SYNCPLANE_WORKER_IMAGE_PULL_POLICY", WorkerImage.pull_policy),
                             worker_role=env("SYNCPLANE_WORKER_ROLE", WorkerImage.worker_role))
    # With replicas, only the Lease holder gets past startup (kopf starts no watch before then).
    memo.leader = LeaderElection.from_environment(api_client)
    if memo.leader is not None:
        await memo.leader.acquire()
        memo.leader_task = asyncio.create_task(memo.leader.keep())


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # In a pod: the service account; elsewhere: $KUBECONFIG (as for the workers).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    """Release what `configure` made, and only that: startup may have failed part way (the API
    client not made, the leader Lease never acquired)."""
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


@kopf.index("apps", "v1", "deployments", labels=WORKERS)
def worker_deployments(namespace: str | None, labels: Any, body: kopf.Body, **_: Any) -> Any:
    return {_key(namespace, labels): dict(body)}


@kopf.index("", "v1", "pods", labels=WORKERS)
def worker_pods(namespace: str | None, labels: Any, body: kopf.Body, **_: Any) -> Any:
    return {_key(namespace, labels): dict(body)}


@kopf.index("coordination.k8s.io", "v1", "leases", labels=WORKERS)
def worker_leases(namespace: str | None, labels: Any, body: kopf.Body, **_: Any) -> Any:
    return {_key(namespace, labels): dict(body)}


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
@kopf.timer(GROUP, VERSION, PLURAL, interval=TIMER_INTERVAL)
async def workflow(body: kopf.Body, patch: kopf.Patch, logger: Any, memo: Any, namespace: str | None,
                   name: str, **kwargs: Any) -> None:
    key = (namespace, name)
    # One reconcile of a Workflow at a time. kopf runs its timer beside the change handlers, each with
    # the live body as it was when that call began: without this, a timer that read the body before a
    # Start but the indexes after the Start's handler created the Deployment decided STOPPED -> STOPPING
    # and scaled the new workers to 0. Under the lock, whatever created the children the indexes show
    # ran before this call read the body, and kopf updates the live body before any handler of an event.
    async with memo.locks.setdefault(key, asyncio.Lock()):
        indexes = [kwargs[i] for i in ("worker_deployments", "worker_pods", "worker_leases")]
        deployments, pods, leases = (ix.get(key, []) for ix in indexes)
        await reconcile(body, patch, logger, memo.api, memo.image, deployments, pods, leases, policy=memo.policy)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete_workflow(body: kopf.Body, memo: Any, namespace: str | None, name: str, **kwargs: Any) -> None:
    key = (namespace, name)
    memo.locks.pop(key, None)
    pods = kwargs["worker_pods"]   # kopf's index: live, it follows the pods as they go
    await drain_for_delete(memo.api, body, kwargs["worker_deployments"].get(key, []),
                           lambda: len(list(pods.get(key, []))))
