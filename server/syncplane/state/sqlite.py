"""The embedded platform's worker state: one SQLite database per worker-state file.

:class:`SqliteWorkerState` keeps every kind of worker state in one file (WAL, so the worker
processes and the API server share it): checkpoints, dead letters, verify's repairs, held
records and the opt-in/out echo memory, a table each (:data:`STATE_TABLES`). Its async calls
(the worker's) run on the connection's own thread (:class:`syncplane.sqlitefile.SqliteConnection`):
a lock another process holds is waited for there, never on the event loop. Its synchronous calls
are the API server's one-off accesses.

On Kubernetes the same interfaces are kept in ConfigMaps (:mod:`.kube_checkpoints`,
:mod:`.kube_records`); only the echo memory stays in a pod-local file of this kind.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from syncplane.connectors.base import Record
from syncplane.sqlitefile import SqliteConnection
from syncplane.state.records import DeadLetter, Held, redact

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    workflow TEXT NOT NULL, stream TEXT NOT NULL, cursor TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (workflow, stream));
CREATE TABLE IF NOT EXISTS dead_letters (
    workflow TEXT NOT NULL, stream TEXT NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    status INTEGER NOT NULL, error TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    attempts INTEGER NOT NULL, PRIMARY KEY (workflow, stream, key));
CREATE TABLE IF NOT EXISTS repairs (
    workflow TEXT NOT NULL, stream TEXT NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    deleted INTEGER NOT NULL, queued REAL NOT NULL, PRIMARY KEY (workflow, stream, key));
CREATE TABLE IF NOT EXISTS held (
    workflow TEXT NOT NULL, stream TEXT NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    status INTEGER NOT NULL, error TEXT NOT NULL, first_seen REAL NOT NULL, attempts INTEGER NOT NULL,
    PRIMARY KEY (workflow, stream, key));
CREATE TABLE IF NOT EXISTS optinout_known (
    workflow TEXT NOT NULL, side TEXT NOT NULL, key TEXT NOT NULL, known TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (workflow, side, key));
"""
# Added to dead_letters after the first release: (name, declaration), added in place when absent.
DEAD_LETTER_COLUMNS = (
    ("resource", "TEXT NOT NULL DEFAULT ''"),       # where it was written (empty: the stream's own)
    ("key_field", "TEXT NOT NULL DEFAULT ''"),
    ("deleted", "INTEGER NOT NULL DEFAULT 0"),      # a rejected delete
    ("retry", "INTEGER NOT NULL DEFAULT 0"),        # RetryDeadLetters marked it; the worker re-sends it
)
_LETTER_COLUMNS = ("stream", "key", "resource", "key_field", "payload", "deleted", "status", "error",
                   "first_seen", "last_seen", "attempts", "retry")
_CHUNK = 500  # keys per IN (...) query of the echo memory: well under SQLite's variable limit


#: Every table of the worker-state database; each row belongs to one workflow (its first column).
STATE_TABLES = ("checkpoints", "dead_letters", "repairs", "held", "optinout_known")


def forget_workflows(path: Path, keep: Collection[str]) -> list[str]:
    """Delete the state of every workflow not in ``keep`` (deleted ones), so that a workflow
    created again under the same name starts afresh: a full read, no old dead letters.
    Returns the workflows forgotten."""
    if not path.exists():
        return []
    db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
    try:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if t in STATE_TABLES]
        present = {w for t in tables for (w,) in db.execute(f"SELECT DISTINCT workflow FROM {t}")}
        gone = sorted(present - set(keep))
        if gone:
            marks = ", ".join("?" * len(gone))
            db.execute("BEGIN IMMEDIATE")
            for t in tables:
                db.execute(f"DELETE FROM {t} WHERE workflow IN ({marks})", gone)
            db.execute("COMMIT")
        return gone
    finally:
        db.close()


