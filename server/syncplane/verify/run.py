"""``syncplane verify``: read both sides of a workflow and compare them (compare.py).

Read-only. Both sides are read whole, page by page, through the connectors the workers use,
so the same rules hold: ``Retry-After`` holds every request of a client, 5xx and timeouts
back off, at most ``DEFAULT_CONCURRENCY`` requests at once per API, Campaign listings at
``_lineCount`` 10,000 with ``_forcePagination`` and Dataverse pages of 5,000.

- Ingress, per mapped table: the source rows through the workflow's own transform (the
  ``EntityTransform`` the pipeline applies, as a delta pass does: fields whose updates are
  off are not compared) against the resource's records the integration created (listed by
  ``CampaignSink.owned_records``, judged by ``owned_by``: the workers' one definition of it;
  the others carrying a source key are counted as foreign).
- Egress: the event feed through the ``EventTransform`` against the activities, by event id.
- Opt-in/out: each field pair on the contacts that have a profile the integration created.

With ``repair``, the differences are queued in the workers' state for their next pass:
missing and different records are sent again (the source record as read here, through the
transform), extra ones are deleted where the mapping applies deletes. Opt-in/out queues the keys
whose pairs a pass with no memory would write (``rules.repair_plan``: opt-out wins, only where
the workflow writes, an opt-out is never cleared); the worker decides them again from both
sides' values at that pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from syncplane.connectors.base import Record
from syncplane.connectors.campaign import MAX_LINE_COUNT, CampaignSink, CampaignSource, owned_by
from syncplane.connectors.dynamics import MAX_PAGE_SIZE, DynamicsSource, decode_cursor
from syncplane.connectors.http import DEFAULT_CONCURRENCY, OAuth2ClientCredentials, Transport
from syncplane.credentials import ConnectionSecret
from syncplane.egress import transform as egress
from syncplane.ingress.conversion import LOOKUP_TYPES
from syncplane.ingress.transform import EntityTransform, MappingNotSupported
from syncplane.optinout.rules import flag, pairs_of, repair_plan
from syncplane.optinout.sync import (
    CAMPAIGN_STREAM,
    CRM_KEY,
    CRM_STREAM,
    CRM_TABLE,
    PROFILE,
    PROFILE_KEY,
    REPAIR_STREAM,
    direction_of,
)
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.transform import Action
from syncplane.verify.compare import Difference, Row, compare, in_flight, instant, lookup_binds, waiting_for_parent
from syncplane.worker.engine import _KeyedSource, ingress_streams
from syncplane.worker.pipeline import Checkpoint, Stream

OPTINOUT_STREAM = REPAIR_STREAM
MODIFIED_ON = "modifiedon"  # Dataverse's last-modified column; the source's stamp of a record
ACTIVITY_ID = "activityid"  # the primary key every activity table shares


def workers_running(wf: pb.Workflow) -> bool:
    """Whether the workers run now (STARTING or RUNNING): what they have not written yet is in flight,
    and the spec compared is the one they run (the applied snapshot)."""
    from syncplane.lifecycle import effective_phase

    return effective_phase(wf) in (pb.PHASE_RUNNING, pb.PHASE_STARTING)


class WorkerState(Protocol):
    """What verify reads and writes of the workers' state (their SQLite file, embedded)."""

    async def committed(self, workflow: str, stream: str) -> tuple[str | None, float | None]:
        """A stream's committed cursor and when it was committed (epoch seconds)."""
        ...

    async def queue_repairs(self, workflow: str, stream: str, records: Sequence[Record]) -> int:
        """Queue records for the stream's next pass; returns how many."""
        ...


@dataclass
class StreamReport:
    stream: str                  # the checkpoint stream: a source table, ``events``, ``optinout``
    source: str                  # what was read on each side, e.g. ``contacts`` / ``profile``
    destination: str
    diff: Difference
    queued: int = 0              # differences queued for the next pass


