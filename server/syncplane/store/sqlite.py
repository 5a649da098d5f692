"""The embedded store: SQLite in WAL mode.

Every write bumps one global revision and appends to a `changes` log, so a
watcher can resume from any revision still retained. The etag of a workflow
is the revision that last modified it. One process owns the file; watchers in
that process are woken by an in-memory broadcast.

Every SQLite call runs on the connection's own thread (:class:`syncplane.sqlitefile.SqliteConnection`),
never on the event loop: a write waiting up to the busy timeout for another connection's lock
leaves the API, the console and the supervisor's polls running meanwhile.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from syncplane.errors import AlreadyExists, NotFound, OutOfRange, Unavailable
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.sqlitefile import SqliteConnection
from syncplane.store.base import CHANGE_ADDED, CHANGE_DELETED, CHANGE_MODIFIED, Change, Mutation

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0);
CREATE TABLE IF NOT EXISTS workflows (
    name TEXT PRIMARY KEY,
    type INTEGER NOT NULL,
    phase INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    body BLOB NOT NULL,
    applied BLOB
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    type INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (request_id TEXT PRIMARY KEY, name TEXT NOT NULL);
"""
#: Seconds a CreateWorkflow request_id is remembered (a retry within it gets the same workflow
#: back); older ones are pruned on the next create that carries one, so the table stays bounded.
REQUEST_RETENTION = 24 * 3600.0
RETAINED_CHANGES = 10_000
#: Changes a watcher may have pending: a watcher further behind is dropped with the revision to
#: resume from (it re-watches from there and loses nothing), instead of growing memory.
WATCH_QUEUE = 1_000


