"""The worker pipeline: source -> bounded page queue -> transform -> writers -> sink.

A fixed set of writer coroutines (as many as the sink may have requests in flight, one for a
sink that writes batches) takes work from one bounded queue: a record (a sink that writes one
request per record, e.g. Campaign) or a batch. No task per record, and no barrier between
batches or pages: the next page's records are queued while the last ones of the page before are
still being written. Each page is a ticket counting its records not yet acknowledged; the
cursors commit in page order, up to the last page whose every record (and every record of the
pages before it) was acknowledged, dead-lettered or held: a watermark. Two changes of one key
are written in the order read (a key being written holds back the next write of that key).

At-least-once: writes are upserts by the integration key, so a replay after a crash duplicates
nothing. Backlog = records queued + records in flight, not yet written.

Every record read is accounted for in the report (see :mod:`syncplane.contract.report`):
written, deleted, filtered, dead-lettered, held, failed (its pass failed before its
write; it is read again), or still in the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from opentelemetry import trace

from syncplane import telemetry
from syncplane.connectors.base import Page, Record, Sink, Source
from syncplane.connectors.http import StopRequested
from syncplane.contract.report import WorkerReport
from syncplane.state.records import REDACTED, HoldPolicy
from syncplane.state.stores import AsyncCheckpointStore, AsyncDeadLetterStore, AsyncHeldStore, AsyncRepairQueue
from syncplane.transform import Action, Transform
from syncplane.worker.accounting import Accounting

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("syncplane.worker")


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
        """The checkpoint as the JSON text the checkpoint stores keep."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def loads(cls, raw: str | None) -> Checkpoint:
        """A stored checkpoint back; ``None`` (nothing committed yet) is the start of the table."""
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


def landed_key(resource: str) -> str:
    """The checkpoint key (``<resource>@landed``) whose value changes each time a stream writes records of
    destination ``resource`` that other records link to (a profile a loyalty card points at): the signal,
    through the state store (so across workers), that a held child's parent may be there now."""
    return f"{resource}@landed"


#: A held key this process has not tried yet since it was held: sent at the stream's next retry.
_NEVER = object()


def held_record(key: str, payload: dict[str, Any]) -> Record:
    """A kept payload (held record, dead letter) back as the record to re-send."""
    values = {k: v for k, v in payload.items() if v != REDACTED}  # a credential is never re-sent
    create_only = values.pop(CREATE_ONLY, None)
    return Record(key, values, create_only=frozenset(create_only) if isinstance(create_only, list) else frozenset())


@dataclass(eq=False)
class _Ticket:
    """One page (or one list of records) being written: what its commit applies, and its work
    items not yet done."""

    seq: int
    records: Sequence[Record]     # as read (for superseding held copies)
    page: Page | None             # None: not a read page (repairs, reconciled deletes): nothing to commit
    remaining: int = 0            # work items not yet done
    written: list[str] = field(default_factory=list)  # keys acknowledged
    rejected: bool = False        # some record was rejected (dead-lettered or held)
    done: bool = False            # every item done, the page's own bookkeeping too
    complete: bool = True         # False: an item was not written (a stop): never committed
    full: bool = False            # the records come from a full read
    deleted: list[str] = field(default_factory=list)  # keys deleted at the destination (acknowledged)
    items: list[_Work] = field(default_factory=list)  # work items not yet queued


@dataclass(eq=False)
class _Work:
    ticket: _Ticket
    records: list[Record]         # one key's changes (a sink writing per record) or a batch


