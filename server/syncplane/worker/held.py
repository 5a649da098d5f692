"""Records held back because something they point at does not exist yet.

An egress event whose contact is not in Dynamics 365 yet (a 404 on its
``regarding`` binding) is not an error of the event: the contact may arrive
with the next ingress pass. It is held, durably, and re-sent at the start of
each pass; after ``max_attempts`` passes it becomes a dead letter, with the
reason. Never dropped silently. An ingress child (a loyalty card whose profile is
not in Campaign) is held the same way, with no limit: until its parent is there.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from syncplane.sqlitefile import SqliteConnection
from syncplane.worker.checkpoints import redact

SCHEMA = """
CREATE TABLE IF NOT EXISTS held (
    workflow TEXT NOT NULL, stream TEXT NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    status INTEGER NOT NULL, error TEXT NOT NULL, first_seen REAL NOT NULL, attempts INTEGER NOT NULL,
    PRIMARY KEY (workflow, stream, key));
"""


@dataclass(frozen=True)
class HoldPolicy:
    statuses: frozenset[int] = frozenset({404})   # "what it points at does not exist"
    # Passes before it becomes a dead letter; None: held until what it points at is there (an
    # ingress child waits for its parent, DOMAIN.md "a child may arrive before its parent; order
    # or hold it", however long the parent is filtered out or absent).
    max_attempts: int | None = 20


@dataclass(frozen=True)
class Held:
    key: str
    payload: dict[str, Any]
    status: int
    error: str
    attempts: int


class AsyncHeldStore(Protocol):
    """Held records for an asyncio worker: HeldRecords (embedded) and kube_records.ConfigMapRecords
    (Kubernetes) both satisfy it."""

    async def ahold(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                    error: str) -> None: ...

    async def arelease(self, workflow: str, stream: str, key: str) -> None: ...

    async def aall(self, workflow: str, stream: str) -> list[Held]: ...


class HeldRecords:
    def __init__(self, path: Path) -> None:
        self._conn = SqliteConnection(path, SCHEMA)
        self._db = self._conn.db

    def close(self) -> None:
        self._conn.close()

    def hold(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int, error: str) -> None:
        """Hold a record (first time), or count one more failed attempt. Credential-named fields
        are redacted as in dead letters (`checkpoints.redact`): never stored, never re-sent."""
        self._db.execute(
            "INSERT INTO held (workflow, stream, key, payload, status, error, first_seen, attempts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (workflow, stream, key) DO UPDATE SET "
            "payload = excluded.payload, status = excluded.status, error = excluded.error, attempts = attempts + 1",
            (workflow, stream, key, json.dumps(redact(payload), sort_keys=True), status, error, time.time()))

    def release(self, workflow: str, stream: str, key: str) -> None:
        self._db.execute("DELETE FROM held WHERE workflow = ? AND stream = ? AND key = ?", (workflow, stream, key))

    def all(self, workflow: str, stream: str) -> list[Held]:
        rows = self._db.execute("SELECT key, payload, status, error, attempts FROM held WHERE workflow = ? AND "
                                "stream = ? ORDER BY first_seen, key", (workflow, stream))
        return [Held(k, json.loads(p), s, e, a) for k, p, s, e, a in rows]

    # AsyncHeldStore: the same calls, on the connection's thread (never blocking the event loop).
    async def ahold(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                    error: str) -> None:
        await self._conn.run(self.hold, workflow, stream, key, payload, status, error)

    async def arelease(self, workflow: str, stream: str, key: str) -> None:
        await self._conn.run(self.release, workflow, stream, key)

    async def aall(self, workflow: str, stream: str) -> list[Held]:
        return await self._conn.run(self.all, workflow, stream)
