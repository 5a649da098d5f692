"""The worker pipeline: source -> bounded queue -> transform -> sink batches.

At-least-once: a page's cursor is committed only after every record of it
(and of the pages before it) was acknowledged or dead-lettered; writes are
upserts by the integration key, so a replay after a crash duplicates
nothing. Backlog = records queued + records in flight, not yet written.
"""

from __future__ import annotations

import asyncio
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

    def _update_backlog(self) -> None:
        self.report.backlog = self._queued + self._in_flight

    async def run_once(self, stop: asyncio.Event) -> int:
        """One pass: read everything new since the checkpoint, write it, commit. Returns records read."""
        cursor = self.state.load(self.workflow, self.stream.name)
        initial = cursor is None
        columns = self.stream.transform.source_columns()
        read = 0

        async def produce() -> None:
            nonlocal read
            try:
                async for page in self.source.pages(self.stream.table, columns, cursor):
                    read += len(page.records)
                    self.report.counters.read += len(page.records)
                    self._queued += len(page.records)
                    self._update_backlog()
                    await self.queue.put(page)
                    if stop.is_set():
                        break  # drain: no new pages; what is queued is still written
            finally:
                await self.queue.put(None)

        producer = asyncio.create_task(produce())
        try:
            while (page := await self.queue.get()) is not None:
                self._queued -= len(page.records)
                self._in_flight = len(page.records)
                self._update_backlog()
                await self._write_page(page.records, initial or page.resynced)
                if page.cursor is not None:
                    self.state.commit(self.workflow, self.stream.name, page.cursor)
                self._in_flight = 0
                self._update_backlog()
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        return read

    async def _write_page(self, records: Sequence[Record], initial: bool) -> None:
        upserts: list[Record] = []
        deletes: list[Record] = []
        for rec in records:
            out = self.stream.transform.apply(rec, initial)
            if out.action == Action.UPSERT:
                upserts.append(Record(out.key, out.values))
            elif out.action == Action.DELETE:
                deletes.append(Record(out.key, deleted=True))
            self.report.truncated += len(out.truncated)
        batch = upserts + deletes
        for i in range(0, len(batch), self.batch_size):
            chunk = batch[i:i + self.batch_size]
            result = await self.sink.write(self.stream.resource, self.stream.key_field, chunk)
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

    def _throughput(self, n: int) -> None:
        now = time.monotonic()
        self._written_at.append((now, n))
        self._written_at = [(t, k) for t, k in self._written_at if now - t <= 10.0]
        span = max(1e-3, now - self._written_at[0][0]) if len(self._written_at) > 1 else 10.0
        self.report.records_per_second = sum(k for _, k in self._written_at) / span
