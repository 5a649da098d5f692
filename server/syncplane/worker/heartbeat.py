"""The Kubernetes heartbeat: a coordination.k8s.io Lease per worker pod.

renewTime is liveness; the annotation carries the same JSON report as the
embedded /status. The operator watches these Leases; nobody dials the pod.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from syncplane.worker.report import WorkerReport

log = logging.getLogger(__name__)
REPORT_ANNOTATION = "syncplane.io/report"
WORKFLOW_LABEL = "syncplane.io/workflow"
LEASE_SECONDS = 15


def lease_body(name: str, workflow: str, report: WorkerReport, now: datetime,
               pod_uid: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {WORKFLOW_LABEL: workflow, "app.kubernetes.io/managed-by": "syncplane-operator",
                   "app.kubernetes.io/component": "worker"},
        "annotations": {REPORT_ANNOTATION: json.dumps(report.to_json(), sort_keys=True)},
    }
    if pod_uid:
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": pod_uid}]
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS,
                     "renewTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}


class LeaseHeartbeat:
    def __init__(self, namespace: str, pod_name: str, workflow: str, report: WorkerReport,
                 interval: float = 2.0) -> None:
        self.namespace, self.name, self.workflow = namespace, pod_name, workflow
        self.report, self.interval = report, interval
        self.pod_uid = os.environ.get("POD_UID") or None
        self._api: Any = None

    async def _client(self) -> Any:
        if self._api is None:
            from kubernetes_asyncio import client

            from syncplane.kubeclient import api_client

            self._api = client.CoordinationV1Api(await api_client())
        return self._api

    async def beat(self) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        api = await self._client()
        body = lease_body(self.name, self.workflow, self.report, datetime.now(UTC), self.pod_uid)
        try:
            await api.patch_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            await api.create_namespaced_lease(self.namespace, body)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.beat()
            except Exception as exc:  # a missed beat is retried; staleness is the operator's call
                log.warning("heartbeat failed: %s", type(exc).__name__)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
            except TimeoutError:
                pass

    async def close(self, remove: bool = True) -> None:
        if self._api is None:
            return
        try:
            if remove:
                await self._api.delete_namespaced_lease(self.name, self.namespace)
        except Exception:
            log.warning("could not remove heartbeat lease %s", self.name)
        await self._api.api_client.close()