@dataclass
class Report:
    streams: list[StreamReport] = field(default_factory=list)
    requests: int = 0            # requests to both APIs, token requests included

    def total(self) -> Difference:
        out = Difference()
        for s in self.streams:
            out.compared += s.diff.compared
            out.missing += s.diff.missing
            out.extra += s.diff.extra
            out.different += s.diff.different
            out.in_flight |= s.diff.in_flight
            out.foreign += s.diff.foreign
            out.held += s.diff.held
        return out


class _Clients:
    """One token provider and one transport (its own concurrency cap and Retry-After gate)
    per API, as a worker has; counts the requests they send."""

    def __init__(self, source: ConnectionSecret, destination: ConnectionSecret) -> None:
        self.source_secret, self.destination_secret = source, destination
        self.tokens = [OAuth2ClientCredentials(s.token_url, s.credentials()) for s in (source, destination)]
        self.transports = [Transport(concurrency=DEFAULT_CONCURRENCY, gate=t.gate) for t in self.tokens]

    @property
    def requests(self) -> int:
        return sum(t.sent for t in self.transports) + sum(t.fetches for t in self.tokens)

    async def aclose(self) -> None:
        for transport in self.transports:
            await transport.aclose()
        for tokens in self.tokens:
            await tokens.aclose()


def _api_key(secret: ConnectionSecret) -> str:
    return secret.api_key or secret.client_id


async def verify(workflow: str, spec: pb.WorkflowSpec, secrets: Mapping[str, ConnectionSecret],
                 state: WorkerState, *, running: bool, repair: bool = False) -> Report:
    """Compare the two sides of ``workflow`` (its current ``spec``).

    Args:
        secrets: the connections' credentials by reference name.
        state: the workers' committed checkpoints (what is in flight) and repair queue.
        running: the workers run now: differences they have not had the chance to write are
            reported as in flight (a stopped workflow has none).
        repair: queue the differences for the workers' next pass.

    Raises:
        syncplane.connectors.base.ConnectorError: an API refused a read (credentials, a table).
        syncplane.connectors.http.RetryableError: an API stayed unavailable past the retries.
    """
    if spec.type == pb.WORKFLOW_TYPE_OPT_IN_OUT:
        crm = _connection(spec, pb.CONNECTOR_KIND_DYNAMICS365)
        acs = _connection(spec, pb.CONNECTOR_KIND_CAMPAIGN_STANDARD)
        clients = _Clients(secrets[crm.credentials.name], secrets[acs.credentials.name])
    else:
        clients = _Clients(secrets[spec.source.credentials.name], secrets[spec.destination.credentials.name])
    report = Report()
    try:
        if spec.type == pb.WORKFLOW_TYPE_INGRESS:
            there: dict[str, set[str]] = {}  # resource → keys at the destination (parents come first)
            for stream in ingress_streams(spec):
                report.streams.append(await _ingress(workflow, spec, stream, clients, state, running, repair, there))
        elif spec.type == pb.WORKFLOW_TYPE_EGRESS:
            report.streams.append(await _egress(workflow, spec, clients, state, running, repair))
        elif spec.type == pb.WORKFLOW_TYPE_OPT_IN_OUT:
            report.streams.append(await _optinout(workflow, spec, crm, acs, clients, state, running, repair))
    finally:
        report.requests = clients.requests
        await clients.aclose()
    return report


@dataclass(frozen=True)
class _Progress:
    """A stream's checkpoint as the workers had committed it when the comparison began."""

    loading: bool              # still in its first full read
    committed: float | None    # when (epoch seconds)


async def _progress(state: WorkerState, workflow: str, stream: str) -> _Progress:
    """Read BEFORE either side: a record changed while the comparison runs is then changed after
    this commit, so in flight; read after, a commit made meanwhile would hide such a change."""
    raw, committed = await state.committed(workflow, stream)
    cursor = Checkpoint.loads(raw).cursor
    return _Progress(cursor is None or cursor.startswith("full "), committed)  # "full …": inside a full read


