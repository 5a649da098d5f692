"""The sync engine of one worker: the spec's type picks a runner; the engine runs its
passes until stopped, with one error policy for all types.

- Ingress: each entity mapping is a stream from a Dataverse table to a Campaign
  resource. Streams run one after the other in every pass, profiles first, so a
  parent record exists before the children that link to it. With several
  workers, stream i belongs to worker i mod workers (a delta feed cannot be
  partitioned), but its first load is split into key ranges read by every
  worker at once (see syncplane.worker.split).
- Egress: Campaign's event feed to Dynamics activities, keyed by event id; an
  event whose contact does not exist yet is held and re-sent (see syncplane.state.records).
- Opt-in/out: see syncplane.optinout.

Before it says ready, a worker runs its start-time checks (:meth:`Runner.prepare`):
both sides' tokens, and for ingress the schemas against the mapping
(:mod:`syncplane.worker.startcheck`). A problem there fails the start: a spec
problem (``FIELD_NOT_FOUND``) or one outside the spec (``BAD_CREDENTIALS``, which
the control plane retries by itself). A vendor that does not answer is not a
problem of the start: the worker says ready and keeps retrying (the checks run
again with the first pass), and the control plane shows it Degraded.

A pass reads what is new since each stream's checkpoint; then the engine
waits for the poll interval. A connector error that retrying cannot fix
(credentials, a missing table, a schema change) is fatal and reported as such;
anything transient is counted, kept as the last error, and the pass is retried
after a capped backoff. How each link fares (source, destination, state store)
is in the report's ``links``, from which the control plane derives Degraded.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan

from syncplane.connectors.base import ConnectorError, Page
from syncplane.connectors.campaign import CampaignSink, CampaignSource
from syncplane.connectors.dynamics import MAX_PAGE_SIZE, DynamicsSink, DynamicsSource
from syncplane.connectors.http import STOPPING, LinkHealth, OAuth2ClientCredentials, RetryableError
from syncplane.connectors.schema import Schema, SchemaChanged, check
from syncplane.contract.report import WorkerReport
from syncplane.credentials import ConnectionSecret
from syncplane.egress import transform as egress
from syncplane.ingress.deletes import DeleteReconciler
from syncplane.ingress.transform import EntityTransform, MappingNotSupported
from syncplane.optinout.sync import OptInOutSync, build_optinout
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.state.kube_checkpoints import CheckpointError
from syncplane.state.records import HoldPolicy
from syncplane.state.stores import Stores
from syncplane.telemetry import span_context_of
from syncplane.validation.spec import max_concurrency
from syncplane.worker.children import Child, ParentRemoval, child_links
from syncplane.worker.pipeline import Pipeline, Stream, landed_key
from syncplane.worker.split import SplitLoad, owning
from syncplane.worker.startcheck import EntityContext, StartCheckFailed, check_entity, entity_index

log = logging.getLogger("syncplane.worker.engine")

# Retrying cannot fix these: the worker reports them as fatal and the workflow goes to ERROR.
FATAL_REASONS = frozenset({"BAD_CREDENTIALS", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "UNTRUSTED_ORIGIN",
                           "RESPONSE_TOO_LARGE"})
DEFAULT_BATCH_SIZE = 500
# Records per source page: the unit of a checkpoint, and of a schema check (three requests).
PAGE_SIZE = 2000
DEFAULT_POLL_INTERVAL = 5.0
MAX_BACKOFF = 30.0
# How often the start-time checks look whether a vendor stopped answering (seconds).
PREPARE_POLL = 0.1
# What the state store (the worker's SQLite file, the checkpoint ConfigMaps) raises: when it is
# unavailable past its own retries the pass is retried, shown as STATE_STORE_UNAVAILABLE; when it
# refuses (RBAC 403, a missing namespace) retrying cannot help (see `state_store_fatal`).
STATE_STORE_ERRORS = (CheckpointError, sqlite3.OperationalError)


_tracer = trace.get_tracer("syncplane.worker")

class FatalError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def state_store_fatal(exc: BaseException) -> FatalError | None:
    """The fatal error a state-store failure is, with its message (e.g. the RBAC rule a 403 needs);
    None when it is an outage that a later pass can get through."""
    if isinstance(exc, CheckpointError) and not exc.transient:
        return FatalError(exc.reason, str(exc))
    return None


def ingress_streams(spec: pb.WorkflowSpec, index: int = 0, workers: int = 1) -> list[Stream]:
    """The streams this worker owns, in run order: profiles (parents) first, then spec order."""
    entities = list(spec.ingress.entities)
    ordered = sorted(range(len(entities)), key=lambda i: (entities[i].destination_resource != "profile", i))
    replay = spec.ingress.replay
    spec_index = {id(e): i for i, e in enumerate(entities)}
    streams = [Stream(name=e.source_table, table=e.source_table, resource=e.destination_resource,
                      key_field=e.destination_key, transform=EntityTransform(e, index=spec_index[id(e)]),
                      replay=replay.request_id if replay.source_table == e.source_table else "")
               for e in (entities[i] for i in ordered)]
    return [s for i, s in enumerate(streams) if i % max(1, workers) == index]


def poll_interval(spec: pb.WorkflowSpec) -> float:
    d = spec.poll_interval
    seconds = d.seconds + d.nanos / 1e9
    return seconds if seconds > 0 else DEFAULT_POLL_INTERVAL


def _tokens(secret: ConnectionSecret) -> OAuth2ClientCredentials:
    return OAuth2ClientCredentials(secret.token_url, secret.credentials())


class Runner(Protocol):
    """What the engine drives: one type of workflow's passes."""

    @property
    def writing(self) -> bool: ...                 # a batch is with the destination

    def links(self) -> dict[str, LinkHealth]: ...  # "source", "destination" → how its requests fare

    async def prepare(self) -> None: ...           # start-time checks; raises StartCheckFailed, …

    async def run_once(self, stop: asyncio.Event) -> None: ...

    async def classify(self) -> None: ...          # after a failed pass: raise SchemaChanged if it is one

    async def aclose(self) -> None: ...


