"""Who is calling, what they may do, and the audit line of every mutating call.

Two ways to know a caller:

- :class:`SharedToken` (embedded mode, and the Kubernetes backend when asked for): one bearer
  token; whoever holds it may do everything. Without a token the server is open, which
  :func:`syncplane.api.server.check_bind` allows on loopback only.
- ``syncplane.runtime.kube_auth.KubernetesCallers`` (the Kubernetes backend's default): the
  caller sends their own Kubernetes token; a TokenReview says who they are and a
  SubjectAccessReview whether they may do the call's verb on ``workflows`` in the namespace,
  the way aggregated API servers delegate. A user can do through gRPC what ``kubectl`` allows.

The RPC → Kubernetes verb mapping is :data:`VERBS` (README, "Security model").
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from syncplane import errors
from syncplane.validation.names import WORKFLOW_PREFIX

audit_log = logging.getLogger("syncplane.audit")

#: RPC method → the verb on ``workflows.syncplane.io`` it needs. Start, stop, restart, a dead-letter
#: retry and a verify change the workflow (desiredState, restartNonce, retry marks, the last verify): ``patch``.
VERBS: dict[str, str] = {
    "CreateWorkflow": "create",
    "GetWorkflow": "get",
    "ListWorkflows": "list",
    "UpdateWorkflow": "update",
    "DeleteWorkflow": "delete",
    "StartWorkflow": "patch",
    "StopWorkflow": "patch",
    "RestartWorkflow": "patch",
    "WatchWorkflows": "watch",
    "ListDeadLetters": "get",
    "RetryDeadLetters": "patch",
    # it records its summary on the workflow (status.last_verify; an annotation on Kubernetes) and may repair
    "VerifyWorkflow": "patch",
}
READ_VERBS = frozenset({"get", "list", "watch"})


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. ``name`` goes into audit lines (never a token)."""

    name: str
    groups: Sequence[str] = ()
    uid: str = ""
    extra: Mapping[str, Sequence[str]] = field(default_factory=dict)


class Callers(Protocol):
    """Authenticates the bearer token of a call and authorises its verb."""

    async def authenticate(self, token: str | None) -> Caller:
        """Raises ``errors.Unauthenticated``."""
        ...

    async def authorize(self, caller: Caller, verb: str, workflow: str | None) -> None:
        """Raises ``errors.PermissionDenied``."""
        ...


class SharedToken:
    """One shared bearer token (constant-time compare); no token configured: everyone is
    ``anonymous`` (loopback only, see check_bind). Every authenticated caller may do everything."""

    def __init__(self, token: str | None) -> None:
        self._token = token

    async def authenticate(self, token: str | None) -> Caller:
        if not self._token:
            return Caller("anonymous")
        if token is None or not hmac.compare_digest(token.encode(), self._token.encode()):
            raise errors.Unauthenticated("missing or invalid bearer token")
        return Caller("token-holder")

    async def authorize(self, caller: Caller, verb: str, workflow: str | None) -> None:
        return None


class Call:
    """One call, checked and audited the same way over gRPC and in the web console: its caller
    (authenticated from a bearer token), its verb on ``workflows`` (:data:`VERBS` by RPC name) and its
    workflow (None: the collection)."""

    def __init__(self, callers: Callers, name: str, workflow: str | None) -> None:
        self.callers, self.name, self.workflow = callers, name, workflow
        self.verb = VERBS.get(name)
        self.caller: Caller | None = None

    async def check(self, token: str | None) -> Caller:
        """Raises ``errors.Unauthenticated`` (a missing or invalid token) or ``errors.PermissionDenied``."""
        self.caller = await self.callers.authenticate(token)
        if self.verb:
            await self.callers.authorize(self.caller, self.verb, self.workflow)
        return self.caller

    def done(self, result: str) -> None:
        """The audit line of a mutating call; ``result``: ``OK`` or a google.rpc code name."""
        if self.verb and self.verb not in READ_VERBS:
            audit(self.caller, self.name, self.workflow, result)


def bearer(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer …`` header, if any."""
    header = str(dict(metadata or ()).get("authorization", ""))
    scheme, _, value = header.partition(" ")
    return value if scheme.lower() == "bearer" and value else None


def workflow_of(request: Any) -> str | None:
    """The workflow id a request names (None for a list or a watch of everything)."""
    for attr in ("workflow_id", "name"):
        value = getattr(request, attr, "")
        if value:
            return str(value).removeprefix(WORKFLOW_PREFIX)
    wf = getattr(request, "workflow", None)
    name = getattr(wf, "name", "") if wf is not None else ""
    return str(name).removeprefix(WORKFLOW_PREFIX) or None


def audit(caller: Caller | None, method: str, workflow: str | None, result: str) -> None:
    """One JSON line per mutating call on logger ``syncplane.audit``: who, what, which workflow, the result."""
    audit_log.info(json.dumps({"audit": True, "who": caller.name if caller else "unauthenticated",
                               "what": method, "workflow": workflow, "result": result}, sort_keys=True))
