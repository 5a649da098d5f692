"""The sync engine of one worker: spec → streams → pipelines, run until stopped.

Ingress: each entity mapping is a stream from a Dataverse table to a Campaign
resource. Streams run one after the other in every pass, profiles first, so a
parent record exists before the children that link to it. With several
workers, stream i belongs to worker i mod workers (a table is never split: a
delta feed cannot be partitioned). A pass reads what is new since each
stream's checkpoint; then the engine waits for the poll interval.

Errors: a connector error that retrying cannot fix (credentials, a missing
table) is fatal and reported as such; anything transient is counted, kept as
the last error, and the pass is retried after a capped backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.connectors.base import ConnectorError, Page, Sink, Source
from syncplane.connectors.campaign import CampaignSink
from syncplane.connectors.dynamics import MAX_PAGE_SIZE, DynamicsSource
from syncplane.connectors.http import OAuth2ClientCredentials, RetryableError
from syncplane.connectors.schema import Schema, SchemaChanged, check
from syncplane.ingress.transform import EntityTransform
from syncplane.worker.checkpoints import SqliteWorkerState
from syncplane.worker.credentials import ConnectionSecret
from syncplane.worker.pipeline import Pipeline, Stream
from syncplane.worker.report import WorkerReport

log = logging.getLogger("syncplane.worker.engine")

# Retrying cannot fix these: the worker reports them as fatal and the workflow goes to ERROR.
FATAL_REASONS = frozenset({"BAD_CREDENTIALS", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND"})
DEFAULT_BATCH_SIZE = 500
# Records per source page: the unit of a checkpoint, and of a schema check (three requests).
PAGE_SIZE = 2000
DEFAULT_POLL_INTERVAL = 5.0
MAX_BACKOFF = 30.0


class FatalError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def ingress_streams(spec: pb.WorkflowSpec, index: int = 0, workers: int = 1) -> list[Stream]:
    """The streams this worker owns, in run order: profiles (parents) first, then spec order."""
    entities = list(spec.ingress.entities)
    ordered = sorted(range(len(entities)), key=lambda i: (entities[i].destination_resource != "profile", i))
    replay = spec.ingress.replay
    streams = [Stream(name=e.source_table, table=e.source_table, resource=e.destination_resource,
                      key_field=e.destination_key, transform=EntityTransform(e),
                      replay=replay.request_id if replay.source_table == e.source_table else "")
               for e in (entities[i] for i in ordered)]
    return [s for i, s in enumerate(streams) if i % max(1, workers) == index]


def poll_interval(spec: pb.WorkflowSpec) -> float:
    d = spec.poll_interval
    seconds = d.seconds + d.nanos / 1e9
    return seconds if seconds > 0 else DEFAULT_POLL_INTERVAL


@dataclass
class Connections:
    source: DynamicsSource
    sink: CampaignSink
    tokens: list[OAuth2ClientCredentials]

    async def aclose(self) -> None:
        await self.source.aclose()
        await self.sink.aclose()
        for t in self.tokens:
            await t.aclose()


def connect_ingress(spec: pb.WorkflowSpec, secrets: dict[str, ConnectionSecret], page_size: int,
                    concurrency: int = 16) -> Connections:
    src_secret = secrets[spec.source.credentials.name]
    dst_secret = secrets[spec.destination.credentials.name]
    src_tokens = OAuth2ClientCredentials(src_secret.token_url, src_secret.credentials())
    dst_tokens = OAuth2ClientCredentials(dst_secret.token_url, dst_secret.credentials())
    # The source key column is per table; the source resolves it per stream (see Engine._pipelines).
    source = DynamicsSource(spec.source.endpoint, src_tokens, key_column="", page_size=page_size)
    sink = CampaignSink(spec.destination.endpoint, dst_tokens, dst_secret.api_key or dst_secret.client_id,
                        owner=dst_secret.client_id, concurrency=concurrency)
    return Connections(source, sink, [src_tokens, dst_tokens])


class _KeyedSource:
    """One table's view of the shared Dataverse source: its key column and entity set."""

    def __init__(self, source: DynamicsSource, key_column: str, entity_set: str) -> None:
        self.source, self.key_column, self.entity_set = source, key_column, entity_set

    def pages(self, table: str, columns: Sequence[str], cursor: str | None) -> AsyncIterator[Page]:
        return self.source.pages(self.entity_set, columns, cursor, key_column=self.key_column)

    async def aclose(self) -> None:
        pass


