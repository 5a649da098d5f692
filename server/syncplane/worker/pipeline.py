"""The worker pipeline: source -> bounded queue -> transform -> sink batches.

At-least-once: a page's cursor is committed only after every record of it
(and of the pages before it) was acknowledged or dead-lettered; writes are
upserts by the integration key, so a replay after a crash duplicates
nothing. Backlog = records queued + records in flight, not yet written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from syncplane.connectors.base import Page, Record, Sink, Source
from syncplane.ingress.transform import Action, EntityTransform
from syncplane.worker.checkpoints import SqliteWorkerState
from syncplane.worker.report import WorkerReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stream:
    """One source table flowing into one destination resource."""

    name: str                      # checkpoint key, e.g. "contact"
    table: str                     # source entity set, e.g. "contacts"
    resource: str                  # destination, e.g. "profile"
    key_field: str                 # destination integration key, e.g. "externalId"
    transform: EntityTransform


class Pipeline:
    def __init__(self, workflow: str, stream: Stream, source: Source, sink: Sink, state: SqliteWorkerState,
                 report: WorkerReport, batch_size: int, queue_pages: int = 2) -> None:
        self.workflow, self.stream = workflow, stream
        self.source, self.sink, self.state, self.report = source, sink, state, report
        self.batch_size = batch_size
        self.queue: asyncio.Queue[Page | None] = asyncio.Queue(maxsize=queue_pages)
        self._queued = 0
        self._in_flight = 0
        self._written_at: list[tuple[float, int]] = []
        self.writing = False  # a batch is with the destination: let it finish on stop

    def _update_backlog(self) -> None:
        self.report.backlog = self._queued + self._in_flight

    async def run_once(self, stop: asyncio.Event) -> int:
        """One pass: read everything new since the checkpoint, write it, commit page by page.

        Returns the records read. On ``stop`` it finishes the batch in flight and returns: the
        last fully written page is committed, the rest is read again at the next start."""
        cursor = self._load_cursor()
        columns = self.stream.transform.source_columns()
        read = 0

        async def produce() -> None:
            nonlocal read
            async for page in self.source.pages(self.stream.table, columns, cursor):
                read += len(page.records)
                self.report.counters.read += len(page.records)
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
                    complete = await self._write_page(page.records, page.full, stop)
                except BaseException:
                    self.report.counters.failed += self._in_flight
                    raise
                if not complete:
                    break  # stopped mid-page: not committed, rewritten (idempotently) next time
                if page.cursor is not None:
                    self._commit(page.cursor)
                self._in_flight = 0
                self._update_backlog()
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            self._queued = self._in_flight = 0
            self._drain_queue()
            self._update_backlog()
        return read

    def _load_cursor(self) -> str | None:
        """The committed cursor, unless the filter changed since: then read everything again
        (records the new filter excludes must go, ones it now admits must come)."""
        raw = self.state.load(self.workflow, self.stream.name)
        if raw is None:
            return None
        try:
            saved = json.loads(raw)
            cursor, fingerprint = str(saved["cursor"]), str(saved["filter"])
        except (ValueError, KeyError, TypeError):
            return None
        if fingerprint != self.stream.transform.filter_fingerprint():
            log.info("%s: the filter changed; reading the whole table again", self.stream.name)
            return None
        return cursor

    def _commit(self, cursor: str) -> None:
        self.state.commit(self.workflow, self.stream.name,
                          json.dumps({"cursor": cursor, "filter": self.stream.transform.filter_fingerprint()}))

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
                upserts.append(Record(out.key, out.values))
            elif out.action == Action.DELETE:
                deletes.append(Record(out.key, deleted=True))
            self.report.truncated += len(out.truncated)
        self._in_flight = len(upserts) + len(deletes)  # filtered-out records are done
        self._update_backlog()
        batch = upserts + deletes
        for i in range(0, len(batch), self.batch_size):
            if i and stop.is_set():
                return False
            chunk = batch[i:i + self.batch_size]
            self.writing = True
            try:
                result = await self.sink.write(self.stream.resource, self.stream.key_field, chunk, full_load=full)
            finally:
                self.writing = False
            by_key = {r.key: r for r in chunk}
            for bad in result.rejected:
                rejected = by_key.get(bad.key)
                self.state.dead_letter(self.workflow, self.stream.name, bad.key,
                                       rejected.values if rejected else {}, bad.status, bad.error)
                self.report.counters.dead_lettered += 1
            self.report.counters.written += len(result.written)
            self._in_flight -= len(chunk)
            self._update_backlog()
            self._throughput(len(result.written))
        return True

    def _throughput(self, n: int) -> None:
        now = time.monotonic()
        self._written_at.append((now, n))
        self._written_at = [(t, k) for t, k in self._written_at if now - t <= 10.0]
        span = max(1e-3, now - self._written_at[0][0]) if len(self._written_at) > 1 else 10.0
        self.report.records_per_second = sum(k for _, k in self._written_at) / span
