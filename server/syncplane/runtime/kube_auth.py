"""The Kubernetes backend's callers: each caller's own token, checked by the API server.

A TokenReview says who holds the token; a SubjectAccessReview whether that user may do the
call's verb (``syncplane.api.callers.VERBS``) on ``workflows.syncplane.io`` in the namespace
(by name when the call names one). This is the delegation aggregated API servers use; the
server's ServiceAccount needs ``create`` on ``tokenreviews`` and ``subjectaccessreviews``
(the built-in ClusterRole ``system:auth-delegator``).

Answers are cached for :data:`CACHE_SECONDS` (like the API server's own webhook token cache),
so a watch or a burst of calls costs two reviews, not two per call. The token itself is kept
only as its SHA-256.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from syncplane import errors
from syncplane.api.callers import Caller

CACHE_SECONDS = 10.0
GROUP, RESOURCE = "syncplane.io", "workflows"


class KubernetesCallers:
    def __init__(self, api_client: Any, namespace: str, *, cache_seconds: float = CACHE_SECONDS) -> None:
        self.api_client, self.namespace, self.cache_seconds = api_client, namespace, cache_seconds
        self._users: dict[str, tuple[float, Caller | None]] = {}
        self._decisions: dict[tuple[str, str, str | None], tuple[float, bool, str]] = {}

    async def authenticate(self, token: str | None) -> Caller:
        if not token:
            raise errors.Unauthenticated("send your own Kubernetes bearer token (e.g. kubectl create token)")
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._users.get(key)
        if cached is None or cached[0] < now:
            cached = (now + self.cache_seconds, await self._review(token))
            self._users[key] = cached
            self._expire(now)
        caller = cached[1]
        if caller is None:
            raise errors.Unauthenticated("the Kubernetes API server did not authenticate this token")
        return caller

    async def _review(self, token: str) -> Caller | None:
        from kubernetes_asyncio import client

        review = await client.AuthenticationV1Api(self.api_client).create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token)))
        status = review.status
        if status is None or not status.authenticated or status.user is None:
            return None
        user = status.user
        return Caller(user.username or "", tuple(user.groups or ()), user.uid or "",
                      {k: tuple(v) for k, v in (user.extra or {}).items()})

    async def authorize(self, caller: Caller, verb: str, workflow: str | None) -> None:
        key = (caller.name + "\0" + caller.uid, verb, workflow)
        now = time.monotonic()
        cached = self._decisions.get(key)
        if cached is None or cached[0] < now:
            allowed, reason = await self._access_review(caller, verb, workflow)
            cached = (now + self.cache_seconds, allowed, reason)
            self._decisions[key] = cached
        if not cached[1]:
            what = f"workflows.{GROUP} {workflow!r}" if workflow else f"workflows.{GROUP}"
            raise errors.PermissionDenied(f"{caller.name} may not {verb} {what} in namespace {self.namespace}"
                                          + (f": {cached[2]}" if cached[2] else ""))

    async def _access_review(self, caller: Caller, verb: str, workflow: str | None) -> tuple[bool, str]:
        from kubernetes_asyncio import client

        attrs = client.V1ResourceAttributes(namespace=self.namespace, verb=verb, group=GROUP, resource=RESOURCE,
                                            name=workflow or None)
        review = await client.AuthorizationV1Api(self.api_client).create_subject_access_review(
            client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
                user=caller.name, groups=list(caller.groups), uid=caller.uid or None,
                extra={k: list(v) for k, v in caller.extra.items()} or None, resource_attributes=attrs)))
        status = review.status
        return bool(status and status.allowed), str(status.reason or "") if status else ""

    def _expire(self, now: float) -> None:
        if len(self._users) > 1024:
            self._users = {k: v for k, v in self._users.items() if v[0] >= now}
        if len(self._decisions) > 4096:
            self._decisions = {k: v for k, v in self._decisions.items() if v[0] >= now}
