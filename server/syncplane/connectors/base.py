"""What the worker pipeline needs from a connector, and nothing more.

A source yields pages of records, each page carrying the cursor to commit
once every record of that page (and before it) is acknowledged by the
destination. A sink upserts or deletes records by their integration key and
says, per record, what happened, so one bad record never fails a batch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Record:
    """One source row (or a delete to propagate), keyed by its integration key."""

    key: str                              # the integration key (e.g. contactid)
    values: dict[str, Any] = field(default_factory=dict)
    deleted: bool = False                 # a $deletedEntity row / a delete to propagate
    modified: str | None = None           # source modification time (ISO 8601), when known
    # Fields written only when the destination record is created (a mapping's applyUpdates:
    # false): a sink leaves them out when the record exists already. Decided by the sink, by key.
    create_only: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Page:
    """Records read by one source request, and the cursor to commit once all are acknowledged."""

    records: Sequence[Record]
    # Opaque resume point valid once this page is written; None = nothing new to commit.
    cursor: str | None
    # True when the source had to start over (e.g. an expired delta token).
    resynced: bool = False
    # Part of a full read (first load, resync or replay) rather than a delta: the
    # transform then writes fields whose updates are off, and includes inactive rows.
    full: bool = False
    # The cursor starts the read over from the beginning (the source could not make progress
    # from here, e.g. a last page without a delta link): rows counted so far do not add up.
    restart: bool = False


@dataclass(frozen=True)
class Rejected:
    """A record the destination refused (a poison record): dead-lettered with this reason."""

    key: str
    status: int                           # HTTP status from the destination (e.g. 400)
    error: str                            # the destination's message, no secrets


@dataclass(frozen=True)
class WriteResult:
    """What a sink did with each record of a write: acknowledged, or rejected with its reason."""

    written: Sequence[str] = ()           # keys acknowledged
    rejected: Sequence[Rejected] = ()     # poison records: dead-letter them, keep going


class ConnectorError(Exception):
    """Retrying will not help (bad credentials, missing table or field)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Source(Protocol):
    """A side records are read from (Dataverse, Campaign's event feed)."""

    def pages(self, table: str, columns: Sequence[str], cursor: str | None) -> AsyncIterator[Page]:
        """The pages of ``table`` (its ``columns`` only) from ``cursor`` on (None: a full read).

        Raises `ConnectorError` when retrying cannot help; transient HTTP failures are retried inside.
        """
        ...

    async def aclose(self) -> None:
        """Close the HTTP sessions; idempotent."""
        ...


class Sink(Protocol):
    """A side records are written to, by integration key (Campaign, Dataverse)."""

    async def write(self, resource: str, key_field: str, records: Sequence[Record], *,
                    full_load: bool = False) -> WriteResult:
        """``full_load``: the records come from a full read, so most are likely new to the
        destination (a sink may try create-first). A hint only; the result must be the same."""
        ...

    async def aclose(self) -> None:
        """Close the HTTP sessions; idempotent."""
        ...
