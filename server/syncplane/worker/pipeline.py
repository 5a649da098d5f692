"""The worker pipeline: source -> bounded queue -> transform -> sink batches.

At-least-once: a page's cursor is committed only after every record of it
(and of the pages before it) was acknowledged or dead-lettered; writes are
upserts by the integration key, so a replay after a crash duplicates
nothing. Backlog = records queued + records in flight, not yet written.

Every record read is accounted for in the report (see :mod:`syncplane.worker.report`):
written, deleted, filtered, dead-lettered, held, failed (its pass failed before its
write; it is read again), or still in the backlog.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from opentelemetry import trace

from syncplane.connectors.base import Page, Record, Sink, Source
from syncplane.ingress.transform import Action, Transformed
from syncplane.worker.checkpoints import REDACTED, AsyncCheckpointStore, AsyncDeadLetterStore, AsyncRepairQueue
from syncplane.worker.held import AsyncHeldStore, HoldPolicy
from syncplane.worker.report import WorkerReport

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("syncplane.worker")


class Transform(Protocol):
    """A source record in, a destination action out (ingress and egress each have one)."""

    def apply(self, record: Record, full: bool) -> Transformed: ...

    def source_columns(self) -> list[str]: ...

    def filter_fingerprint(self) -> str: ...


@dataclass(frozen=True)
class Stream:
    """One source table flowing into one destination resource."""

    name: str                      # checkpoint key, e.g. "contact"
    table: str                     # source entity set, e.g. "contacts"
    resource: str                  # destination, e.g. "profile"
    key_field: str                 # destination integration key, e.g. "externalId"
    transform: Transform
    replay: str = ""               # a replay request id for this table; each id is replayed once


@dataclass
class Checkpoint:
    """What a stream commits: where to resume, and what that position was read under."""

    cursor: str | None = None
    filter: str = ""               # the filter fingerprint the cursor was read with
    replay: str = ""               # the last replay request carried out
    rows: int = -1                 # rows counted by the last complete full read (-1: unknown)
    partial: int = 0               # rows so far in a full read in progress
    replaying: bool = False        # the full read in progress is a replay: create-only fields are written
    # A full read began (set with its first page) and its deletes are not reconciled yet: kept
    # across crashes, so the reconciliation happens once the read is complete, in this pass or later.
    reconcile: bool = False

    def dumps(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, raw: str | None) -> Checkpoint:
        if raw is None:
            return cls()
        try:
            data = json.loads(raw)
            return cls(**{k: data[k] for k in ("cursor", "filter", "replay", "rows", "partial", "replaying",
                                                 "reconcile")
                          if k in data})
        except (ValueError, TypeError):
            return cls()  # unreadable: read everything again (idempotent), never guess


#: Where a held record's payload keeps its create-only fields (applyUpdates: false), so that its
#: re-send leaves them alone on a destination record that exists by then.
CREATE_ONLY = "@syncplane.createOnly"


def kept_payload(record: Record) -> dict[str, Any]:
    """What a held record or a dead letter keeps of a record: its values, and which of them are
    create-only (as ``CREATE_ONLY``, a sorted list) when some are."""
    if not record.create_only:
        return record.values
    return {**record.values, CREATE_ONLY: sorted(record.create_only)}


def held_record(key: str, payload: dict[str, Any]) -> Record:
    """A kept payload (held record, dead letter) back as the record to re-send."""
    values = {k: v for k, v in payload.items() if v != REDACTED}  # a credential is never re-sent
    create_only = values.pop(CREATE_ONLY, None)
    return Record(key, values, create_only=frozenset(create_only) if isinstance(create_only, list) else frozenset())


class Pipeline:
    def __init__(self, workflow: str, stream: Stream, source: Source, sink: Sink, report: WorkerReport,
                 batch_size: int, *, checkpoints: AsyncCheckpointStore, letters: AsyncDeadLetterStore,
                 queue_pages: int = 2, guard: Callable[[], Awaitable[None]] | None = None,
                 held: AsyncHeldStore | None = None, hold: HoldPolicy | None = None,
                 repairs: AsyncRepairQueue | None = None,
                 reconcile: Callable[[], Awaitable[Sequence[str]]] | None = None) -> None:
        self.workflow, self.stream = workflow, stream
        # Records `syncplane verify --repair` queued: sent first in the next pass, through the transform.
        self.repairs = repairs
        # Lists the keys the integration wrote at the destination that the source no longer has
        # (see syncplane.ingress.deletes): called once each full read is complete.
        self.reconcile = reconcile
        self.source, self.sink, self.report = source, sink, report
        self.batch_size = batch_size
        self.queue: asyncio.Queue[Page | None] = asyncio.Queue(maxsize=queue_pages)
        self._queued = 0
        self._in_flight = 0
        self.writing = False  # a batch is with the destination: let it finish on stop
        self.checkpoint = Checkpoint()
        # Raises SchemaChanged: called before each page is written and before records the
        # destination rejected are dead-lettered (they may be the first sign of a schema change).
        self.guard = guard
        # Records whose target does not exist yet (e.g. an event's contact): held, re-sent each pass.
        self.held, self.hold = held, hold
        # The keys this stream holds (this pipeline is their only writer): any newer event of
        # one of them supersedes the held copy. Loaded at each pass's retry of them.
        self._held_keys: set[str] = set()
        self._held_loaded = False
        self._held_this_pass: set[str] = set()  # first held in this pass: re-sent from the next one
        self._held_here = 0  # this stream's share of report.held
        # Where cursors live: the worker's SQLite file embedded, a ConfigMap on Kubernetes.
        self.checkpoints = checkpoints
        # Where poison records go: the same SQLite file embedded, ConfigMaps on Kubernetes.
        self.letters = letters
        self._letters = True  # this stream may have dead letters (settled at the start of each pass)

    def _update_backlog(self) -> None:
        self.report.set_backlog(self._queued + self._in_flight)

    async def run_once(self, stop: asyncio.Event) -> int:
        """One pass: read everything new since the checkpoint, write it, commit page by page.

        Returns the records read. On ``stop`` it finishes the batch in flight and returns: the
        last fully written page is committed, the rest is read again at the next start."""
        self.checkpoint = await self._resume_point()
        await self._retry_dead_letters()
        self._held_this_pass = set()
        if self.held is not None and not self._held_loaded:
            self._held_keys = {h.key for h in await self.held.aall(self.workflow, self.stream.name)}
            self._held_loaded = True
            self._count_held()
        if self.repairs is not None:
            # Before the read: a newer change of a repaired record, read in this pass, is written after it.
            await self._run_repairs(stop)
        cursor = self.checkpoint.cursor
        columns = self.stream.transform.source_columns()
        read = 0
        full_pages = False

        async def produce() -> None:
            nonlocal read
            async for page in self.source.pages(self.stream.table, columns, cursor):
                read += len(page.records)
                self.report.read(len(page.records))
                self._queued += len(page.records)
                self._update_backlog()
                await self.queue.put(page)
            await self.queue.put(None)  # the end of the read; a failure ends the task instead

        producer = asyncio.create_task(produce())
        try:
            while (page := await self._next_page(stop, producer)) is not None:
                self._queued -= len(page.records)
                self._in_flight = len(page.records)
                self._update_backlog()
                try:
                    if self.guard is not None and page.records:
                        await self.guard()
                    complete = await self._write_page(page.records, page.full, stop)
                except BaseException:
                    self.writing = False
                    raise
                if not complete:
                    self.writing = False
                    break  # stopped mid-page: not committed, rewritten (idempotently) next time
                if page.full:
                    full_pages = True
                    self.checkpoint.partial += len(page.records)
                    self.checkpoint.reconcile = self.reconcile is not None
                if page.restart:
                    full_pages, self.checkpoint.partial = False, 0
                if page.cursor is not None:
                    self.checkpoint.cursor = page.cursor
                    await self._commit()
                self.writing = False  # the page is written and committed
                self._in_flight = 0
                self._update_backlog()
            read_to_the_end = producer.done() and not producer.cancelled() and producer.exception() is None
            if full_pages and read_to_the_end and not stop.is_set():
                # A full read just completed: the table's size is known.
                self.checkpoint.rows, self.checkpoint.partial = self.checkpoint.partial, 0
                self.checkpoint.replaying = False
                await self._commit()
            if self.checkpoint.reconcile and read_to_the_end and not stop.is_set():
                await self._reconcile_deletes(stop)
            if self.held is not None and read_to_the_end and not stop.is_set():
                # After the read, not before: a newer event of a held key (read just now) has
                # superseded its held copy, which must not be sent after it.
                await self._retry_held()
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            left = self._queued + self._in_flight
            self._queued = self._in_flight = 0
            self._drain_queue()
            if stop.is_set():
                # Stopped: what was read and not written stays the backlog; the next start reads it.
                self.report.set_backlog(left)
            else:
                self.report.done("failed", left)  # the pass failed: the next one reads them again
                self._update_backlog()
        return read

    async def _reconcile_deletes(self, stop: asyncio.Event) -> None:
        """End a full read by reconciling deletes: a full read carries no ``$deletedEntity`` rows
        (after an expired delta token, a replay or a filter change, what was deleted meanwhile is
        simply absent). Each key the integration wrote that the source no longer has goes through
        the transform as the tombstone Dataverse would have sent: deleted where the mapping
        applies deletes, else counted in ``report.stale`` and logged. Records the integration did
        not create are never listed, so never touched."""
        assert self.reconcile is not None
        stale = list(await self.reconcile())
        tombstones = [Record(key, deleted=True) for key in stale]
        deletes = sum(1 for r in tombstones if self.stream.transform.apply(r, True).action == Action.DELETE)
        kept = len(stale) - deletes
        self.report.stale[self.stream.name] = kept
        if kept:
            log.warning("%s: %d records written by the integration are no longer in the source; deletes are "
                        "not applied, so they stay at the destination", self.stream.name, kept)
        if deletes:
            log.info("%s: deleting %d records the source no longer has (found after a full read)",
                     self.stream.name, deletes)
            self.report.read(len(tombstones))  # the tombstones a delta read would have carried
            self._in_flight = len(tombstones)
            self._update_backlog()
            try:
                if not await self._write_page(tombstones, True, stop):
                    return  # stopped: reconciled again next time (deletes are idempotent)
            finally:
                self.report.done("failed", self._in_flight)  # not written: reconciled again next time
                self.writing = False
                self._in_flight = 0
                self._update_backlog()
            self.report.stale_deleted += deletes
        self.checkpoint.reconcile = False
        await self._commit()

    async def _resume_point(self) -> Checkpoint:
        """The committed checkpoint, with its cursor dropped (read everything again) when the
        filter changed since (excluded records must go, admitted ones come) or a new replay
        of this table was asked for."""
        cp = Checkpoint.loads(await self.checkpoints.aload(self.workflow, self.stream.name))
        fingerprint = self.stream.transform.filter_fingerprint()
        if cp.cursor is not None and cp.filter != fingerprint:
            log.info("%s: the filter changed; reading the whole table again", self.stream.name)
            cp.cursor, cp.partial = None, 0
        if self.stream.replay and cp.replay != self.stream.replay:
            log.info("%s: replay %s; reading the whole table again", self.stream.name, self.stream.replay)
            cp.cursor, cp.partial, cp.replaying = None, 0, True
        if cp.cursor is None:
            cp.partial = 0
        cp.filter, cp.replay = fingerprint, self.stream.replay or cp.replay
        if cp.rows >= 0:
            self.report.tables[self.stream.name] = cp.rows
        return cp

    async def _commit(self) -> None:
        await self.checkpoints.acommit(self.workflow, self.stream.name, self.checkpoint.dumps())
        if self.checkpoint.rows >= 0:
            self.report.tables[self.stream.name] = self.checkpoint.rows

    async def _next_page(self, stop: asyncio.Event, producer: asyncio.Task[None]) -> Page | None:
        """The next page; None at the end of the read or on stop (even while a read retries).
        A failed read raises its error here, once the pages before it are written."""
        if stop.is_set():
            return None
        get = asyncio.ensure_future(self.queue.get())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({get, stopped, producer}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if get.done():
            return get.result()
        get.cancel()
        if producer.done() and not stop.is_set():
            producer.result()  # raises the read's error
            raise RuntimeError("the read ended without its end marker")
        return None

    def _drain_queue(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    async def _write_page(self, records: Sequence[Record], full: bool, stop: asyncio.Event) -> bool:
        """Write one page in batches; False when ``stop`` came between two batches."""
        upserts: list[Record] = []
        deletes: list[Record] = []
        for rec in records:
            out = self.stream.transform.apply(rec, full)
            if out.action == Action.UPSERT:
                # A replay writes every field, create-only ones included (DOMAIN.md: "written only on
                # the initial load or a replay"); otherwise the sink decides by key.
                create_only = frozenset() if full and self.checkpoint.replaying else out.create_only
                upserts.append(Record(out.key, out.values, create_only=create_only))
            elif out.action == Action.DELETE:
                deletes.append(Record(out.key, deleted=True))
            self.report.truncated += len(out.truncated)
        self._in_flight = len(upserts) + len(deletes)  # filtered-out records are done
        self.report.done("filtered", len(records) - self._in_flight)
        self._update_backlog()
        batch = upserts + deletes
        held_now: set[str] = set()  # keys held (again) by this page: their newest copy is the held one
        for i in range(0, len(batch), self.batch_size):
            if i and stop.is_set():
                return False
            chunk = batch[i:i + self.batch_size]
            self.writing = True  # until the page is committed (run_once clears it)
            with _tracer.start_as_current_span("batch", attributes={
                    "workflow": self.workflow, "stream": self.stream.name, "records": len(chunk)}):
                result = await self.sink.write(self.stream.resource, self.stream.key_field, chunk, full_load=full)
            if result.rejected and self.guard is not None:
                await self.guard()
            by_key = {r.key: r for r in chunk}
            held_keys: set[str] = set()
            for bad in result.rejected:
                rejected = by_key.get(bad.key)
                payload = kept_payload(rejected) if rejected else {}
                if self.held is not None and self.hold is not None and bad.status in self.hold.statuses:
                    await self.held.ahold(self.workflow, self.stream.name, bad.key, payload, bad.status, bad.error)
                    held_now.add(bad.key)
                    self._held_keys.add(bad.key)
                    self._held_this_pass.add(bad.key)
                    held_keys.add(bad.key)
                    continue
                await self._dead_letter(bad.key, payload, bad.status, bad.error,
                                        deleted=bool(rejected and rejected.deleted))
            if self._letters and result.written:
                # Written now (e.g. corrected at the source): an older dead letter of it is moot.
                await self.letters.asettle_retry(self.workflow, self.stream.name, result.written, (), ())
            if result.rejected or (self._letters and result.written):
                await self._count_letters()
            self._in_flight -= len(chunk)
            self._account(chunk, result.written, {r.key for r in result.rejected}, held_keys)
            self._update_backlog()
        await self._supersede_held(records, held_now)
        return True

    async def _supersede_held(self, records: Sequence[Record], held_now: set[str]) -> None:
        """A held record is superseded by any newer event of its key: written, deleted, filtered
        out, skipped or dead-lettered, the held (older) copy must never be sent after it."""
        if self.held is None or not self._held_keys:
            self._count_held()
            return
        for key in {r.key for r in records} & self._held_keys - held_now:
            await self.held.arelease(self.workflow, self.stream.name, key)
            self._held_keys.discard(key)
        self._count_held()

    def _count_held(self) -> None:
        self.report.held += len(self._held_keys) - self._held_here
        self._held_here = len(self._held_keys)

    def _account(self, chunk: Sequence[Record], written: Sequence[str], rejected: set[str],
                 held: set[str]) -> None:
        """Where each record of a written chunk went. A sink writes one change per key (the last):
        an earlier change of the same key in the chunk shares its outcome."""
        ok = set(written)
        outcome: dict[str, int] = {"written": 0, "deleted": 0, "held": 0, "dead_lettered": 0, "failed": 0}
        for rec in chunk:
            if rec.key in ok:
                outcome["deleted" if rec.deleted else "written"] += 1
            elif rec.key in held:
                outcome["held"] += 1
            elif rec.key in rejected:
                outcome["dead_lettered"] += 1
            else:
                outcome["failed"] += 1
        if outcome["failed"]:
            log.warning("%s: the destination answered nothing for %d record(s) of a batch",
                        self.stream.name, outcome["failed"])
        for name, n in outcome.items():
            self.report.done(name, n)  # type: ignore[arg-type]

    async def _dead_letter(self, key: str, payload: dict[str, Any], status: int, error: str,
                           deleted: bool = False) -> None:
        await self.letters.adead_letter(self.workflow, self.stream.name, key, payload, status, error,
                                        resource=self.stream.resource, key_field=self.stream.key_field,
                                        deleted=deleted)
        self._letters = True

    async def _count_letters(self) -> None:
        self.report.dead_letters = await self.letters.adead_letter_count(self.workflow)
        self.report.dead_letter_store = self.letters.location

    async def _retry_dead_letters(self) -> None:
        """Re-send the dead letters RetryDeadLetters marked, to where they were written; delete
        the ones acknowledged now, count one more attempt for the ones rejected again."""
        marked = await self.letters.amarked_for_retry(self.workflow, self.stream.name)
        for i in range(0, len(marked), self.batch_size):
            chunk = marked[i:i + self.batch_size]
            groups: dict[tuple[str, str], list[Record]] = {}
            for d in chunk:  # older rows lack the target: it is this stream's
                target = (d.resource or self.stream.resource, d.key_field or self.stream.key_field)
                groups.setdefault(target, []).append(Record(d.key, deleted=True) if d.deleted else
                                                     held_record(d.key, d.resend_values()))
            for (resource, key_field), records in groups.items():
                result = await self.sink.write(resource, key_field, records)
                if result.rejected and self.guard is not None:
                    await self.guard()
                await self.letters.asettle_retry(self.workflow, self.stream.name, result.written,
                                                 [(r.key, r.status, r.error) for r in result.rejected],
                                                 [r.key for r in records])
                self.report.resent(len(result.written))
        await self._count_letters()
        self._letters = self.report.dead_letters > 0

    async def _run_repairs(self, stop: asyncio.Event) -> None:
        """Send what verify queued: source records as read (through the transform, as a full read:
        every mapped field), deletes where the mapping applies them. Written, dead-lettered or held
        like any page; dequeued once the page is through (a stop in between sends them again)."""
        assert self.repairs is not None
        queued = await self.repairs.arepairs(self.workflow, self.stream.name)
        if not queued:
            return
        self.report.read(len(queued))  # read from the source by verify: accounted for like any read
        complete = False
        try:
            complete = await self._write_page(queued, True, stop)
        finally:
            # Not written (a failure or a stop): still queued, sent again at the next pass.
            self.report.done("failed", self._in_flight)
            self.writing = False
            self._in_flight = 0
            self._update_backlog()
        if complete:
            await self.repairs.arepaired(self.workflow, self.stream.name, [r.key for r in queued])

    async def _retry_held(self) -> None:
        """Re-send held records; past the policy's attempts they become dead letters."""
        assert self.held is not None and self.hold is not None
        listed = await self.held.aall(self.workflow, self.stream.name)
        self._held_keys = {h.key for h in listed}
        held = [h for h in listed if h.key not in self._held_this_pass]
        for i in range(0, len(held), self.batch_size):
            chunk = held[i:i + self.batch_size]
            by_key = {h.key: h for h in chunk}
            result = await self.sink.write(self.stream.resource, self.stream.key_field,
                                           [held_record(h.key, h.payload) for h in chunk])
            for key in result.written:
                await self.held.arelease(self.workflow, self.stream.name, key)
                self._held_keys.discard(key)
            self.report.resent(len(result.written))
            for bad in result.rejected:
                h = by_key[bad.key]
                if bad.status in self.hold.statuses and h.attempts + 1 < self.hold.max_attempts:
                    await self.held.ahold(self.workflow, self.stream.name, bad.key, h.payload, bad.status, bad.error)
                    continue
                await self.held.arelease(self.workflow, self.stream.name, bad.key)
                self._held_keys.discard(bad.key)
                await self._dead_letter(bad.key, held_record(h.key, h.payload).values, bad.status,
                                        f"held for {h.attempts + 1} passes, still failing: {bad.error}")
        # What is left of the listing is still held: no second listing to count them.
        self._count_held()

