"""The Kubernetes platform: workers are the pods of the Deployment the operator makes per Workflow.

- Secrets: the Secrets the spec references, which the operator mounts into the pod
  (``<secrets-dir>/<name>/<key>``; the worker's identity cannot read Secrets).
- State: ConfigMaps in the workflow's namespace, owned by the Workflow, so that they outlive the
  pod (:mod:`syncplane.state.kube_checkpoints`, :mod:`syncplane.state.kube_records`); only the
  echo memory is in a pod-local SQLite file.
- Heartbeat: a coordination.k8s.io Lease per worker pod (:class:`LeaseHeartbeat`). renewTime is
  liveness; the annotation carries the same JSON report as the embedded /status. The operator
  watches these Leases; nobody dials the pod.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from syncplane.contract.names import COMPONENT_WORKER, MANAGED_BY_LABEL, REPORT_ANNOTATION, WORKFLOW_LABEL
from syncplane.contract.report import WorkerReport
from syncplane.kubeclient import LazyApi
from syncplane.state.factory import worker_stores
from syncplane.state.stores import Stores
from syncplane.worker.platform import Heartbeat, HeartbeatRejected, LocalFiles

log = logging.getLogger(__name__)
LEASE_SECONDS = 15
#: Seconds between renewals of a Lease whose report has not changed: a third of its duration, as the
#: kubelet renews its node Lease at a quarter of its (40 s, every 10 s). The operator calls a heartbeat
#: stale after 30 s (syncplane_operator.observe.STALE_AFTER_SECONDS): six missed renewals.
RENEW_SECONDS = LEASE_SECONDS / 3


def lease_body(name: str, workflow: str, report: WorkerReport, now: datetime,
               pod_uid: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {WORKFLOW_LABEL: workflow, MANAGED_BY_LABEL: "syncplane-operator", **COMPONENT_WORKER},
        "annotations": {REPORT_ANNOTATION: json.dumps(report.to_json(), sort_keys=True)},
    }
    if pod_uid:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": pod_uid}]
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS,
                     "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}


class LeaseHeartbeat:
    """Writes the worker's Lease with its report: every ``interval`` seconds (2) while the report
    changes (backlog, counters, errors), at once when its phase changes, and otherwise every ``renew``
    seconds (:data:`RENEW_SECONDS`, 5): an unchanged report renews only the Lease's liveness, and each
    write costs the API server, etcd and the operator's reconcile of the Workflow (50 workers beating
    every 2 s wrote 25 Leases a second while others were still starting).

    Give it an `ApiClient` (closed by `close()` all the same) or let it open one through
    `syncplane.kubeclient.LazyApi` on the first beat."""

    def __init__(self, namespace: str, pod_name: str, workflow: str, report: WorkerReport,
                 interval: float = 2.0, api_client: Any | None = None, renew: float = RENEW_SECONDS) -> None:
        self.namespace, self.name, self.workflow = namespace, pod_name, workflow
        self.report, self.interval, self.renew = report, interval, renew
        self.pod_uid = os.environ.get("POD_UID") or None
        self._kube = LazyApi("CoordinationV1Api", api_client, owns=True)

    async def beat(self, body: dict[str, Any] | None = None) -> None:
        """Write the Lease: ``body`` (:func:`lease_body`), by default the report as it is now."""
        from kubernetes_asyncio.client.exceptions import ApiException

        api = await self._kube.get()
        if body is None:
            body = lease_body(self.name, self.workflow, self.report, datetime.now(UTC), self.pod_uid)
        try:
            await api.patch_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            await api.create_namespaced_lease(self.namespace, body)

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until ``stop``: every ``interval`` seconds while the report changes, every ``renew``
        seconds while it does not, and at once when the report's phase changes
        (:meth:`WorkerReport.set_phase`: ready, fatal), so the operator sees a start end without
        waiting for the next period. A failed beat (an outage: 5xx, 429, a connection error) is
        retried at the next one; staleness is the operator's call. Raises :class:`HeartbeatRejected`
        when the API server refuses the Lease (403, 422, …): no beat can ever succeed, and without one
        the workflow would wait in STARTING with no reason."""
        changed = asyncio.Event()
        unsubscribe = self.report.on_phase_change(changed.set)
        try:
            await self._beat_until(stop, changed)
        finally:
            unsubscribe()

    async def _beat_until(self, stop: asyncio.Event, changed: asyncio.Event) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        loop = asyncio.get_running_loop()
        sent: str | None = None        # the report the last accepted write carried
        renewed = float("-inf")        # when (loop time)
        while not stop.is_set():
            changed.clear()   # a change from here on is in this beat's body, or makes another beat
            body = lease_body(self.name, self.workflow, self.report, datetime.now(UTC), self.pod_uid)
            report = body["metadata"]["annotations"][REPORT_ANNOTATION]
            try:
                if report != sent or loop.time() - renewed >= self.renew:
                    await self.beat(body)
                    sent, renewed = report, loop.time()
            except ApiException as exc:
                if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (404, 409, 429):
                    raise HeartbeatRejected(
                        f"cannot write heartbeat Lease {self.namespace}/{self.name}: HTTP {exc.status} {exc.reason} "
                        f"(the worker's ServiceAccount needs get, create, patch and delete on "
                        f"leases.coordination.k8s.io in {self.namespace!r})") from exc
                log.warning("heartbeat failed: HTTP %s %s", exc.status, exc.reason)
            except Exception as exc:  # an outage: the next beat retries
                log.warning("heartbeat failed: %s: %s", type(exc).__name__, exc)
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(changed.wait())]
            try:
                await asyncio.wait(waits, timeout=min(self.interval, self.renew),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()

    async def close(self, remove: bool = True) -> None:
        """Remove the Lease (unless ``remove`` is False) and close the client. A Lease that cannot
        be removed is logged with why; it expires on its own (stale after LEASE_SECONDS)."""
        try:
            if remove and self._kube.api is not None:
                await self._kube.api.delete_namespaced_lease(self.name, self.namespace)
        except Exception as exc:
            log.warning("could not remove heartbeat Lease %s/%s: %s: %s", self.namespace, self.name,
                        type(exc).__name__, exc)
        finally:
            await self._kube.close()


@dataclass(frozen=True)
class KubernetesPlatform(LocalFiles):
    """A worker pod's platform: its ``namespace``, its ``pod_name`` (its Lease's name), the
    Workflow's ``workflow_uid`` (owner of the ConfigMaps it creates); ``secrets_dir``: where the
    Secrets are mounted; ``state_db``: the pod-local file of the echo memory."""

    namespace: str = ""
    pod_name: str = ""
    workflow: str = ""
    workflow_uid: str = ""
    holder: str = ""       # the pod's name as given (POD_NAME), for the split first load's claims
    name: str = "kubernetes"

    def stores(self) -> Stores:
        """ConfigMaps in the namespace (the echo memory in ``state_db``)."""
        return worker_stores("kubernetes", state_db=self.state_db, namespace=self.namespace,
                             owner_uid=self.workflow_uid)

    def heartbeat(self, report: WorkerReport) -> Heartbeat | None:
        """The pod's Lease, renewed with ``report``."""
        return LeaseHeartbeat(self.namespace, self.pod_name, self.workflow, report)


__all__ = ["HeartbeatRejected", "KubernetesPlatform", "LeaseHeartbeat", "lease_body"]
