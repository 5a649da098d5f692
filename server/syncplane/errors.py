"""Domain errors. The gRPC layer maps each to a status code in one place
(syncplane.api.errors); nothing else knows about gRPC codes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class SyncplaneError(Exception):
    """A domain error: ``message`` for people, ``metadata`` (string → string) and ``reason`` (the
    ErrorInfo reason, the class's own unless given) for programs."""

    reason = "ERROR"

    def __init__(self, message: str, metadata: dict[str, str] | None = None, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata or {}
        if reason is not None:
            self.reason = reason


class InvalidArgument(SyncplaneError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid workflow: {summary}")


class NotFound(SyncplaneError):
    """No workflow by that name."""

    reason = "NOT_FOUND"


class AlreadyExists(SyncplaneError):
    """A create of a name that is taken (a replayed ``request_id`` is not this: it returns the
    workflow it created)."""

    reason = "ALREADY_EXISTS"


class FailedPrecondition(SyncplaneError):
    """A lifecycle transition that the current phase does not allow."""

    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, phase: str, reason: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message, {"phase": phase}, reason=reason)
        self.phase = phase


class Aborted(SyncplaneError):
    """An etag mismatch (optimistic concurrency)."""

    reason = "ETAG_MISMATCH"


class Unauthenticated(SyncplaneError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(SyncplaneError):
    """The caller is known but may not do this."""

    reason = "PERMISSION_DENIED"


class OutOfRange(SyncplaneError):
    """A watch from a revision the store no longer keeps: watch again from 0."""

    reason = "REVISION_COMPACTED"


class Unavailable(SyncplaneError):
    """Something outside syncplane (a vendor API) is unavailable now; retrying later may work."""

    reason = "UNAVAILABLE"

    def __init__(self, message: str, reason: str = "UNAVAILABLE", metadata: dict[str, str] | None = None) -> None:
        super().__init__(message, metadata, reason=reason)