async def _ingress(workflow: str, spec: pb.WorkflowSpec, stream: Stream, clients: _Clients, state: WorkerState,
                   running: bool, repair: bool, there: dict[str, set[str]]) -> StreamReport:
    """One mapped table. ``there``: resource → the keys its records have at the destination, for
    the streams compared before (parents first); this stream's are added."""
    transform = stream.transform
    assert isinstance(transform, EntityTransform)
    entity = transform.entity
    tokens, (src_transport, dst_transport) = clients.tokens, clients.transports
    dynamics = DynamicsSource(spec.source.endpoint, tokens[0], key_column=entity.source_key,
                              page_size=MAX_PAGE_SIZE, transport=src_transport)
    api_key = _api_key(clients.destination_secret)
    # Every record carrying the key (owner None): the integration's are compared, the others counted.
    listing = CampaignSink(spec.destination.endpoint, tokens[1], api_key, owner=None, transport=dst_transport)
    source_schema, entity_set, destination_schema = await asyncio.gather(
        dynamics.table_schema(entity.source_table), dynamics.entity_set(entity.source_table),
        listing.resource_schema(entity.destination_resource))
    # As the worker does: truncate to the destination's lengths (the spec's own win), and
    # convert by both sides' types (a mapping the table refuses never ran: compared as read).
    transform.lengths = {**destination_schema.lengths, **transform.lengths}
    by_resource = {e.destination_resource: e.source_table for e in spec.ingress.entities}
    try:
        transform.bind(source_schema, destination_schema,
                       {f: by_resource[r] for f, r in destination_schema.links.items() if r in by_resource})
    except MappingNotSupported:
        pass
    lookups = transform.lookups() or frozenset(c for c, t in source_schema.fields.items() if t in LOOKUP_TYPES)
    keyed = _KeyedSource(dynamics, entity.source_key, entity_set, lookups, transform.annotations())
    owner = clients.destination_secret.client_id
    expected: dict[str, Row] = {}
    ignored: set[str] = set()
    read: dict[str, Record] = {}

    async def read_source() -> None:
        # modifiedon (every Dataverse table has it) dates each record: what changed since the last
        # checkpoint is in flight. The transform does not read it: asked for here.
        columns = sorted({*transform.source_columns(), MODIFIED_ON})
        async for page in keyed.pages(stream.table, columns, None):
            for rec in page.records:
                if rec.deleted:
                    continue
                out = transform.apply(rec, False)
                if out.action == Action.UPSERT:
                    # Fields whose updates are off hold what the record was created with: not compared.
                    values = {k: v for k, v in out.values.items() if k not in out.create_only}
                    expected[rec.key] = Row(values, instant(rec.modified))
                    if repair:
                        read[rec.key] = rec
                elif out.action == Action.SKIP:
                    ignored.add(rec.key)  # excluded by the filter, not deleted: whatever is there stays

    actual: dict[str, Row] = {}
    foreign: set[str] = set()

    async def read_destination() -> None:
        fields = list(dict.fromkeys([entity.destination_key, *(m.destination for m in entity.fields)]))
        parents: dict[str, dict[str, Any]] = {}
        for name, target in destination_schema.links.items():
            target_key = (await listing.resource_schema(target)).key or "PKey"
            parents[name] = {r.pkey: r.key async for page in listing.owned_records(target, target_key,
                                                                                     line_count=MAX_LINE_COUNT)
                             for r in page}
        async for page in listing.owned_records(entity.destination_resource, entity.destination_key,
                                                [*fields, "createdBy", "lastModified"], line_count=MAX_LINE_COUNT):
            for rec in page:
                if not owned_by(rec.values, owner):
                    foreign.add(rec.key)
                    continue
                values = {f: rec.values.get(f) for f in fields}
                for name, keys in parents.items():
                    link = values.get(name)
                    if isinstance(link, dict):  # {"PKey": …}: the parent's integration key, as the source has it
                        values[name] = keys.get(str(link.get("PKey")))
                actual[rec.key] = Row(values, instant(rec.values.get("lastModified")))

    progress = await _progress(state, workflow, stream.name)
    await asyncio.gather(read_source(), read_destination())
    theirs = foreign & expected.keys()
    held = waiting_for_parent(expected, destination_schema.links, there)
    diff = compare({k: v for k, v in expected.items() if k not in theirs and k not in held}, actual,
                   ignored=ignored, types=destination_schema.fields)
    diff.foreign, diff.held = len(theirs), len(held)
    there[entity.destination_resource] = {k.lower() for k in (expected.keys() - held) | (actual.keys() & ignored)}
    diff.in_flight = in_flight(diff, [expected], running=running, loading=progress.loading,
                               committed=progress.committed)
    report = StreamReport(stream.name, entity_set, entity.destination_resource, diff)
    if repair:
        deletes = [Record(k, deleted=True) for k in diff.extra]
        records = [read[k] for k in (*diff.missing, *diff.different)] + \
            [r for r in deletes if transform.apply(r, False).action == Action.DELETE]
        report.queued = await state.queue_repairs(workflow, stream.name, records) if records else 0
    return report


