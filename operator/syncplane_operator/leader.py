"""One acting operator among replicas: leader election through a coordination.k8s.io Lease.

A replica that does not hold the Lease waits in kopf's startup, before any watch
starts, so a standby never reconciles. The leader renews every `lease_seconds / 3`;
if it cannot renew within `renew_deadline` it can no longer be sure nobody else
took over, and exits at once (as kube-controller-manager does), letting its pod
restart as a standby. On a clean shutdown it releases the Lease so that a standby
takes over without waiting for it to expire.

Chosen over kopf peering, which needs its own CRDs and lets replicas of equal
priority act together. Enabled by `SYNCPLANE_LEADER_ELECTION_LEASE` (the Helm
chart sets it); without it the operator acts alone, as in the tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

log = logging.getLogger(__name__)


def _exit_now() -> None:
    logging.getLogger(__name__).critical("leadership lost: exiting so that only one operator acts")
    logging.shutdown()
    os._exit(70)


def _micro(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaderElection:
    api_client: Any
    namespace: str
    name: str
    identity: str
    lease_seconds: int = 15
    on_lost: Callable[[], None] = _exit_now
    _last_renew: float = field(default=0.0, init=False)

    @classmethod
    def from_environment(cls, api_client: Any) -> LeaderElection | None:
        name = os.environ.get("SYNCPLANE_LEADER_ELECTION_LEASE")
        if not name:
            return None
        namespace = os.environ.get("POD_NAMESPACE") or "default"
        identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        seconds = int(os.environ.get("SYNCPLANE_LEADER_ELECTION_SECONDS", "15"))
        return cls(api_client, namespace, name, identity, seconds)

    @property
    def renew_seconds(self) -> float:
        return max(1.0, self.lease_seconds / 3)

    @property
    def renew_deadline(self) -> float:
        return self.lease_seconds * 2 / 3

    def _api(self) -> Any:
        from kubernetes_asyncio import client

        return client.CoordinationV1Api(self.api_client)

    async def try_acquire(self) -> bool:
        """Take or renew the Lease: True when this replica holds it now."""
        from kubernetes_asyncio.client.exceptions import ApiException

        api = self._api()
        now = datetime.now(UTC)
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "renewTime": _micro(now)}
        try:
            lease = await api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {**spec, "acquireTime": _micro(now), "leaseTransitions": 0}}
            try:
                await api.create_namespaced_lease(self.namespace, body)
            except ApiException as create_exc:
                if create_exc.status == 409:  # another replica created it first
                    return False
                raise
            return True
        holder = lease.spec.holder_identity or ""
        renewed = lease.spec.renew_time or lease.spec.acquire_time
        duration = lease.spec.lease_duration_seconds or self.lease_seconds
        expired = renewed is None or renewed + timedelta(seconds=duration) < now
        if holder and holder != self.identity and not expired:
            return False
        transitions = lease.spec.lease_transitions or 0
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": {**spec,
                         "acquireTime": _micro(now) if holder != self.identity else _micro(lease.spec.acquire_time),
                         "leaseTransitions": transitions + (holder != self.identity)}}
        try:
            await api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # written by someone else in between
                return False
            raise
        return True

    async def acquire(self) -> None:
        """Wait until this replica is the leader."""
        announced = False
        while True:
            try:
                if await self.try_acquire():
                    self._last_renew = asyncio.get_running_loop().time()
                    log.info("leader election: %s holds Lease %s/%s", self.identity, self.namespace, self.name)
                    return
            except Exception as exc:
                log.warning("leader election: %s", exc)
            if not announced:
                log.info("leader election: standing by for Lease %s/%s", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.renew_seconds)

    async def keep(self) -> None:
        """Renew until cancelled; give up (on_lost) once renewals failed for renew_deadline."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                if await self.try_acquire():
                    self._last_renew = loop.time()
                    continue
                log.error("leader election: Lease %s/%s is held by another replica", self.namespace, self.name)
                self.on_lost()
                return
            except Exception as exc:
                log.warning("leader election: renewal failed: %s", exc)
            if loop.time() - self._last_renew > self.renew_deadline:
                self.on_lost()
                return

    async def release(self) -> None:
        """Hand over at once on a clean shutdown (only if still ours)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        api = self._api()
        try:
            lease = await api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace,
                                 "resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": "", "leaseDurationSeconds": 1,
                             "leaseTransitions": lease.spec.lease_transitions or 0}}
            await api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            log.warning("leader election: could not release the Lease: %s", exc.status)