class Pipeline:
    """One stream's passes: read since the checkpoint, transform, write, commit by watermark (see the module)."""

    def __init__(self, workflow: str, stream: Stream, source: Source, sink: Sink, report: WorkerReport,
                 batch_size: int, *, checkpoints: AsyncCheckpointStore, letters: AsyncDeadLetterStore,
                 queue_pages: int = 2, guard: Callable[[], Awaitable[None]] | None = None,
                 held: AsyncHeldStore | None = None, hold: HoldPolicy | None = None,
                 repairs: AsyncRepairQueue | None = None,
                 reconcile: Callable[[], Awaitable[Sequence[str]]] | None = None,
                 removed: Callable[[Sequence[str]], Awaitable[None]] | None = None, part: str = "",
                 landed: str = "", waits_on: Sequence[str] = ()) -> None:
        self.workflow, self.stream = workflow, stream
        # Parents and children (linked resources): a stream whose records others link to changes its
        # ``landed`` key (:func:`landed_key`) at the end of each pass that wrote records; a stream whose records link to
        # parents re-sends a held record only when one of the ``waits_on`` keys changed since that record
        # was last tried, or the hold policy's ``recheck_seconds`` have passed since (a parent landing by
        # another route changes no signal), not every pass while its parent is away (a request per held
        # record per pass).
        self.landed, self.waits_on = landed, tuple(waits_on)
        self._landed_dirty = False   # records written since the landed signal last changed
        # held key → (the parents' landed signal when it was last tried, or _NEVER; when: monotonic seconds)
        self._tried: dict[str, tuple[object, float]] = {}
        self._landed_at_start: object = _NEVER  # the signal as this pass began (before any of its writes)
        self._landed_before: object = _NEVER    # the signal at the previous retry of held records
        # A part of a split first load (worker/split.py): its cursor is committed under this key;
        # its dead letters and held records are the stream's, re-sent by the stream's own pipeline
        # (not by each part, which would send them as many times at once).
        self.part = part
        self.checkpoint_key = part or stream.name
        # Called with the keys of a page this stream deleted at the destination, before the page is
        # committed (a failure fails the pass): their linked children are held (worker/children.py).
        self.removed = removed
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
        self.checkpoint = Checkpoint()
        # Raises SchemaChanged: called before each page is written and before records the
        # destination rejected are dead-lettered (they may be the first sign of a schema change).
        self.guard = guard
        # Records whose target does not exist yet (e.g. an event's contact): held, re-sent each pass.
        self.held, self.hold = held, hold
        # The keys this stream holds: any newer event of one of them supersedes the held copy.
        # Loaded at the start of each pass (the pipeline of a parent this stream links to holds
        # the children of the parents it removes: worker/children.py).
        self._held_keys: set[str] = set()
        self._held_this_pass: set[str] = set()  # first held in this pass: re-sent from the next one
        self._held_here = 0  # this stream's share of report.held
        # Where cursors live: the worker's SQLite file embedded, a ConfigMap on Kubernetes.
        self.checkpoints = checkpoints
        # Where poison records go: the same SQLite file embedded, ConfigMaps on Kubernetes.
        self.letters = letters
        self.accounting = Accounting(workflow, report, letters)
        self._letters = True  # this stream may have dead letters (settled at the start of each pass)
        # The writers: as many as the sink may have requests in flight when it writes a request per
        # record (its `writers`), else one writing batches of `batch_size`.
        self.per_record = bool(getattr(sink, "per_record", False))
        self.writers = max(1, int(getattr(sink, "writers", 1))) if self.per_record else 1
        self._work: asyncio.Queue[_Work | None] = asyncio.Queue(maxsize=max(2 * self.writers, 4))
        self._tickets: deque[_Ticket] = deque()  # pages queued for writing, in read order
        self._seq = 0
        self._busy: dict[str, deque[asyncio.Future[None]]] = {}  # key being written → the next writes of it
        self._writing = 0  # work items with the destination now
        self._failure: BaseException | None = None  # a writer's error: the pass fails with it
        self._progress = asyncio.Event()  # a ticket completed, or a writer failed
        self._idle = asyncio.Event()  # no write with the destination
        self._stop: asyncio.Event | None = None
        self._held_seq: dict[str, int] = {}  # held key → the ticket that held it (-1: an earlier pass)

    @property
    def writing(self) -> bool:
        """A write is with the destination: on stop, let it finish (the pass returns right after)."""
        return self._writing > 0

    def _update_backlog(self) -> None:
        self.accounting.backlog(self._queued + self._in_flight)

    async def run_once(self, stop: asyncio.Event) -> int:
        """One pass: read everything new since the checkpoint, write it, commit page by page.

        Returns the records read. On ``stop`` it finishes the batch in flight and returns: the
        last fully written page is committed, the rest is read again at the next start."""
        self.checkpoint = await self._resume_point()
        if not self.part:
            await self._retry_dead_letters()
        self._held_this_pass = set()
        if self.waits_on and not self.part:
            self._landed_at_start = await self._parents_landed()
        if self.held is not None:
            self._held_keys = {h.key for h in await self.held.aall(self.workflow, self.stream.name)}
            self._count_held()
        self._held_seq = dict.fromkeys(self._held_keys, -1)
        self._stop, self._failure = stop, None
        writers = [asyncio.ensure_future(self._writer(stop)) for _ in range(self.writers)]
        producer: asyncio.Task[None] | None = None
        read = 0
        try:
            if self.repairs is not None:
                # Before the read: a newer change of a repaired record, read in this pass, is written after it.
                await self._run_repairs(stop)
            cursor = self.checkpoint.cursor
            columns = self.stream.transform.source_columns()
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
            while True:
                try:
                    page = await self._next_page(stop, producer)
                except Exception:
                    # The read failed: the pages read before it are still written and committed.
                    await (self._quiesce() if stop.is_set() else self._drain(stop))
                    await self._commit_done(full_pages)
                    raise
                if page is None:
                    break
                self._raise_failure()
                self._queued -= len(page.records)
                self._in_flight += len(page.records)
                self._update_backlog()
                if self.guard is not None and page.records:
                    # While the pages before are still being written: its reads overlap their writes,
                    # and it is over before this page's first write.
                    await self.guard()
                self._enqueue_page(page)
                await self._submit(self._tickets[-1])
                full_pages = await self._commit_done(full_pages)
            if stop.is_set():
                await self._quiesce()  # the writes in flight finish; the rest stays in the backlog
            else:
                await self._drain(stop)
            full_pages = await self._commit_done(full_pages)
            self._raise_failure()
            read_to_the_end = (producer.done() and not producer.cancelled() and producer.exception() is None
                               and not self._tickets)
            if full_pages and read_to_the_end and not stop.is_set():
                # A full read just completed: the table's size is known.
                self.checkpoint.rows, self.checkpoint.partial = self.checkpoint.partial, 0
                self.checkpoint.replaying = False
                await self._commit()
            if self.checkpoint.reconcile and read_to_the_end and not stop.is_set():
                await self._reconcile_deletes(stop)
            if self.held is not None and read_to_the_end and not stop.is_set() and not self.part:
                # After the read, not before: a newer event of a held key (read just now) has
                # superseded its held copy, which must not be sent after it.
                await self._retry_held()
        finally:
            if producer is not None and not producer.done():
                producer.cancel()
            await self._stop_writers(writers)
            if producer is not None:
                await asyncio.gather(producer, return_exceptions=True)
            await self._publish_landing()
            self._tickets.clear()
            left = self._queued + self._in_flight
            self._queued = self._in_flight = 0
            self._drain_queue()
            # Stopped: what was read and not written stays the backlog; the next start reads it.
            # Failed: counted failed; the next pass reads them again.
            self.accounting.end_pass(stop.is_set(), left)
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
            try:
                if not await self._write_page(tombstones, True, stop):
                    return  # stopped: reconciled again next time (deletes are idempotent)
            finally:
                self.report.done("failed", self._in_flight)  # not written: reconciled again next time
                self._in_flight = 0
                self._update_backlog()
            self.report.stale_deleted += deletes
        self.checkpoint.reconcile = False
        await self._commit()

    async def _resume_point(self) -> Checkpoint:
        """The committed checkpoint, with its cursor dropped (read everything again) when the
        filter changed since (excluded records must go, admitted ones come) or a new replay
        of this table was asked for."""
        cp = Checkpoint.loads(await self.checkpoints.aload(self.workflow, self.checkpoint_key))
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
        if cp.rows >= 0 and not self.part:
            self.report.tables[self.stream.name] = cp.rows
        return cp

    async def _commit(self) -> None:
        await self.checkpoints.acommit(self.workflow, self.checkpoint_key, self.checkpoint.dumps())
        if self.checkpoint.rows >= 0 and not self.part:
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
        """Write records that are not a read page (repairs, reconciled deletes) through the
        writers, and wait for them; False when a stop came first (not all were written).
        Raises what a writer raised."""
        self._in_flight += len(records)
        self._update_backlog()
        ticket = self._enqueue(records, full, None)
        await self._submit(ticket)
        while not ticket.done and self._failure is None and not stop.is_set():
            self._progress.clear()
            if ticket.done or self._failure is not None:
                break
            await self._wait_progress(stop)
        if stop.is_set():
            await self._quiesce()
        self._tickets.remove(ticket)
        self._raise_failure()
        return ticket.done and ticket.complete

    def _enqueue_page(self, page: Page) -> None:
        self._enqueue(page.records, page.full, page)

    def _enqueue(self, records: Sequence[Record], full: bool, page: Page | None) -> _Ticket:
        """Transform ``records`` (already counted in flight) into work items of a new ticket,
        appended to the tickets in read order; filtered-out records are done at once."""
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
        batch = upserts + deletes
        filtered = len(records) - len(batch)
        self._in_flight -= filtered  # filtered-out records are done
        self.report.done("filtered", filtered)
        self._update_backlog()
        self._seq += 1
        ticket = _Ticket(self._seq, records, page, full=full)
        if self.per_record:
            by_key: dict[str, list[Record]] = {}
            for rec in batch:  # one item per key: its changes in order (the sink writes the last)
                by_key.setdefault(rec.key, []).append(rec)
            ticket.items = [_Work(ticket, recs) for recs in by_key.values()]
        else:
            ticket.items = [_Work(ticket, batch[i:i + self.batch_size])
                            for i in range(0, len(batch), self.batch_size)]
        ticket.remaining = len(ticket.items)
        self._tickets.append(ticket)
        return ticket

    async def _submit(self, ticket: _Ticket) -> None:
        """Queue a ticket's work items for the writers (waits while the queue is full: the
        backpressure on the read). A ticket with none is finished here."""
        items, ticket.items = ticket.items, []
        if not items:
            await self._finish(ticket)
            return
        for item in items:
            if self._failure is not None or (self._stop is not None and self._stop.is_set()):
                ticket.complete = False  # never finished: not committed, read again next time
                return
            await self._work.put(item)

    async def _writer(self, stop: asyncio.Event) -> None:
        """One of the fixed set of writers: takes work items until told to end (None)."""
        ordered = self.writers > 1
        while (work := await self._work.get()) is not None:
            ticket = work.ticket
            key = work.records[0].key
            if ordered:
                await self._take_key(key)  # the previous change of this key first
            try:
                if stop.is_set() or self._failure is not None:
                    ticket.complete = False  # left in the backlog: read again at the next start
                    continue
                self._writing += 1
                self._idle.clear()
                try:
                    await self._write_work(work)
                    ticket.remaining -= 1
                    if ticket.remaining == 0:
                        await self._finish(ticket)
                except StopRequested:
                    ticket.complete = False  # a wait abandoned for the stop: read again at the next start
                except Exception as exc:  # any failure fails the pass: run_once raises it
                    ticket.complete = False
                    if self._failure is None:
                        self._failure = exc
                    self._progress.set()
                finally:
                    self._writing -= 1
                    if not self._writing:
                        self._idle.set()
            finally:
                if ordered:
                    self._give_key(key)

    async def _take_key(self, key: str) -> None:
        """Wait for the writes of ``key`` taken before (FIFO: in the order the items were queued)."""
        waiting = self._busy.get(key)
        if waiting is None:
            self._busy[key] = deque()
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiting.append(turn)
        await turn  # handed over by _give_key: the key stays taken meanwhile

    def _give_key(self, key: str) -> None:
        waiting = self._busy.get(key)
        while waiting:
            turn = waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._busy.pop(key, None)

    async def _write_work(self, work: _Work) -> None:
        """Write one item; dead-letter or hold what the destination rejects; account for each record."""
        chunk, ticket = work.records, work.ticket
        # The batch's span, parent of its vendor requests' client spans; without a tracer provider no span,
        # not even a no-op one (its context costs per record).
        span = (_tracer.start_as_current_span("batch", attributes={
                    "workflow": self.workflow, "stream": self.stream.name, "records": len(chunk)})
                if telemetry.tracing() else contextlib.nullcontext())
        with span:
            result = await self.sink.write(self.stream.resource, self.stream.key_field, chunk, full_load=ticket.full)
        if result.rejected and self.guard is not None:
            await self.guard()
        by_key = {r.key: r for r in chunk}
        held_keys: set[str] = set()
        for bad in result.rejected:
            ticket.rejected = True
            rejected = by_key.get(bad.key)
            payload = kept_payload(rejected) if rejected else {}
            if self.held is not None and self.hold is not None and bad.status in self.hold.statuses:
                await self.held.ahold(self.workflow, self.stream.name, bad.key, payload, bad.status, bad.error)
                self._held_seq[bad.key] = ticket.seq  # its newest copy is the held one
                self._held_keys.add(bad.key)
                self._held_this_pass.add(bad.key)
                # its parent was not there after the signal read as this pass began: a change of it is news
                self._tried[bad.key] = (self._landed_at_start, time.monotonic())
                held_keys.add(bad.key)
                continue
            await self._dead_letter(bad.key, payload, bad.status, bad.error,
                                    deleted=bool(rejected and rejected.deleted))
        ticket.written.extend(result.written)
        last = {r.key: r for r in chunk}  # the change of each key the sink wrote
        ticket.deleted.extend(k for k in result.written if k in last and last[k].deleted)
        self._in_flight -= len(chunk)
        self._account(chunk, result.written, {r.key for r in result.rejected}, held_keys)
        self._update_backlog()

    async def _finish(self, ticket: _Ticket) -> None:
        """A ticket's every item is done: what is kept per page (dead letters settled, held
        copies superseded, the children of removed records held), then it may be committed."""
        if self.removed is not None and ticket.deleted:
            await self.removed(ticket.deleted)
        if self.landed and set(ticket.written) - set(ticket.deleted):
            self._landing()
        if self._letters and ticket.written:
            # Written now (e.g. corrected at the source): an older dead letter of it is moot.
            await self.letters.asettle_retry(self.workflow, self.stream.name, ticket.written, (), ())
        if ticket.rejected or (self._letters and ticket.written):
            await self.accounting.count_letters()
        await self._supersede_held(ticket)
        ticket.done = True
        self._progress.set()

    async def _commit_done(self, full_pages: bool) -> bool:
        """Commit the cursor of the last page of the run of finished pages at the head of the
        read order (the watermark); returns whether a full read's pages were among them."""
        dumped: str | None = None
        while self._tickets and self._tickets[0].done and self._tickets[0].page is not None:
            page = self._tickets.popleft().page
            assert page is not None
            if page.full:
                full_pages = True
                self.checkpoint.partial += len(page.records)
                self.checkpoint.reconcile = self.reconcile is not None
            if page.restart:
                full_pages, self.checkpoint.partial = False, 0
            if page.cursor is not None:
                self.checkpoint.cursor = page.cursor
                dumped = self.checkpoint.dumps()  # as of this page: later ones without a cursor wait
        if dumped is not None:
            await self.checkpoints.acommit(self.workflow, self.checkpoint_key, dumped)
        return full_pages

    async def _wait_progress(self, stop: asyncio.Event) -> None:
        """Until a ticket finishes, a writer fails or ``stop`` is set."""
        progress = asyncio.ensure_future(self._progress.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({progress, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            progress.cancel()
            stopped.cancel()

    async def _drain(self, stop: asyncio.Event) -> None:
        """Wait until every queued ticket is finished (or a writer failed, or ``stop``)."""
        while self._failure is None and not stop.is_set() and not all(t.done for t in self._tickets):
            self._progress.clear()
            if self._failure is not None or all(t.done for t in self._tickets):
                break
            await self._wait_progress(stop)
        if stop.is_set():
            await self._quiesce()

    async def _quiesce(self) -> None:
        """On stop: take back what the writers have not started (it stays in the backlog), and
        wait for the writes in flight to finish."""
        while not self._work.empty():
            work = self._work.get_nowait()
            if work is not None:
                work.ticket.complete = False
        if self._writing:
            await self._idle.wait()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _stop_writers(self, writers: Sequence[asyncio.Future[None]]) -> None:
        for w in writers:
            w.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        while not self._work.empty():
            self._work.get_nowait()
        self._busy.clear()

    async def _supersede_held(self, ticket: _Ticket) -> None:
        """A held record is superseded by any newer event of its key: written, deleted, filtered
        out, skipped or dead-lettered, the held (older) copy must never be sent after it. A copy
        held by this ticket or a later one (pages finish out of order) is newer: it stays."""
        if self.held is None or not self._held_keys:
            self._count_held()
            return
        for key in {r.key for r in ticket.records} & self._held_keys:
            if self._held_seq.get(key, -1) < ticket.seq:
                await self.held.arelease(self.workflow, self.stream.name, key)
                self._tried.pop(key, None)
                self._held_keys.discard(key)
                self._held_seq.pop(key, None)
        self._count_held()

    def _landing(self) -> None:
        """Records of this stream's resource were written: its landed signal changes at the end of the pass
        (:meth:`_publish_landing`), once, not per page (on Kubernetes each is a ConfigMap write)."""
        self._landed_dirty = True

    async def _publish_landing(self) -> None:
        """Change the landed signal (a fresh value) if records were written since it last changed. At the
        end of the parent's pass, after its writes: a child holding a record in between reads the signal
        before this and sees the change at its next pass."""
        if self._landed_dirty:
            await self.checkpoints.acommit(self.workflow, self.landed, uuid.uuid4().hex)
            self._landed_dirty = False

    async def _parents_landed(self) -> object:
        """The landed signals of the parents this stream's records link to, as one comparable value."""
        return tuple([await self.checkpoints.aload(self.workflow, key) for key in self.waits_on])

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
        await self.accounting.dead_letter(self.stream.name, key, payload, status, error,
                                          resource=self.stream.resource, key_field=self.stream.key_field,
                                          deleted=deleted)
        self._letters = True

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
                if self.landed and resource == self.stream.resource and result.written:
                    self._landing()
        await self.accounting.count_letters()
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
            self._in_flight = 0
            self._update_backlog()
        if complete:
            await self.repairs.arepaired(self.workflow, self.stream.name, [r.key for r in queued])

    async def _retry_held(self) -> None:
        """Re-send held records; past the policy's attempts they become dead letters."""
        assert self.held is not None and self.hold is not None
        landed = await self._parents_landed() if self.waits_on else _NEVER   # read before the listing
        listed = await self.held.aall(self.workflow, self.stream.name)
        self._held_keys = {h.key for h in listed}
        held = [h for h in listed if h.key not in self._held_this_pass]
        if self.waits_on:
            # A key first seen now was held (by the parent's removal) after the previous retry's signal was
            # read: a parent landing since then has changed it. Only keys whose parents' signal changed since
            # they were last tried are sent: a held child is sent again when a parent lands, not every pass.
            # A key not tried for the hold policy's recheck_seconds is sent all the same: its parent may
            # have landed by a route the signal cannot see (another workflow, a marketer, an import).
            now = time.monotonic()
            for h in held:
                self._tried.setdefault(h.key, (self._landed_before, now))
            self._landed_before = landed
            held = [h for h in held if self._tried[h.key][0] != landed
                    or now - self._tried[h.key][1] >= self.hold.recheck_seconds]
        for i in range(0, len(held), self.batch_size):
            chunk = held[i:i + self.batch_size]
            by_key = {h.key: h for h in chunk}
            result = await self.sink.write(self.stream.resource, self.stream.key_field,
                                           [held_record(h.key, h.payload) for h in chunk])
            for key in result.written:
                await self.held.arelease(self.workflow, self.stream.name, key)
                self._held_keys.discard(key)
                self._tried.pop(key, None)
            self.report.resent(len(result.written))
            if self.landed and result.written:
                self._landing()
            for bad in result.rejected:
                h = by_key[bad.key]
                if bad.status in self.hold.statuses and (self.hold.max_attempts is None
                                                         or h.attempts + 1 < self.hold.max_attempts):
                    await self.held.ahold(self.workflow, self.stream.name, bad.key, h.payload, bad.status, bad.error)
                    self._tried[bad.key] = (landed, time.monotonic())
                    continue
                await self.held.arelease(self.workflow, self.stream.name, bad.key)
                self._tried.pop(bad.key, None)
                self._held_keys.discard(bad.key)
                await self._dead_letter(bad.key, held_record(h.key, h.payload).values, bad.status,
                                        f"held for {h.attempts + 1} passes, still failing: {bad.error}")
        # What is left of the listing is still held: no second listing to count them.
        self._count_held()