class _KeyedSource:
    """One table's view of the shared Dataverse source: its key column and entity set. A
    lookup column (Lookup, Customer, Owner) is read as ``_<name>_value`` (the Web API's name)
    and handed on as ``<name>``, its annotations as ``<name>@<term>``. ``annotations``: the
    terms the mapping needs (Prefer odata.include-annotations), none when it needs none."""

    def __init__(self, source: DynamicsSource, key_column: str, entity_set: str,
                 lookups: frozenset[str] = frozenset(), annotations: Sequence[str] = (),
                 where: str | None = None) -> None:
        self.source, self.key_column, self.entity_set, self.lookups = source, key_column, entity_set, lookups
        self.annotations = list(annotations)
        self.where = where  # a key range of a split first load: a plain read of the rows it admits

    def range(self, where: str | None) -> _KeyedSource:
        """The same table's rows in one key range (``$filter``), read without change tracking."""
        return _KeyedSource(self.source, self.key_column, self.entity_set, self.lookups, self.annotations, where)

    def _wire(self, columns: Sequence[str]) -> list[str]:
        return [f"_{c}_value" if c in self.lookups else c for c in columns]

    async def start_tracking(self, columns: Sequence[str]) -> tuple[str, list[str]]:
        """A delta token from now, and a sample of keys (DynamicsSource.start_tracking)."""
        return await self.source.start_tracking(self.entity_set, self._wire(columns), self.key_column)

    async def pages(self, table: str, columns: Sequence[str], cursor: str | None) -> AsyncIterator[Page]:
        wire = self._wire(columns)
        async for page in self.source.pages(self.entity_set, wire, cursor, key_column=self.key_column,
                                            annotations=self.annotations, where=self.where):
            for record in page.records:
                values = record.values
                for c in self.lookups:
                    prefix = f"_{c}_value"
                    for k in [k for k in values if k.startswith(prefix + "@")]:
                        values[c + k[len(prefix):]] = values.pop(k)
                    if (v := values.pop(prefix, None)) is not None or c in columns:
                        values[c] = v
            yield page

    async def aclose(self) -> None:
        pass


