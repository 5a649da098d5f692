"""Durable worker state: sync cursors (checkpoints) and dead letters.

Embedded, both live in a SQLite file of the worker's own (WAL, so several
worker processes can write it); the Kubernetes backend will put checkpoints
in a cluster object behind the same interface.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    workflow TEXT NOT NULL, stream TEXT NOT NULL, cursor TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (workflow, stream));
CREATE TABLE IF NOT EXISTS dead_letters (
    workflow TEXT NOT NULL, stream TEXT NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    status INTEGER NOT NULL, error TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    attempts INTEGER NOT NULL, PRIMARY KEY (workflow, stream, key));
"""


class CheckpointStore(Protocol):
    def load(self, workflow: str, stream: str) -> str | None: ...

    def commit(self, workflow: str, stream: str, cursor: str) -> None: ...


class SqliteWorkerState:
    """Checkpoints and dead letters for the embedded mode."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def load(self, workflow: str, stream: str) -> str | None:
        row = self._db.execute("SELECT cursor FROM checkpoints WHERE workflow = ? AND stream = ?",
                               (workflow, stream)).fetchone()
        return str(row[0]) if row else None

    def commit(self, workflow: str, stream: str, cursor: str) -> None:
        self._db.execute("INSERT INTO checkpoints (workflow, stream, cursor, updated) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (workflow, stream) DO UPDATE SET cursor = excluded.cursor, "
                         "updated = excluded.updated", (workflow, stream, cursor, time.time()))

    def dead_letter(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                    error: str) -> None:
        now = time.time()
        self._db.execute(
            "INSERT INTO dead_letters (workflow, stream, key, payload, status, error, first_seen, last_seen, attempts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (workflow, stream, key) DO UPDATE SET "
            "payload = excluded.payload, status = excluded.status, error = excluded.error, "
            "last_seen = excluded.last_seen, attempts = attempts + 1",
            (workflow, stream, key, json.dumps(payload, sort_keys=True), status, error, now, now))

    def dead_letters(self, workflow: str) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT stream, key, payload, status, error, first_seen, last_seen, attempts "
                                "FROM dead_letters WHERE workflow = ? ORDER BY stream, key", (workflow,))
        cols = ("stream", "key", "payload", "status", "error", "first_seen", "last_seen", "attempts")
        return [dict(zip(cols, r, strict=True)) for r in rows]