async def _egress(workflow: str, spec: pb.WorkflowSpec, clients: _Clients, state: WorkerState, running: bool,
                  repair: bool) -> StreamReport:
    tokens, (src_transport, dst_transport) = clients.tokens, clients.transports
    events = CampaignSource(spec.source.endpoint, tokens[0], _api_key(clients.source_secret),
                            key_field={egress.EVENTS: egress.EVENT_KEY}, line_count=MAX_LINE_COUNT,
                            transport=src_transport)
    dynamics = DynamicsSource(spec.destination.endpoint, tokens[1], key_column="", page_size=MAX_PAGE_SIZE,
                              transport=dst_transport)
    transform = egress.EventTransform(spec.egress)
    expected: dict[str, Row] = {}
    ignored: set[str] = set()
    read: dict[str, Record] = {}
    columns: set[str] = {egress.ACTIVITY_KEY}
    lookups: set[str] = set()
    progress = await _progress(state, workflow, egress.EVENTS)
    async for page in events.pages(egress.EVENTS, transform.source_columns(), None):
        for rec in page.records:
            out = transform.apply(rec, True)
            if out.action != Action.UPSERT:
                ignored.add(rec.key)  # a type switched off, a soft bounce: never written
                continue
            values = lookup_binds(out.values)
            lookups.update(k for k in values if k not in out.values)
            columns.update(values)
            expected[rec.key] = Row(values, instant(rec.modified))
            if repair:
                read[rec.key] = rec
    wire = sorted(f"_{c}_value" if c in lookups else c for c in columns)
    actual: dict[str, Row] = {}
    async for rows in dynamics.snapshot(egress.ACTIVITY_SET, wire, key_column=ACTIVITY_ID):
        for rec in rows:
            key = rec.values.get(egress.ACTIVITY_KEY)
            if key is None:
                continue  # an activity the integration did not write (no event id)
            values = {c: rec.values.get(f"_{c}_value" if c in lookups else c) for c in columns}
            actual[str(key)] = Row(values, instant(rec.modified))
    diff = compare(expected, actual, ignored=ignored)
    diff.in_flight = in_flight(diff, [expected], running=running, loading=progress.loading,
                               committed=progress.committed)
    report = StreamReport(egress.EVENTS, egress.EVENTS, egress.ACTIVITY_SET, diff)
    if repair:
        records = [read[k] for k in (*diff.missing, *diff.different)]
        report.queued = await state.queue_repairs(workflow, egress.EVENTS, records) if records else 0
    return report