class StreamGuard:
    """The schema-change guard of one ingress stream: both sides' schemas at start, compared since."""

    def __init__(self, source: DynamicsSource, sink: CampaignSink, entity: pb.EntityMapping, index: int = 0) -> None:
        self.source, self.sink, self.entity, self.index = source, sink, entity, index
        self.source_fields = {entity.source_key, *(f.source for f in entity.fields),
                              *(c.field for c in entity.filter.conditions), *(r.field for r in entity.replacements)}
        self.destination_fields = {entity.destination_key, *(f.destination for f in entity.fields)}
        self.source_baseline: Schema | None = None
        self.destination_baseline: Schema | None = None

    @property
    def destination_lengths(self) -> dict[str, int]:
        return dict(self.destination_baseline.lengths) if self.destination_baseline else {}

    async def start(self) -> None:
        """Read both schemas (the baselines) and run the start-time checks on them.

        Raises:
            StartCheckFailed: the mapping names a field that does not exist, …
        """
        self.source_baseline = await self.source.table_schema(self.entity.source_table)
        self.destination_baseline = await self.sink.resource_schema(self.entity.destination_resource)
        problems = check_entity(EntityContext(self.index, self.entity, self.source_baseline,
                                              self.destination_baseline))
        if problems:
            raise StartCheckFailed(problems)

    async def __call__(self) -> None:
        """Both schemas compared with the baselines; raises SchemaChanged. The two reads run at
        once (one round trip, not two, before each page); the source's is checked first."""
        source = asyncio.ensure_future(self.source.table_schema(self.entity.source_table))
        try:
            destination = await self.sink.resource_schema(self.entity.destination_resource)
        except BaseException:
            source.cancel()
            await asyncio.gather(source, return_exceptions=True)
            raise
        check(await source, self.source_fields, self.source_baseline)
        check(destination, self.destination_fields, self.destination_baseline)


class _PipelineRunner:
    """Runs pipelines one after the other; subclasses open the source and sink, and build the
    pipelines on the first pass. Owns the tokens they share; the stores come from the Engine."""

    source: Any
    sink: Any

    def __init__(self, workflow: str, spec: pb.WorkflowSpec, secrets: dict[str, ConnectionSecret],
                 stores: Stores, report: WorkerReport, batch_size: int) -> None:
        self.workflow, self.stores, self.report, self.batch_size = workflow, stores, report, batch_size
        self.pipelines: list[Pipeline] = []
        self.src_secret = secrets[spec.source.credentials.name]
        self.dst_secret = secrets[spec.destination.credentials.name]
        self.tokens = [_tokens(self.src_secret), _tokens(self.dst_secret)]

    #: How long a record waits for what it points at (egress: an event's contact) before it is a dead letter.
    hold_policy = HoldPolicy()

    def _pipeline(self, stream: Stream, source: Any, guard: Callable[[], Awaitable[None]] | None = None,
                  reconcile: Callable[[], Awaitable[Sequence[str]]] | None = None,
                  removed: Callable[[Sequence[str]], Awaitable[None]] | None = None, part: str = "",
                  landed: str = "", waits_on: Sequence[str] = ()) -> Pipeline:
        """A pipeline over this runner's sink and stores; a record whose parent (a linked profile,
        an event's contact) is not there yet is held and re-sent. ``part``: one key range of a
        split first load (no repairs: the stream's own pipeline sends them). ``landed``/``waits_on``:
        the parents-landed signals it changes and those it waits on (`Pipeline`, `pipeline.landed_key`)."""
        s = self.stores
        return Pipeline(self.workflow, stream, source, self.sink, self.report, self.batch_size,
                        checkpoints=s.checkpoints, letters=s.letters, guard=guard, held=s.held,
                        hold=self.hold_policy, repairs=None if part else s.repairs, reconcile=reconcile,
                        removed=removed, part=part, landed=landed, waits_on=waits_on)

    async def aclose(self) -> None:
        await self.source.aclose()
        await self.sink.aclose()
        for t in self.tokens:
            await t.aclose()

    #: Pipelines running beside ``pipelines`` (a split first load's key ranges).
    extra: tuple[Pipeline, ...] = ()

    @property
    def writing(self) -> bool:
        return any(p.writing for p in (*self.pipelines, *self.extra))

    def links(self) -> dict[str, LinkHealth]:
        return {"source": self.tokens[0].gate.health, "destination": self.tokens[1].gate.health}

    async def build(self) -> list[Pipeline]:
        raise NotImplementedError

    async def prepare(self) -> None:
        """Both sides' credentials, then the pipelines (for ingress: schemas and start checks)."""
        for t in self.tokens:
            await t.token()
        self.pipelines = await self.build()

    async def run_once(self, stop: asyncio.Event) -> None:
        if not self.pipelines:
            self.pipelines = await self.build()
        for p in self.pipelines:
            if stop.is_set():
                break
            await p.run_once(stop)

    async def classify(self) -> None:
        pass