class SqliteWorkerState:
    """Every kind of worker state of the embedded platform, in the SQLite file ``path``.

    Satisfies each interface of :mod:`syncplane.state.stores` (``a…`` calls, on the connection's
    thread). The synchronous calls are the API server's (list and mark dead letters, queue
    repairs, read a checkpoint for verify) and the tests'. Raises ``sqlite3.OperationalError``
    (``database is locked``) when another process holds the write lock past the busy timeout.
    """

    def __init__(self, path: Path) -> None:
        self._conn = SqliteConnection(path, SCHEMA)
        self._db = self._conn.db
        self._migrate()
        # Names this store among others (one per machine, or per pod): reports of workers
        # sharing it count the same rows once.
        self.location = f"{socket.gethostname()}:{path.resolve()}"

    def _migrate(self) -> None:
        """Additive: a database from an older release gains the new columns (with their defaults)."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(dead_letters)")}
        for name, decl in DEAD_LETTER_COLUMNS:
            if name not in have:
                try:
                    self._db.execute(f"ALTER TABLE dead_letters ADD COLUMN {name} {decl}")
                except sqlite3.OperationalError as exc:
                    if "duplicate column" not in str(exc):
                        raise  # another process added it between the check and here: fine
        self._db.execute("CREATE INDEX IF NOT EXISTS dead_letters_retry ON dead_letters (workflow, stream, retry)")

    def close(self) -> None:
        """Close the connection (and its thread)."""
        self._conn.close()

    async def aclose(self) -> None:
        """:meth:`close`, for :class:`syncplane.state.stores.Stores`."""
        self.close()

    def load(self, workflow: str, stream: str) -> str | None:
        """The stream's committed cursor; None before its first commit."""
        row = self._db.execute("SELECT cursor FROM checkpoints WHERE workflow = ? AND stream = ?",
                               (workflow, stream)).fetchone()
        return str(row[0]) if row else None

    def committed(self, workflow: str, stream: str) -> tuple[str | None, float | None]:
        """The stream's cursor and when it was committed (epoch seconds); (None, None) before the first."""
        row = self._db.execute("SELECT cursor, updated FROM checkpoints WHERE workflow = ? AND stream = ?",
                               (workflow, stream)).fetchone()
        return (str(row[0]), float(row[1])) if row else (None, None)

    def commit(self, workflow: str, stream: str, cursor: str) -> None:
        """Commit the stream's cursor (with the time, epoch seconds)."""
        self._db.execute("INSERT INTO checkpoints (workflow, stream, cursor, updated) VALUES (?, ?, ?, ?) "
                         "ON CONFLICT (workflow, stream) DO UPDATE SET cursor = excluded.cursor, "
                         "updated = excluded.updated", (workflow, stream, cursor, time.time()))

    def swap(self, workflow: str, stream: str, expected: str | None, cursor: str) -> bool:
        """See :meth:`AsyncCheckpointStore.aswap`: one statement, atomic in SQLite."""
        if expected is None:
            cur = self._db.execute("INSERT INTO checkpoints (workflow, stream, cursor, updated) VALUES (?, ?, ?, ?) "
                                   "ON CONFLICT (workflow, stream) DO NOTHING", (workflow, stream, cursor, time.time()))
        else:
            cur = self._db.execute("UPDATE checkpoints SET cursor = ?, updated = ? WHERE workflow = ? AND stream = ? "
                                   "AND cursor = ?", (cursor, time.time(), workflow, stream, expected))
        return cur.rowcount == 1

    # AsyncCheckpointStore: the same calls, on the connection's thread (a lock another process
    # holds is waited for there, not on the event loop).
    async def aload(self, workflow: str, stream: str) -> str | None:
        """``AsyncCheckpointStore.aload`` (on the connection's thread)."""
        return await self._conn.run(self.load, workflow, stream)

    async def acommit(self, workflow: str, stream: str, cursor: str) -> None:
        """``AsyncCheckpointStore.acommit`` (on the connection's thread)."""
        await self._conn.run(self.commit, workflow, stream, cursor)

    async def aswap(self, workflow: str, stream: str, expected: str | None, cursor: str) -> bool:
        """``AsyncCheckpointStore.aswap`` (on the connection's thread)."""
        return await self._conn.run(self.swap, workflow, stream, expected, cursor)

    # AsyncDeadLetterStore, likewise.
    async def adead_letter(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                           error: str, *, resource: str = "", key_field: str = "", deleted: bool = False) -> None:
        """``AsyncDeadLetterStore.adead_letter`` (on the connection's thread)."""
        await self._conn.run(self.dead_letter, workflow, stream, key, payload, status, error, resource=resource,
                             key_field=key_field, deleted=deleted)

    async def adead_letter_count(self, workflow: str) -> int:
        """``AsyncDeadLetterStore.adead_letter_count`` (on the connection's thread)."""
        return await self._conn.run(self.dead_letter_count, workflow)

    async def amarked_for_retry(self, workflow: str, stream: str) -> list[DeadLetter]:
        """``AsyncDeadLetterStore.amarked_for_retry`` (on the connection's thread)."""
        return await self._conn.run(self.marked_for_retry, workflow, stream)

    async def asettle_retry(self, workflow: str, stream: str, delivered: Iterable[str],
                            rejected: Iterable[tuple[str, int, str]], sent: Iterable[str]) -> None:
        """``AsyncDeadLetterStore.asettle_retry`` (on the connection's thread)."""
        await self._conn.run(self.settle_retry, workflow, stream, list(delivered), list(rejected), list(sent))

    def dead_letter(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                    error: str, *, resource: str = "", key_field: str = "", deleted: bool = False) -> None:
        """Store a poison record, or count one more rejection of it (first_seen is kept).
        ``resource``/``key_field``: where it was written, so a retry can write it there again."""
        now = time.time()
        self._db.execute(
            "INSERT INTO dead_letters (workflow, stream, key, payload, status, error, first_seen, last_seen, attempts, "
            "resource, key_field, deleted, retry) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, 0) "
            "ON CONFLICT (workflow, stream, key) DO UPDATE SET "
            "payload = excluded.payload, status = excluded.status, error = excluded.error, "
            "last_seen = excluded.last_seen, attempts = attempts + 1, resource = excluded.resource, "
            "key_field = excluded.key_field, deleted = excluded.deleted, retry = 0",
            (workflow, stream, key, json.dumps(redact(payload), sort_keys=True), status, error, now, now,
             resource, key_field, int(deleted)))

    def dead_letters(self, workflow: str) -> list[dict[str, Any]]:
        """The workflow's dead letters as dicts (stream, key, payload, status, error, first_seen,
        last_seen, attempts), by stream and key."""
        rows = self._db.execute("SELECT stream, key, payload, status, error, first_seen, last_seen, attempts "
                                "FROM dead_letters WHERE workflow = ? ORDER BY stream, key", (workflow,))
        cols = ("stream", "key", "payload", "status", "error", "first_seen", "last_seen", "attempts")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    # -- dead letters: the API's side (list, mark) and the worker's (re-send, settle) ----------
    def dead_letter_count(self, workflow: str) -> int:
        """The workflow's dead letters (records)."""
        return int(self._db.execute("SELECT COUNT(*) FROM dead_letters WHERE workflow = ?",
                                    (workflow,)).fetchone()[0])

    def list_dead_letters(self, workflow: str, after: tuple[str, str] | None, limit: int) -> list[DeadLetter]:
        """A page ordered by (stream, key), starting after the given (stream, key)."""
        stream, key = after or ("", "")
        rows = self._db.execute(
            f"SELECT {', '.join(_LETTER_COLUMNS)} FROM dead_letters WHERE workflow = ? AND "
            "(stream > ? OR (stream = ? AND key > ?)) ORDER BY stream, key LIMIT ?",
            (workflow, stream, stream, key, limit))
        return [_letter(r) for r in rows]

    def mark_for_retry(self, workflow: str, keys: Sequence[str] = ()) -> tuple[int, list[str]]:
        """Mark the workflow's dead letters (all, or those with these keys, in any stream) for
        retry. All or nothing: returns (marked, unknown keys); nothing is marked if a key is unknown."""
        with self._transaction():
            if not keys:
                cur = self._db.execute("UPDATE dead_letters SET retry = 1 WHERE workflow = ?", (workflow,))
                return cur.rowcount, []
            known = {r[0] for r in self._db.execute(
                f"SELECT DISTINCT key FROM dead_letters WHERE workflow = ? AND key IN ({','.join('?' * len(keys))})",
                (workflow, *keys))}
            unknown = [k for k in keys if k not in known]
            if unknown:
                return 0, unknown
            cur = self._db.execute(
                f"UPDATE dead_letters SET retry = 1 WHERE workflow = ? AND key IN ({','.join('?' * len(keys))})",
                (workflow, *keys))
            return cur.rowcount, []

    def marked_for_retry(self, workflow: str, stream: str) -> list[DeadLetter]:
        """The stream's dead letters marked for retry, by key."""
        rows = self._db.execute(f"SELECT {', '.join(_LETTER_COLUMNS)} FROM dead_letters WHERE workflow = ? AND "
                                "stream = ? AND retry = 1 ORDER BY key", (workflow, stream))
        return [_letter(r) for r in rows]

    def settle_retry(self, workflow: str, stream: str, delivered: Iterable[str],
                     rejected: Iterable[tuple[str, int, str]], sent: Iterable[str]) -> None:
        """After a retry: delete what the destination acknowledged; count one more attempt (new
        status and reason, mark cleared) for what it rejected again; clear the mark of the rest."""
        now = time.time()
        with self._transaction():
            self._db.executemany("DELETE FROM dead_letters WHERE workflow = ? AND stream = ? AND key = ?",
                                 [(workflow, stream, k) for k in delivered])
            self._db.executemany(
                "UPDATE dead_letters SET status = ?, error = ?, last_seen = ?, attempts = attempts + 1, retry = 0 "
                "WHERE workflow = ? AND stream = ? AND key = ?",
                [(status, error, now, workflow, stream, k) for k, status, error in rejected])
            self._db.executemany("UPDATE dead_letters SET retry = 0 WHERE workflow = ? AND stream = ? AND key = ?",
                                 [(workflow, stream, k) for k in sent])

    # -- repairs: queued by the API (verify --repair), sent by the worker at its next pass ----------
    def queue_repairs(self, workflow: str, stream: str, records: Sequence[Record]) -> int:
        """Queue records (a newer queueing of a key replaces the older); returns how many."""
        now = time.time()
        with self._transaction():
            self._db.executemany(
                "INSERT INTO repairs (workflow, stream, key, payload, deleted, queued) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (workflow, stream, key) DO UPDATE SET payload = excluded.payload, "
                "deleted = excluded.deleted, queued = excluded.queued",
                [(workflow, stream, r.key, json.dumps(r.values, sort_keys=True, default=str), int(r.deleted), now)
                 for r in records])
        return len(records)

    def repairs(self, workflow: str, stream: str) -> list[Record]:
        """The stream's queued repairs, oldest first (a delete as a record with no values)."""
        rows = self._db.execute("SELECT key, payload, deleted FROM repairs WHERE workflow = ? AND stream = ? "
                                "ORDER BY queued, key", (workflow, stream))
        return [Record(str(k), {} if d else json.loads(p), deleted=bool(d)) for k, p, d in rows]

    def repaired(self, workflow: str, stream: str, keys: Iterable[str]) -> None:
        """Forget the queued repairs of these keys (sent)."""
        self._db.executemany("DELETE FROM repairs WHERE workflow = ? AND stream = ? AND key = ?",
                             [(workflow, stream, k) for k in keys])

    async def aqueue_repairs(self, workflow: str, stream: str, records: Sequence[Record]) -> int:
        """``AsyncRepairQueue.aqueue_repairs`` (on the connection's thread)."""
        return await self._conn.run(self.queue_repairs, workflow, stream, records)

    async def arepairs(self, workflow: str, stream: str) -> list[Record]:
        """``AsyncRepairQueue.arepairs`` (on the connection's thread)."""
        return await self._conn.run(self.repairs, workflow, stream)

    async def arepaired(self, workflow: str, stream: str, keys: Iterable[str]) -> None:
        """``AsyncRepairQueue.arepaired`` (on the connection's thread)."""
        await self._conn.run(self.repaired, workflow, stream, list(keys))

    # -- held records (AsyncHeldStore) --------------------------------------------------------
    def hold(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int, error: str) -> None:
        """Hold a record (first time), or count one more failed attempt. Credential-named fields
        are redacted as in dead letters (:func:`syncplane.state.records.redact`): never stored, never re-sent."""
        self._db.execute(
            "INSERT INTO held (workflow, stream, key, payload, status, error, first_seen, attempts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (workflow, stream, key) DO UPDATE SET "
            "payload = excluded.payload, status = excluded.status, error = excluded.error, attempts = attempts + 1",
            (workflow, stream, key, json.dumps(redact(payload), sort_keys=True), status, error, time.time()))

    def release(self, workflow: str, stream: str, key: str) -> None:
        """Forget a held record (written at last, or dead-lettered)."""
        self._db.execute("DELETE FROM held WHERE workflow = ? AND stream = ? AND key = ?", (workflow, stream, key))

    def all(self, workflow: str, stream: str) -> list[Held]:
        """The stream's held records, oldest first."""
        rows = self._db.execute("SELECT key, payload, status, error, attempts FROM held WHERE workflow = ? AND "
                                "stream = ? ORDER BY first_seen, key", (workflow, stream))
        return [Held(k, json.loads(p), s, e, a) for k, p, s, e, a in rows]

    async def ahold(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                    error: str) -> None:
        """``AsyncHeldStore.ahold`` (on the connection's thread)."""
        await self._conn.run(self.hold, workflow, stream, key, payload, status, error)

    async def arelease(self, workflow: str, stream: str, key: str) -> None:
        """``AsyncHeldStore.arelease`` (on the connection's thread)."""
        await self._conn.run(self.release, workflow, stream, key)

    async def aall(self, workflow: str, stream: str) -> list[Held]:
        """``AsyncHeldStore.aall`` (on the connection's thread)."""
        return await self._conn.run(self.all, workflow, stream)

    # -- the opt-in/out echo memory (EchoMemory) ------------------------------------------------
    def known(self, workflow: str, side: str, keys: Iterable[str]) -> dict[str, dict[str, bool]]:
        """Key → opt-out field → value the sync knows ``side`` holds, for the keys it knows; an
        unreadable row is no baseline (the safe default: opt-out wins)."""
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
                    continue
                if isinstance(value, dict):
                    out[str(key)] = {str(k): bool(v) for k, v in value.items()}
        return out

    def remember(self, workflow: str, side: str, known: Mapping[str, Mapping[str, bool]]) -> None:
        """Replace the known values of these keys (callers pass the merged dict), atomically."""
        if not known:
            return
        now = time.time()
        rows = [(workflow, side, key, json.dumps(dict(values), sort_keys=True), now) for key, values in known.items()]
        with self._transaction():
            self._db.executemany(
                "INSERT INTO optinout_known (workflow, side, key, known, updated) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (workflow, side, key) DO UPDATE SET known = excluded.known, updated = excluded.updated",
                rows)

    def known_count(self, workflow: str) -> int:
        """Keys the echo memory holds for the workflow (both sides)."""
        row = self._db.execute("SELECT COUNT(*) FROM optinout_known WHERE workflow = ?", (workflow,)).fetchone()
        return int(row[0])

    async def aknown(self, workflow: str, side: str, keys: Iterable[str]) -> dict[str, dict[str, bool]]:
        """``EchoMemory.aknown`` (on the connection's thread)."""
        return await self._conn.run(self.known, workflow, side, list(keys))

    async def aremember(self, workflow: str, side: str, known: Mapping[str, Mapping[str, bool]]) -> None:
        """``EchoMemory.aremember`` (on the connection's thread)."""
        await self._conn.run(self.remember, workflow, side, known)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def _letter(row: Sequence[Any]) -> DeadLetter:
    stream, key, resource, key_field, payload, deleted, status, error, first, last, attempts, retry = row
    try:
        values = json.loads(payload)
    except ValueError:
        values = {}
    return DeadLetter(str(stream), str(key), str(resource), str(key_field), values if isinstance(values, dict) else {},
                      bool(deleted), int(status), str(error), float(first), float(last), int(attempts), bool(retry))
