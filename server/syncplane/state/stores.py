"""The small async interfaces of worker state, and :class:`Stores`, the set a worker runs with.

Each is satisfied by the embedded platform's SQLite database
(:class:`syncplane.state.sqlite.SqliteWorkerState`) and, except the echo memory, by the
Kubernetes platform's ConfigMaps (:mod:`syncplane.state.kube_checkpoints`,
:mod:`syncplane.state.kube_records`). :func:`syncplane.state.factory.worker_stores` picks them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from syncplane.connectors.base import Record
from syncplane.state.records import DeadLetter, Held


class AsyncCheckpointStore(Protocol):
    """A stream's cursor (an opaque string), committed once what it covers is written."""

    async def aload(self, workflow: str, stream: str) -> str | None:
        """The stream's committed cursor; None before its first commit."""
        ...

    async def acommit(self, workflow: str, stream: str, cursor: str) -> None:
        """Commit the stream's cursor (this stream's only: other streams' are left as they are)."""
        ...

    async def aswap(self, workflow: str, stream: str, expected: str | None, cursor: str) -> bool:
        """Compare-and-set: set the stream's value to ``cursor`` only if it is ``expected`` now
        (None: absent); True when it was set. Atomic among workers sharing the store (the split
        first load's claims, syncplane.worker.split)."""
        ...


class AsyncDeadLetterStore(Protocol):
    """Dead letters (:class:`~syncplane.state.records.DeadLetter`): stored, counted, re-sent when marked."""

    location: str  # names the store: reports of workers sharing one count its rows once

    async def adead_letter(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                           error: str, *, resource: str = "", key_field: str = "", deleted: bool = False) -> None:
        """Store a poison record (payload redacted), or count one more rejection of it."""
        ...

    async def adead_letter_count(self, workflow: str) -> int:
        """The workflow's dead letters (records)."""
        ...

    async def amarked_for_retry(self, workflow: str, stream: str) -> list[DeadLetter]:
        """The stream's dead letters RetryDeadLetters marked."""
        ...

    async def asettle_retry(self, workflow: str, stream: str, delivered: Iterable[str],
                            rejected: Iterable[tuple[str, int, str]], sent: Iterable[str]) -> None:
        """After a retry: forget ``delivered`` keys, count one more rejection of ``rejected``
        (key, HTTP status, reason), clear the mark of ``sent``."""
        ...


class AsyncHeldStore(Protocol):
    """Held records (:class:`~syncplane.state.records.Held`): waiting for what they point at."""

    async def ahold(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                    error: str) -> None:
        """Hold a record (payload redacted), or count one more failed attempt."""
        ...

    async def arelease(self, workflow: str, stream: str, key: str) -> None:
        """Forget a held record (written at last, or dead-lettered)."""
        ...

    async def aall(self, workflow: str, stream: str) -> list[Held]:
        """The stream's held records, oldest first."""
        ...


class AsyncRepairQueue(Protocol):
    """Records `syncplane verify --repair` queued for a stream's next pass: source records (as
    read, before the transform) to send again, or deletes."""

    async def aqueue_repairs(self, workflow: str, stream: str, records: Sequence[Record]) -> int:
        """Queue records (a newer queueing of a key replaces the older); returns how many."""
        ...

    async def arepairs(self, workflow: str, stream: str) -> list[Record]:
        """The stream's queued records."""
        ...

    async def arepaired(self, workflow: str, stream: str, keys: Iterable[str]) -> None:
        """Forget the queued records of these keys (sent)."""
        ...


class RecordStore(AsyncDeadLetterStore, AsyncHeldStore, AsyncRepairQueue, Protocol):
    """Dead letters, held records and verify's repairs in one store."""


class EchoMemory(Protocol):
    """The opt-in/out sync's echo memory: per (workflow, side, key) the opt-out values the sync
    knows to be on that side (what it wrote there, once acknowledged, or last read there)."""

    async def aknown(self, workflow: str, side: str, keys: Iterable[str]) -> dict[str, dict[str, bool]]:
        """Key → field → value known on ``side``, for the keys it knows."""
        ...

    async def aremember(self, workflow: str, side: str, known: Mapping[str, Mapping[str, bool]]) -> None:
        """Replace the known values of these keys (callers pass the merged dict), atomically."""
        ...


class Closable(Protocol):
    """A store holding a connection or a client."""

    async def aclose(self) -> None:
        """Release it."""
        ...


@dataclass(frozen=True)
class Stores:
    """Where a worker keeps its state (see the package's text). ``owned``: what
    :meth:`aclose` closes (the factory's stores; none when the caller keeps them)."""

    checkpoints: AsyncCheckpointStore
    letters: AsyncDeadLetterStore
    held: AsyncHeldStore
    memory: EchoMemory
    repairs: AsyncRepairQueue | None = None   # verify --repair
    owned: tuple[Closable, ...] = ()

    async def aclose(self) -> None:
        """Close the stores this set owns."""
        for store in self.owned:
            await store.aclose()