class IngressRunner(_PipelineRunner):
    # A child waits for its parent however long the parent is filtered out or absent (DOMAIN.md).
    hold_policy = HoldPolicy(max_attempts=None)

    def __init__(self, workflow: str, spec: pb.WorkflowSpec, secrets: dict[str, ConnectionSecret],
                 stores: Stores, report: WorkerReport, batch_size: int, index: int, holder: str = "") -> None:
        super().__init__(workflow, spec, secrets, stores, report, batch_size)
        # ``holder``: this worker's name among workers without an index (Kubernetes pods): a
        # stream's owner is then whoever claims it (split.owning), not worker i mod workers.
        self.indexed = not holder
        self.spec, self.index, self.holder = spec, index, holder or f"worker-{index}"
        self.workers = max(1, spec.workers)
        # Every stream: each worker reads a key range of every first load (worker/split.py);
        # the streams this worker owns it also reads on from the delta token.
        self.streams = ingress_streams(spec)
        self.owned = {s.name for s in ingress_streams(spec, index, self.workers)}
        self.splits: dict[str, SplitLoad] = {}
        dst = self.dst_secret
        page_size = min(MAX_PAGE_SIZE, max(PAGE_SIZE, batch_size))
        # The key column is per table: _KeyedSource passes it per stream.
        self.source = DynamicsSource(spec.source.endpoint, self.tokens[0], key_column="", page_size=page_size,
                                     concurrency=max_concurrency(spec.source))
        self.sink = CampaignSink(spec.destination.endpoint, self.tokens[1], dst.api_key or dst.client_id,
                                 owner=dst.client_id, concurrency=max_concurrency(spec.destination))
        self.guards: list[StreamGuard] = []
        self.landed: dict[str, str] = {}   # stream → the landed signal its writes change ("" : none links to it)

    async def build(self) -> list[Pipeline]:
        pipelines = []
        links = {e.destination_resource: (await self.sink.resource_schema(e.destination_resource)).links
                 for e in self.spec.ingress.entities}
        # Linked resources: who signals a parent's landing, who waits for it (held children, worker/children.py)
        parents = {e.destination_resource for e in self.spec.ingress.entities
                   if child_links(self.spec, e.destination_resource, links)}
        waits_on: dict[str, list[str]] = {}   # child table → the landed signals of its parents
        for r in sorted(parents):
            for link in child_links(self.spec, r, links):
                keys = waits_on.setdefault(link.entity.source_table, [])
                if landed_key(r) not in keys:
                    keys.append(landed_key(r))
        for s in self.streams:
            assert isinstance(s.transform, EntityTransform)
            entity = s.transform.entity
            self.landed[s.name] = landed_key(entity.destination_resource) if entity.destination_resource in parents \
                else ""
            entity_set = await self.source.entity_set(entity.source_table)
            guard = StreamGuard(self.source, self.sink, entity, entity_index(self.spec, entity.source_table))
            await guard.start()
            s.transform.lengths = {**guard.destination_lengths, **s.transform.lengths}
            self.guards.append(guard)
            await self.sink.prepare_links(entity.destination_resource)
            assert guard.source_baseline is not None and guard.destination_baseline is not None
            # The conversion table and typed comparisons (checked at start by guard.start(): a cell
            # or a spec value that does not fit fails the start, not every record as a dead letter).
            s.transform.bind(guard.source_baseline, guard.destination_baseline,
                             self._link_tables(guard.destination_baseline.links))
            keyed = _KeyedSource(self.source, entity.source_key, entity_set, s.transform.lookups(),
                                 s.transform.annotations())
            pipelines.append(self._pipeline(s, keyed,
                                            guard, DeleteReconciler(self.source, entity_set, entity.source_key,
                                                                    self.sink, entity.destination_resource,
                                                                    entity.destination_key),
                                            await self._removal(entity.destination_resource, links),
                                            landed=self.landed[s.name],
                                            waits_on=waits_on.get(entity.source_table, ())))
            if self.workers > 1:
                self.splits[s.name] = self._split(s, keyed, guard)
        return pipelines

    def _split(self, stream: Stream, keyed: _KeyedSource, guard: StreamGuard) -> SplitLoad:
        """The split first load of ``stream``: this worker's key ranges, through pipelines of their own."""

        async def take_token() -> tuple[str, list[str]]:
            return await keyed.start_tracking(stream.transform.source_columns())

        async def run_range(i: int, where: str | None, stop: asyncio.Event) -> None:
            pipeline = self._pipeline(stream, keyed.range(where), guard, part=split.range_key(i),
                                      landed=self.landed.get(stream.name, ""))
            self.extra = (*self.extra, pipeline)
            try:
                await pipeline.run_once(stop)
            finally:
                self.extra = tuple(p for p in self.extra if p is not pipeline)

        split = SplitLoad(self.workflow, stream.name, keyed.key_column, self.workers, self.index, self.holder,
                          self.stores.checkpoints, stream.transform.filter_fingerprint(), take_token, run_range)
        return split

    async def _removal(self, resource: str, links: dict[str, dict[str, str]]) -> ParentRemoval | None:
        """What deleting a ``resource`` record at the destination does to the records linked to
        it (worker/children.py): None when no mapped entity links to it."""
        children = []
        for link in child_links(self.spec, resource, links):
            entity = link.entity
            transform = EntityTransform(entity, index=entity_index(self.spec, entity.source_table))
            source_schema = await self.source.table_schema(entity.source_table)
            destination_schema = await self.sink.resource_schema(entity.destination_resource)
            transform.lengths = {**destination_schema.lengths, **transform.lengths}
            transform.bind(source_schema, destination_schema, self._link_tables(destination_schema.links))
            entity_set = await self.source.entity_set(entity.source_table)
            children.append(Child(link, transform, _KeyedSource(self.source, entity.source_key, entity_set,
                                                                transform.lookups(), transform.annotations()),
                                  entity_set))
        return ParentRemoval(self.workflow, resource, children, self.sink, self.stores.held) if children else None

    def _link_tables(self, links: dict[str, str]) -> dict[str, str]:
        """Link field → the source table whose records its target resource holds (profile ←
        contact): a polymorphic lookup pointing at another table links to nothing."""
        by_resource = {e.destination_resource: e.source_table for e in self.spec.ingress.entities}
        return {f: by_resource[r] for f, r in links.items() if r in by_resource}

    async def run_once(self, stop: asyncio.Event) -> None:
        """Each stream in order: its split first load while there is one (every worker), then,
        for the streams this worker owns, the stream's own pass (changes from the delta cursor)."""
        if not self.pipelines:
            self.pipelines = await self.build()
        try:
            for p in self.pipelines:
                if stop.is_set():
                    break
                name = p.stream.name
                split = self.splits.get(name)
                if split is not None:
                    if not await split.run(stop):
                        continue  # ranges remain (here or with other workers): the next pass looks again
                    del self.splits[name]
                if self.workers > 1 and not self.indexed:
                    await owning(self.stores.checkpoints, self.workflow, name, self.holder, p.run_once, stop)
                elif name in self.owned:
                    await p.run_once(stop)
        finally:
            self.report.resyncs = self.source.resyncs

    async def classify(self) -> None:
        for guard in self.guards:
            try:
                await guard()
            except (ConnectorError, RetryableError):
                return  # cannot tell now; the pass is retried and checked again


