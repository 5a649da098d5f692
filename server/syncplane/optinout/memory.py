"""The echo memory, durable: per (workflow, side, key) the opt-out values the sync knows to be
on that side (what it wrote there, once acknowledged, or last read there).

A table of its own (``optinout_known``) in the worker's SQLite file; WAL, so it shares the
file with the checkpoints. Written before the cursors that depend on it are committed, so a
restart never reads back its own writes as new changes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from syncplane.sqlitefile import SqliteConnection

SCHEMA = """
CREATE TABLE IF NOT EXISTS optinout_known (
    workflow TEXT NOT NULL, side TEXT NOT NULL, key TEXT NOT NULL, known TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (workflow, side, key));
"""
_CHUNK = 500  # keys per IN (...) query: well under SQLite's variable limit


class SqliteEchoMemory:
    def __init__(self, path: Path | str) -> None:
        self._conn = SqliteConnection(path, SCHEMA)
        self._db = self._conn.db

    def close(self) -> None:
        self._conn.close()

    # The sync's calls: on the connection's thread, never blocking the event loop.
    async def aload(self, workflow: str, side: str, keys: Iterable[str]) -> dict[str, dict[str, bool]]:
        return await self._conn.run(self.load, workflow, side, list(keys))

    async def astore(self, workflow: str, side: str, known: Mapping[str, Mapping[str, bool]]) -> None:
        await self._conn.run(self.store, workflow, side, known)

    def load(self, workflow: str, side: str, keys: Iterable[str]) -> dict[str, dict[str, bool]]:
        wanted = list(dict.fromkeys(keys))
        out: dict[str, dict[str, bool]] = {}
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i:i + _CHUNK]
            rows = self._db.execute(
                f"SELECT key, known FROM optinout_known WHERE workflow = ? AND side = ? AND key IN "
                f"({','.join('?' * len(chunk))})", (workflow, side, *chunk))
            for key, known in rows:
                try:
                    value = json.loads(known)
                except ValueError:
                    continue  # unreadable: no baseline (the safe default: opt-out wins)
                if isinstance(value, dict):
                    out[str(key)] = {str(k): bool(v) for k, v in value.items()}
        return out

    def store(self, workflow: str, side: str, known: Mapping[str, Mapping[str, bool]]) -> None:
        """Replace the known values of these keys (callers pass the merged dict), atomically."""
        if not known:
            return
        now = time.time()
        rows = [(workflow, side, key, json.dumps(dict(values), sort_keys=True), now) for key, values in known.items()]
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT INTO optinout_known (workflow, side, key, known, updated) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (workflow, side, key) DO UPDATE SET known = excluded.known, updated = excluded.updated",
                rows)

    def count(self, workflow: str) -> int:
        row = self._db.execute("SELECT COUNT(*) FROM optinout_known WHERE workflow = ?", (workflow,)).fetchone()
        return int(row[0])