class _Watcher:
    """One Watch's pending changes; ``dropped`` once it fell :data:`WATCH_QUEUE` changes behind."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Change] = asyncio.Queue(maxsize=WATCH_QUEUE)
        self.dropped = False


#: Workflows as the store's calls return them; change log rows (revision, name, change type, body).
Rows = list[pb.Workflow]
ChangeRows = list[tuple[int, str, int, bytes]]


def _now() -> datetime:
    return datetime.now(UTC)


class SqliteStore:
    def __init__(self, path: Path | str, request_retention: float = REQUEST_RETENTION) -> None:
        self.path = str(path)
        self.request_retention = request_retention
        self._conn = SqliteConnection(self.path, SCHEMA)
        self._db: sqlite3.Connection = self._conn.db  # used only inside self._conn's calls
        self._db.execute("PRAGMA synchronous=NORMAL")
        if "created" not in {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}:
            # Added after the first release: rows from before count as made now.
            self._db.execute("ALTER TABLE requests ADD COLUMN created REAL NOT NULL DEFAULT 0")
            self._db.execute("UPDATE requests SET created = ?", (_now().timestamp(),))
        self._subscribers: set[_Watcher] = set()
        # Parsed rows by name, valid while mod_revision matches: this process is
        # the only writer, so the cache is written through and never stale.
        # Returned messages are shared: callers copy before mutating.
        self._cache: dict[str, tuple[int, pb.Workflow]] = {}
        # Bumped on the connection's thread by every write and delete, before it commits (one
        # that rolls back bumps it too, which only costs a re-read): see list_version.
        self._version = 0

    def close(self) -> None:
        self._conn.close()

    # -- helpers -----------------------------------------------------------
    def _load(self, name: str) -> pb.Workflow:
        hit = self._cache.get(name)
        if hit is not None:  # written through: every write and delete of ``name`` drops it first
            return hit[1]
        row = self._db.execute("SELECT mod_revision FROM workflows WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"workflow {name} not found", {"name": name})
        return self._parsed(name, row[0])

    def _parsed(self, name: str, rev: int) -> pb.Workflow:
        hit = self._cache.get(name)
        if hit is not None and hit[0] == rev:
            return hit[1]
        body = self._db.execute("SELECT body FROM workflows WHERE name = ?", (name,)).fetchone()[0]
        wf = pb.Workflow.FromString(body)
        self._cache[name] = (rev, wf)
        return wf

    def _bump(self) -> int:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")
        row = self._db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        return int(row[0])

    def revision(self) -> int:
        return int(self._db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])

    def _write(self, wf: pb.Workflow, change: int, applied: bytes | None = None,
               keep_applied: bool = True, status_only: bool = False) -> Change:
        rev = self._bump()
        if not status_only:
            wf.etag = str(rev)
        wf.update_time.FromDatetime(_now())
        body = wf.SerializeToString()
        if change == CHANGE_ADDED:
            self._db.execute("INSERT INTO workflows (name, type, phase, mod_revision, body, applied) "
                             "VALUES (?, ?, ?, ?, ?, NULL)", (wf.name, wf.spec.type, wf.status.phase, rev, body))
        elif keep_applied:
            self._db.execute("UPDATE workflows SET phase = ?, mod_revision = ?, body = ? WHERE name = ?",
                             (wf.status.phase, rev, body, wf.name))
        else:
            self._db.execute("UPDATE workflows SET phase = ?, mod_revision = ?, body = ?, applied = ? "
                             "WHERE name = ?", (wf.status.phase, rev, body, applied, wf.name))
        self._db.execute("INSERT INTO changes (revision, name, type, body) VALUES (?, ?, ?, ?)",
                         (rev, wf.name, change, body))
        self._cache.pop(wf.name, None)
        self._version += 1
        if rev % 1000 == 0:
            self._db.execute("DELETE FROM changes WHERE revision <= ?", (rev - RETAINED_CHANGES,))
        return Change(rev, change, wf)

    def _publish(self, change: Change) -> None:
        for watcher in list(self._subscribers):
            try:
                watcher.queue.put_nowait(change)
            except asyncio.QueueFull:
                watcher.dropped = True
                self._subscribers.discard(watcher)

    # -- the interface -----------------------------------------------------
    async def create(self, wf: pb.Workflow, request_id: str = "") -> pb.Workflow:
        change = await self._conn.run(self._create, wf, request_id)
        if change.revision:
            self._publish(change)
        return change.workflow

    def _create(self, wf: pb.Workflow, request_id: str) -> Change:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            if request_id:
                self._db.execute("DELETE FROM requests WHERE created < ?",
                                 (_now().timestamp() - self.request_retention,))
                row = self._db.execute("SELECT name FROM requests WHERE request_id = ?", (request_id,)).fetchone()
                if row is not None:
                    return Change(0, CHANGE_ADDED, self._load(row[0]))  # revision 0: nothing to publish
            exists = self._db.execute("SELECT 1 FROM workflows WHERE name = ?", (wf.name,)).fetchone()
            if exists:
                raise AlreadyExists(f"workflow {wf.name} already exists", {"name": wf.name})
            wf.uid = str(uuid.uuid4())
            wf.generation = 1
            wf.create_time.FromDatetime(_now())
            if wf.status.phase == pb.PHASE_UNSPECIFIED:
                wf.status.phase = pb.PHASE_STOPPED
                wf.status.phase_time.CopyFrom(wf.create_time)
            change = self._write(wf, CHANGE_ADDED)
            if request_id:
                self._db.execute("INSERT INTO requests (request_id, name, created) VALUES (?, ?, ?)",
                                 (request_id, wf.name, _now().timestamp()))
        return change

    async def get(self, name: str) -> pb.Workflow:
        hit = self._cache.get(name)  # written through on the connection's thread: answered here when cached
        if hit is not None:
            return hit[1]
        return await self._conn.run(self._load, name)

    async def list(self, *, types: Sequence[int] = (), phases: Sequence[int] = (), after: str = "",
                   limit: int = 50) -> list[pb.Workflow]:
        return list(await self._conn.run(self._list, types, phases, after, limit))

    def list_version(self) -> int:
        """Changes whenever a workflow is written or deleted (this process is the only writer): a
        caller may reuse what ``list`` answered while it stays the same. Read it before listing."""
        return self._version

    def _list(self, types: Sequence[int], phases: Sequence[int], after: str, limit: int) -> Rows:
        sql, args = "SELECT name, mod_revision FROM workflows WHERE name > ?", list[str | int]([after])
        if types:
            sql += f" AND type IN ({','.join('?' * len(types))})"
            args.extend(types)
        if phases:
            sql += f" AND phase IN ({','.join('?' * len(phases))})"
            args.extend(phases)
        sql += " ORDER BY name LIMIT ?"
        args.append(limit)
        return [self._parsed(name, rev) for name, rev in self._db.execute(sql, args).fetchall()]

    async def update(self, name: str, mutate: Mutation) -> pb.Workflow:
        change = await self._conn.run(self._update, name, mutate)
        if change.revision:
            self._publish(change)
        return change.workflow

    def _update(self, name: str, mutate: Mutation) -> Change:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            current = self._load(name)
            draft = pb.Workflow()
            draft.CopyFrom(current)
            new = mutate(draft)
            if new.spec != current.spec:
                new.generation = current.generation + 1
            elif new == current:
                return Change(0, CHANGE_MODIFIED, current)  # revision 0: nothing written
            return self._write(new, CHANGE_MODIFIED)

    async def delete(self, name: str, check: Callable[[pb.Workflow], None]) -> None:
        self._publish(await self._conn.run(self._delete, name, check))

    def _delete(self, name: str, check: Callable[[pb.Workflow], None]) -> Change:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            wf = self._load(name)
            check(wf)
            rev = self._bump()
            self._db.execute("DELETE FROM workflows WHERE name = ?", (name,))
            self._cache.pop(name, None)
            self._version += 1
            self._db.execute("INSERT INTO changes (revision, name, type, body) VALUES (?, ?, ?, ?)",
                             (rev, name, CHANGE_DELETED, wf.SerializeToString()))
        return Change(rev, CHANGE_DELETED, wf)

    async def get_applied(self, name: str) -> pb.WorkflowSpec | None:
        return await self._conn.run(self._get_applied, name)

    def _get_applied(self, name: str) -> pb.WorkflowSpec | None:
        row = self._db.execute("SELECT applied FROM workflows WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"workflow {name} not found", {"name": name})
        return pb.WorkflowSpec.FromString(row[0]) if row[0] is not None else None

    async def set_status(self, name: str, status: pb.WorkflowStatus,
                         applied: pb.WorkflowSpec | None = None) -> pb.Workflow:
        change = await self._conn.run(self._set_status, name, status, applied)
        self._publish(change)
        return change.workflow

    def _set_status(self, name: str, status: pb.WorkflowStatus, applied: pb.WorkflowSpec | None) -> Change:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            wf = pb.Workflow()
            wf.CopyFrom(self._load(name))
            last_verify = pb.VerifyResult()
            last_verify.CopyFrom(wf.status.last_verify)
            had_verify = wf.status.HasField("last_verify")
            wf.status.CopyFrom(status)
            # The supervisor's status may have been computed before a verify finished: keep the stored one.
            if had_verify:
                wf.status.last_verify.CopyFrom(last_verify)
            else:
                wf.status.ClearField("last_verify")
            blob = applied.SerializeToString() if applied is not None else None
            return self._write(wf, CHANGE_MODIFIED, blob, keep_applied=applied is None, status_only=True)

    async def set_last_verify(self, name: str, result: pb.VerifyResult) -> None:
        self._publish(await self._conn.run(self._set_last_verify, name, result))

    def _set_last_verify(self, name: str, result: pb.VerifyResult) -> Change:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            wf = pb.Workflow()
            wf.CopyFrom(self._load(name))
            wf.status.last_verify.CopyFrom(result)
            return self._write(wf, CHANGE_MODIFIED, status_only=True)

    async def watch(self, start_revision: int = 0, name: str = "") -> AsyncIterator[Change]:
        """Changes from ``start_revision`` (0: every workflow as ADDED, then changes). Raises
        `OutOfRange` for a compacted revision, and `Unavailable` (WATCH_FELL_BEHIND, metadata
        ``resume_revision``) when this watcher fell :data:`WATCH_QUEUE` changes behind: watching
        again from that revision loses nothing."""
        watcher = _Watcher()
        queue = watcher.queue
        self._subscribers.add(watcher)
        try:
            last = start_revision
            if start_revision == 0:
                last, workflows = await self._conn.run(self._snapshot)
                for wf in workflows:
                    if not name or wf.name == name:
                        yield Change(last, CHANGE_ADDED, wf)
            else:
                for rev, wname, ctype, body in await self._conn.run(self._changes_after, start_revision):
                    last = rev
                    if not name or wname == name:
                        yield Change(rev, ctype, pb.Workflow.FromString(body))
            while True:
                if watcher.dropped and queue.empty():
                    raise Unavailable(f"this watch fell more than {WATCH_QUEUE} changes behind; "
                                      f"watch again from revision {last}", "WATCH_FELL_BEHIND",
                                      {"resume_revision": str(last)})
                change = await queue.get()
                if change.revision <= last:
                    continue
                last = change.revision
                if not name or change.workflow.name == name:
                    yield change
        finally:
            self._subscribers.discard(watcher)

    def _snapshot(self) -> tuple[int, Rows]:
        """The current revision and every workflow at it (one call: no write in between)."""
        return self.revision(), self._list((), (), "", 1_000_000)

    def _changes_after(self, start_revision: int) -> ChangeRows:
        oldest = self._db.execute("SELECT MIN(revision) FROM changes").fetchone()[0]
        if oldest is not None and start_revision < oldest - 1:
            raise OutOfRange(f"revision {start_revision} has been compacted; "
                             f"the oldest retained is {oldest}; restart from 0", {"oldest": str(oldest)})
        rows = self._db.execute("SELECT revision, name, type, body FROM changes WHERE revision > ? "
                                "ORDER BY revision", (start_revision,)).fetchall()
        return [(int(r), str(n), int(t), bytes(b)) for r, n, t, b in rows]