class EgressRunner(_PipelineRunner):
    def __init__(self, workflow: str, spec: pb.WorkflowSpec, secrets: dict[str, ConnectionSecret],
                 stores: Stores, report: WorkerReport, batch_size: int) -> None:
        super().__init__(workflow, spec, secrets, stores, report, batch_size)
        src = self.src_secret
        self.source = CampaignSource(spec.source.endpoint, self.tokens[0], src.api_key or src.client_id,
                                     key_field={egress.EVENTS: egress.EVENT_KEY}, line_count=PAGE_SIZE,
                                     concurrency=max_concurrency(spec.source))
        self.sink = DynamicsSink(spec.destination.endpoint, self.tokens[1],
                                 concurrency=max_concurrency(spec.destination))
        self.stream = Stream(name=egress.EVENTS, table=egress.EVENTS, resource=egress.ACTIVITY_SET,
                             key_field=egress.ACTIVITY_KEY, transform=egress.EventTransform(spec.egress))

    async def build(self) -> list[Pipeline]:
        return [self._pipeline(self.stream, self.source)]


class Engine:
    """Runs one worker's passes over ``stores`` (its platform's: syncplane.state.factory)."""

    def __init__(self, workflow: str, spec: pb.WorkflowSpec, secrets: dict[str, ConnectionSecret],
                 stores: Stores, report: WorkerReport, index: int = 0, holder: str = "") -> None:
        self.workflow, self.spec, self.secrets = workflow, spec, secrets
        # Names this worker in claims among workers (worker/split.py): its index embedded (a
        # restarted worker is the same holder; empty here), its pod's name on Kubernetes.
        self.holder = holder
        self.stores, self.report, self.index = stores, report, index
        self.batch_size = spec.batch_size or DEFAULT_BATCH_SIZE
        self.interval = poll_interval(spec)
        self.state_link = LinkHealth()  # the state store's, from the passes' outcomes

    def _runner(self) -> Runner | None:
        """This worker's runner, from :data:`RUNNERS`; None for a spare replica (or no such type)."""
        entry = RUNNERS.get(self.spec.type)
        if entry is None:
            return None
        factory, every_worker = entry
        if every_worker:
            return factory(self, self.stores)
        if self.holder and self.spec.workers > 1:
            # Pods have no index (each runs as worker 0): the one holding the claim does the work,
            # the others stand by and take it over when its holder stops renewing it.
            return ClaimedRunner(factory(self, self.stores), self.stores, self.workflow, self.holder)
        if self.index != 0:
            return None  # one event feed, one contact table: a single worker does the work
        return factory(self, self.stores)

    async def run(self, stop: asyncio.Event) -> None:
        """Sync until ``stop``; raises :class:`FatalError` when retrying cannot help."""
        # From here on every wait of the connectors (backoff, Retry-After, token fetch, retry) is
        # abandoned as soon as the stop begins; only a batch already with the destination finishes.
        stopping = STOPPING.set(stop)
        try:
            await self._run(stop, self._runner())
        finally:
            STOPPING.reset(stopping)

    async def _run(self, stop: asyncio.Event, runner: Runner | None) -> None:
        if runner is None:
            self.report.set_phase("RUNNING", ready=True)
            await stop.wait()  # a spare replica: heartbeats, ready to take over at the next start
            return
        self.report.links = {**runner.links(), "state_store": self.state_link}
        try:
            await self._prepare(stop, runner)
            if stop.is_set():
                return
            self.report.set_phase("RUNNING", ready=True)
            await self._loop(stop, runner)
        finally:
            await runner.aclose()

    async def _prepare(self, stop: asyncio.Event, runner: Runner) -> None:
        """The start-time checks. Raises :class:`FatalError` for the spec's problem (e.g.
        FIELD_NOT_FOUND) or rejected credentials. Returns without them when a vendor fails
        to answer (or on stop): the first pass runs them again, retrying."""
        links = runner.links().values()
        task = asyncio.ensure_future(runner.prepare())
        try:
            while not task.done():
                if stop.is_set() or any(link.failing_since is not None for link in links):
                    task.cancel()
                    break
                await asyncio.wait({task}, timeout=PREPARE_POLL)
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return
        try:
            task.result()
        except (StartCheckFailed, MappingNotSupported, SchemaChanged, ConnectorError) as exc:
            raise FatalError(exc.reason, str(exc)) from None
        except RetryableError as exc:
            log.warning("start checks postponed: %s", exc)

    async def _loop(self, stop: asyncio.Event, runner: Runner) -> None:
        failures = 0
        passes = 0
        # The call that started this run (spec.trace_parent): the first pass joins its trace, later ones link to it.
        started_by = span_context_of(self.spec.trace_parent)
        while not stop.is_set():
            passes += 1
            parent = trace.set_span_in_context(NonRecordingSpan(started_by)) if started_by and passes == 1 else None
            try:
                with _tracer.start_as_current_span(
                        "pass", context=parent, links=[Link(started_by)] if started_by and passes > 1 else None,
                        attributes={"workflow": self.workflow, "worker": self.index, "pass": passes,
                                    "attempt": failures + 1},
                        record_exception=False, set_status_on_exception=False):  # messages stay in status
                    await self._stoppable(runner.run_once(stop), stop, runner)
                failures = 0
                delay = self.interval
                self.state_link.succeeded()
            except (SchemaChanged, MappingNotSupported, StartCheckFailed) as exc:
                raise FatalError(exc.reason, str(exc)) from None
            except ConnectorError as exc:
                if exc.reason in FATAL_REASONS:
                    raise FatalError(exc.reason, str(exc)) from None
                await self._classify(runner)
                failures += 1
                delay = self._transient(exc.reason, str(exc), failures)
            except RetryableError as exc:
                await self._classify(runner)
                failures += 1
                delay = self._transient("TRANSIENT", f"{type(exc).__name__}: {exc}", failures)
            except STATE_STORE_ERRORS as exc:
                if (fatal := state_store_fatal(exc)) is not None:
                    raise fatal from None
                failures += 1
                self.state_link.failed(f"{type(exc).__name__}: {exc}", None)
                delay = self._transient("STATE_STORE_UNAVAILABLE", f"{type(exc).__name__}: {exc}", failures)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass

    @staticmethod
    async def _classify(runner: Runner) -> None:
        """A failed pass may be a schema change (a dropped column fails the read): check."""
        try:
            await runner.classify()
        except SchemaChanged as exc:
            raise FatalError(exc.reason, str(exc)) from None

    @staticmethod
    async def _stoppable(work: Coroutine[Any, Any, None], stop: asyncio.Event, runner: Runner) -> None:
        """Run ``work``; on ``stop``, let a batch in flight finish (the pipeline returns right
        after it, committed), but cancel at once a read, a retry or a backoff: nothing is lost."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not runner.writing:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()

    def _transient(self, reason: str, message: str, failures: int) -> float:
        self.report.last_error = {"reason": reason, "message": message, "time": f"{time.time():.3f}"}
        delay = min(MAX_BACKOFF, 0.5 * 2.0 ** min(failures, 8))
        log.warning("%s: %s (pass %d failed; retrying in %.1fs)", reason, message, failures, delay)
        return delay


class OptInOutRunner:
    """Adapts the opt-in/out sync to the engine's runner."""

    def __init__(self, sync: OptInOutSync) -> None:
        self.sync = sync

    @property
    def writing(self) -> bool:
        return bool(self.sync.writing)

    def links(self) -> dict[str, LinkHealth]:
        return dict(self.sync.links)

    async def prepare(self) -> None:
        await self.sync.prepare()

    async def run_once(self, stop: asyncio.Event) -> None:
        await self.sync.run_once(stop)

    async def classify(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.sync.aclose()


class ClaimedRunner:
    """A runner whose work one worker at a time does (egress: one event feed; opt-in/out: one
    contact table), among workers without an index (Kubernetes pods: every pod of a
    Deployment is worker 0). Each pass runs only while this worker holds the claim
    ``runner@owner`` in the checkpoint store (:func:`syncplane.worker.split.owning`, renewed
    while the pass runs; the pass stops if the claim is lost or cannot be renewed); the others
    pass idle. A graceful stop releases the claim; otherwise it expires ``split.CLAIM_TTL``
    seconds after its last renewal, and another worker takes it. Between passes it is not
    renewed: with a poll interval longer than that, the work may move from worker to worker
    between passes, never two at once."""

    #: The claim's name among the workflow's checkpoints (``<name>@owner``).
    CLAIM = "runner"

    def __init__(self, inner: Runner, stores: Stores, workflow: str, holder: str) -> None:
        self.inner, self.stores, self.workflow, self.holder = inner, stores, workflow, holder

    @property
    def writing(self) -> bool:
        return self.inner.writing

    def links(self) -> dict[str, LinkHealth]:
        return self.inner.links()

    async def prepare(self) -> None:
        await self.inner.prepare()

    async def run_once(self, stop: asyncio.Event) -> None:
        await owning(self.stores.checkpoints, self.workflow, self.CLAIM, self.holder, self.inner.run_once, stop)

    async def classify(self) -> None:
        await self.inner.classify()

    async def aclose(self) -> None:
        await self.inner.aclose()


def _ingress(engine: Engine, stores: Stores) -> Runner:
    return IngressRunner(engine.workflow, engine.spec, engine.secrets, stores, engine.report, engine.batch_size,
                         engine.index, engine.holder)


def _egress(engine: Engine, stores: Stores) -> Runner:
    return EgressRunner(engine.workflow, engine.spec, engine.secrets, stores, engine.report, engine.batch_size)


def _opt_in_out(engine: Engine, stores: Stores) -> Runner:
    return OptInOutRunner(build_optinout(engine.workflow, engine.spec, engine.secrets, stores, engine.report))


#: The runner of each workflow type (``spec.type``), and whether every worker runs one (ingress
#: splits its tables over the workers) or one worker alone (one event feed, one contact table):
#: worker 0 embedded, the holder of a claim among pods (:class:`ClaimedRunner`).
RUNNERS: dict[int, tuple[Callable[[Engine, Stores], Runner], bool]] = {
    pb.WORKFLOW_TYPE_INGRESS: (_ingress, True),
    pb.WORKFLOW_TYPE_EGRESS: (_egress, False),
    pb.WORKFLOW_TYPE_OPT_IN_OUT: (_opt_in_out, False),
}
