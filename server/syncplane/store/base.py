"""The store interface the service and the supervisor depend on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc

# Receives the current workflow, returns the new one (or raises a domain error).
# Runs inside the store's transaction, so check-and-set is atomic.
Mutation = Callable[[pb.Workflow], pb.Workflow]


@dataclass(frozen=True)
class Change:
    revision: int
    type: int          # svc.ChangeType
    workflow: pb.Workflow


class WorkflowStore(Protocol):
    async def create(self, wf: pb.Workflow, request_id: str = "") -> pb.Workflow: ...

    async def get(self, name: str) -> pb.Workflow: ...

    async def list(self, *, types: Sequence[int] = (), phases: Sequence[int] = (), after: str = "",
                   limit: int = 50) -> list[pb.Workflow]: ...

    # A value that changes whenever any workflow changes, read before a list: while it stays the same,
    # what that list answered may be reused. None: the store cannot tell, nothing may be reused.
    def list_version(self) -> int | None: ...

    async def update(self, name: str, mutate: Mutation) -> pb.Workflow: ...

    async def delete(self, name: str, check: Callable[[pb.Workflow], None]) -> None: ...

    def watch(self, start_revision: int = 0, name: str = "") -> AsyncIterator[Change]: ...

    # The spec snapshot the workers were started with (drift is measured against it).
    async def get_applied(self, name: str) -> pb.WorkflowSpec | None: ...

    async def set_status(self, name: str, status: pb.WorkflowStatus,
                         applied: pb.WorkflowSpec | None = None) -> pb.Workflow:
        """The driver's status write. It never changes ``status.last_verify`` (set_last_verify's)."""
        ...

    async def set_last_verify(self, name: str, result: pb.VerifyResult) -> None:
        """Keep the last VerifyWorkflow summary as ``status.last_verify`` (the API server's own field)."""
        ...


CHANGE_ADDED = svc.CHANGE_TYPE_ADDED
CHANGE_MODIFIED = svc.CHANGE_TYPE_MODIFIED
CHANGE_DELETED = svc.CHANGE_TYPE_DELETED