def _connection(spec: pb.WorkflowSpec, kind: pb.ConnectorKind.ValueType) -> pb.Connection:
    for conn in (spec.source, spec.destination):
        if conn.kind == kind:
            return conn
    raise ValueError(f"the workflow has no {pb.ConnectorKind.Name(kind)} connection")


async def _optinout(workflow: str, spec: pb.WorkflowSpec, crm: pb.Connection, acs: pb.Connection,
                    clients: _Clients, state: WorkerState, running: bool, repair: bool) -> StreamReport:
    pairs = pairs_of(spec.opt_in_out.field_pairs)
    report = StreamReport(OPTINOUT_STREAM, CRM_TABLE, PROFILE, Difference())
    if spec.opt_in_out.direction in (pb.OPT_IN_OUT_DIRECTION_DISABLED, pb.OPT_IN_OUT_DIRECTION_UNSPECIFIED):
        return report  # nothing is kept in sync: nothing to compare
    tokens, (crm_transport, acs_transport) = clients.tokens, clients.transports
    contacts = DynamicsSource(crm.endpoint, tokens[0], key_column=CRM_KEY, page_size=MAX_PAGE_SIZE,
                              transport=crm_transport)
    profiles = CampaignSink(acs.endpoint, tokens[1], _api_key(clients.destination_secret), owner=None,
                            transport=acs_transport)
    owner = clients.destination_secret.client_id
    crm_rows: dict[str, Row] = {}
    acs_rows: dict[str, Row] = {}
    crm_values: dict[str, dict[str, bool]] = {}  # by the CRM's own field names (for a repair)
    foreign: set[str] = set()

    async def read_crm() -> None:
        async for page in contacts.pages(CRM_TABLE, [*(p.crm for p in pairs), "modifiedon"], None):
            for rec in page.records:
                if not rec.deleted:
                    crm_rows[rec.key] = Row({p.campaign: flag(rec.values.get(p.crm)) for p in pairs},
                                            instant(rec.modified))
                    if repair:
                        crm_values[rec.key] = {p.crm: flag(rec.values.get(p.crm)) for p in pairs}

    async def read_campaign() -> None:
        async for page in profiles.owned_records(PROFILE, PROFILE_KEY, [*(p.campaign for p in pairs), "createdBy",
                                                                        "lastModified"], line_count=MAX_LINE_COUNT):
            for rec in page:
                if not owned_by(rec.values, owner):
                    foreign.add(rec.key)  # the sync never writes a profile someone else created
                    continue
                acs_rows[rec.key] = Row({p.campaign: flag(rec.values.get(p.campaign)) for p in pairs},
                                        instant(rec.values.get("lastModified")))

    (crm_cursor, crm_at), (acs_cursor, acs_at) = await asyncio.gather(  # before the reads: see _progress
        state.committed(workflow, CRM_STREAM), state.committed(workflow, CAMPAIGN_STREAM))
    await asyncio.gather(read_crm(), read_campaign())
    both = crm_rows.keys() & acs_rows.keys()  # a contact without a profile is ingress's business
    expected = {k: crm_rows[k] for k in both}
    actual = {k: acs_rows[k] for k in both}
    diff = compare(expected, actual)
    diff.foreign = len(foreign & crm_rows.keys())
    loading = crm_cursor is None or acs_cursor is None or decode_cursor(crm_cursor)[0]
    committed = min(crm_at, acs_at) if crm_at is not None and acs_at is not None else None
    diff.in_flight = in_flight(diff, [expected, actual], running=running, loading=loading, committed=committed)
    report.diff = diff
    if repair:
        direction = direction_of(spec)
        queue = [Record(k) for k in diff.different
                 if repair_plan(pairs, direction, crm_values[k], dict(acs_rows[k].values)).writes]
        report.queued = await state.queue_repairs(workflow, REPAIR_STREAM, queue) if queue else 0
    return report