class Engine:
    def __init__(self, workflow: str, spec: pb.WorkflowSpec, secrets: dict[str, ConnectionSecret],
                 state: SqliteWorkerState, report: WorkerReport, index: int = 0) -> None:
        self.workflow, self.spec, self.secrets = workflow, spec, secrets
        self.state, self.report, self.index = state, report, index
        self.batch_size = spec.batch_size or DEFAULT_BATCH_SIZE
        self.page_size = min(MAX_PAGE_SIZE, max(PAGE_SIZE, self.batch_size))
        self.guards: list[StreamGuard] = []
        self.interval = poll_interval(spec)
        self.pipelines: list[Pipeline] = []

    async def run(self, stop: asyncio.Event) -> None:
        """Sync until ``stop``; raises :class:`FatalError` when retrying cannot help."""
        if self.spec.type != pb.WORKFLOW_TYPE_INGRESS:
            # Egress and opt-in/out engines plug in here; until then the worker only heartbeats.
            self.report.ready, self.report.phase = True, "RUNNING"
            await stop.wait()
            return
        streams = ingress_streams(self.spec, self.index, max(1, self.spec.workers))
        conns = connect_ingress(self.spec, self.secrets, self.page_size)
        try:
            await self._loop(stop, streams, conns)
        finally:
            await conns.aclose()

    async def _loop(self, stop: asyncio.Event, streams: list[Stream], conns: Connections) -> None:
        failures = 0
        self.report.ready, self.report.phase = True, "RUNNING"
        while not stop.is_set():
            try:
                await self._stoppable(self._pass(stop, streams, conns), stop)
                self.report.resyncs = conns.source.resyncs
                failures = 0
                delay = self.interval
            except SchemaChanged as exc:
                raise FatalError(exc.reason, str(exc)) from None
            except ConnectorError as exc:
                if exc.reason in FATAL_REASONS:
                    raise FatalError(exc.reason, str(exc)) from None
                await self._classify()
                failures += 1
                delay = self._transient(exc.reason, str(exc), failures)
            except (RetryableError, httpx.HTTPError) as exc:
                await self._classify()
                failures += 1
                delay = self._transient("TRANSIENT", f"{type(exc).__name__}: {exc}", failures)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    async def _pass(self, stop: asyncio.Event, streams: list[Stream], conns: Connections) -> None:
        if not self.pipelines:
            self.pipelines = await self._pipelines(streams, conns)
        for p in self.pipelines:
            if stop.is_set():
                break
            await p.run_once(stop)

    async def _stoppable(self, work: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
        """Run ``work``; on ``stop``, let a batch in flight finish (the pipeline returns right
        after it, committed), but cancel at once a read, a retry or a backoff: nothing is lost."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not any(p.writing for p in self.pipelines):
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()

    async def _classify(self) -> None:
        """A failed pass may be a schema change (a dropped column fails the read): check."""
        for guard in self.guards:
            try:
                await guard()
            except SchemaChanged as exc:
                raise FatalError(exc.reason, str(exc)) from None
            except (ConnectorError, RetryableError, httpx.HTTPError):
                return  # cannot tell now; the pass is retried and checked again

    def _transient(self, reason: str, message: str, failures: int) -> float:
        self.report.last_error = {"reason": reason, "message": message, "time": f"{time.time():.3f}"}
        delay = min(MAX_BACKOFF, 0.5 * 2.0 ** min(failures, 8))
        log.warning("%s: %s (pass %d failed; retrying in %.1fs)", reason, message, failures, delay)
        return delay

    async def _pipelines(self, streams: list[Stream], conns: Connections) -> list[Pipeline]:
        pipelines = []
        for s in streams:
            entity = s.transform.entity
            entity_set = await conns.source.entity_set(entity.source_table)
            guard = StreamGuard(conns.source, conns.sink, entity)
            await guard.start()
            s.transform.lengths = {**guard.destination_lengths, **s.transform.lengths}
            self.guards.append(guard)
            source: Source = _KeyedSource(conns.source, entity.source_key, entity_set)
            sink: Sink = conns.sink
            pipelines.append(Pipeline(self.workflow, s, source, sink, self.state, self.report, self.batch_size,
                                      guard=guard))
        return pipelines


class StreamGuard:
    """The schema-change guard of one stream: both sides' schemas at start, compared since."""

    def __init__(self, source: DynamicsSource, sink: CampaignSink, entity: pb.EntityMapping) -> None:
        self.source, self.sink, self.entity = source, sink, entity
        self.source_fields = {entity.source_key, *(f.source for f in entity.fields),
                              *(c.field for c in entity.filter.conditions), *(r.field for r in entity.replacements)}
        self.destination_fields = {entity.destination_key, *(f.destination for f in entity.fields)}
        self.source_baseline: Schema | None = None
        self.destination_baseline: Schema | None = None

    @property
    def destination_lengths(self) -> dict[str, int]:
        return dict(self.destination_baseline.lengths) if self.destination_baseline else {}

    async def start(self) -> None:
        self.source_baseline = await self.source.table_schema(self.entity.source_table)
        self.destination_baseline = await self.sink.resource_schema(self.entity.destination_resource)
        check(self.source_baseline, self.source_fields)
        check(self.destination_baseline, self.destination_fields)

    async def __call__(self) -> None:
        check(await self.source.table_schema(self.entity.source_table), self.source_fields, self.source_baseline)
        check(await self.sink.resource_schema(self.entity.destination_resource), self.destination_fields,
              self.destination_baseline)
