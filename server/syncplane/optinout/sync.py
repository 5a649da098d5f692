"""The opt-in/out sync of one workflow: one pass both ways per mode (:meth:`OptInOutSync.run_once`).

A pass:

1. reads the Campaign profile feed (``byLastModified``, from its cursor) into memory, keyed
   by ``externalId`` (profiles without one cannot be matched and are not seen);
2. reads the Dataverse contacts delta (change tracking, from its cursor) page by page; each
   page is joined by key with the Campaign changes, decided (:mod:`.rules`), written to both
   sides, the echo memory updated, and only then the CRM cursor committed;
3. decides and writes the Campaign changes no CRM change matched, then commits the
   Campaign cursor.

At-least-once: a cursor moves only after the other side acknowledged the writes it covers
(or the record was dead-lettered); replaying a change is harmless (updates to a value, and
the echo memory turns a replayed change into an echo). In the one-way modes the target's
feed is read too, but only as the target's current state (no useless writes, the PKey and
owner of each profile without a lookup): target changes never flow back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from syncplane.connectors.base import Record, Rejected
from syncplane.connectors.campaign import CampaignSource
from syncplane.connectors.dynamics import MAX_PAGE_SIZE, DynamicsSource
from syncplane.connectors.http import LinkHealth, OAuth2ClientCredentials, Transport
from syncplane.contract.report import WorkerReport
from syncplane.credentials import ConnectionSecret
from syncplane.optinout.rules import (
    CAMPAIGN,
    CRM,
    Direction,
    FieldPair,
    Observed,
    Plan,
    flag,
    pairs_of,
    parse_time,
    plan,
    repair_plan,
)
from syncplane.optinout.writers import CampaignOptOutWriter, CampaignWrite, DynamicsOptOutWriter, Outcome
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.state.stores import AsyncCheckpointStore, AsyncDeadLetterStore, AsyncRepairQueue, EchoMemory, Stores
from syncplane.validation.spec import max_concurrency
from syncplane.worker.accounting import Accounting

log = logging.getLogger("syncplane.optinout")

CRM_STREAM = "optinout:crm"            # checkpoint and dead-letter stream of the Dataverse side
CAMPAIGN_STREAM = "optinout:campaign"  # … of the Campaign side
REPAIR_STREAM = "optinout"             # the keys `syncplane verify --repair` queued (its stream name)
CRM_TABLE, CRM_KEY = "contacts", "contactid"
PROFILE, PROFILE_KEY = "profile", "externalId"
DEFAULT_BATCH_SIZE = 500
CAMPAIGN_LINE_COUNT = 5000

_DIRECTIONS = {
    pb.OPT_IN_OUT_DIRECTION_DISABLED: Direction.DISABLED,
    pb.OPT_IN_OUT_DIRECTION_UNSPECIFIED: Direction.DISABLED,
    pb.OPT_IN_OUT_DIRECTION_CRM_TO_MARKETING: Direction.CRM_TO_MARKETING,
    pb.OPT_IN_OUT_DIRECTION_MARKETING_TO_CRM: Direction.MARKETING_TO_CRM,
    pb.OPT_IN_OUT_DIRECTION_BIDIRECTIONAL: Direction.BIDIRECTIONAL,
}


@dataclass
class PassStats:
    """What the last pass did (also accumulated over the sync's life in ``OptInOutSync.totals``)."""

    read_crm: int = 0
    read_campaign: int = 0
    echoes: int = 0             # records read back carrying no change (our own writes, other columns)
    conflicts: int = 0          # pairs decided by the modification times
    first_sight: int = 0        # pairs decided by "no baseline: opt-out wins"
    written_crm: int = 0
    written_campaign: int = 0
    write_requests: int = 0     # PATCHes to Campaign + $batch parts to Dataverse
    absent: int = 0             # no matching record on the other side
    rejected: int = 0

    def add(self, other: PassStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Item:
    key: str
    crm: Record | None = None
    campaign: Record | None = None
    plan: Plan = field(default_factory=Plan)


def _records(item: _Item) -> int:
    """Records read that an item joins: its CRM change, its Campaign change, or both."""
    return int(item.crm is not None) + int(item.campaign is not None)


def _held_after(before: Mapping[str, bool], seen: Record | None, fields: Sequence[str],
                written: Mapping[str, bool]) -> dict[str, bool] | None:
    """What one side holds of a key's pairs after a batch, for the echo memory: what it was known to hold
    (``before``), overlaid with the ``fields`` it was ``seen`` holding, then with what it acknowledged
    we wrote (``written``); None when that is no change."""
    after = dict(before)
    if seen is not None:
        after.update({f: flag(seen.values.get(f)) for f in fields})
    after.update(written)
    return None if after == before else after


class OptInOutSync:
    def __init__(self, workflow: str, direction: Direction, pairs: Sequence[FieldPair], *,
                 crm_source: DynamicsSource, crm_writer: DynamicsOptOutWriter, campaign_source: CampaignSource,
                 campaign_writer: CampaignOptOutWriter, checkpoints: AsyncCheckpointStore,
                 letters: AsyncDeadLetterStore, memory: EchoMemory, report: WorkerReport,
                 repairs: AsyncRepairQueue | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 closers: Sequence[OAuth2ClientCredentials | Transport] = (),
                 links: dict[str, LinkHealth] | None = None) -> None:
        self.workflow, self.direction, self.pairs = workflow, direction, list(pairs)
        self.crm_source, self.crm_writer = crm_source, crm_writer
        self.campaign_source, self.campaign_writer = campaign_source, campaign_writer
        self.memory, self.report = memory, report
        # The worker's stores (syncplane.state.factory): cursors and dead letters in the state file
        # embedded, ConfigMaps on Kubernetes; the echo memory in a SQLite file on both.
        self.checkpoints, self.letters, self.repairs = checkpoints, letters, repairs
        self.accounting = Accounting(workflow, report, letters)   # dead letters, backlog: as the pipeline's
        self.batch_size = max(1, batch_size)
        self._closers = list(closers)
        # "source", "destination" → how the requests to that side fare (for the worker's status).
        self.links = dict(links or {})
        self.crm_fields = [p.crm for p in self.pairs]
        self.campaign_fields = [p.campaign for p in self.pairs]
        self.last = PassStats()
        self.totals = PassStats()
        self.writing = False  # a batch is with a destination: let it finish on stop
        self._queued = 0

    async def prepare(self) -> None:
        """Start-time checks: both sides' credentials (a token each)."""
        for c in self._closers:
            if isinstance(c, OAuth2ClientCredentials):
                await c.token()

    # ------------------------------------------------------------------ the pass
    async def run_once(self, stop: asyncio.Event) -> None:
        """One pass both ways per mode. On ``stop`` it finishes the batch in flight and returns;
        what is not committed is read again at the next pass (idempotently)."""
        self.last = PassStats()
        if self.direction == Direction.DISABLED or not self.pairs:
            return
        try:
            await self._pass(stop)
        finally:
            self.totals.add(self.last)
            left, self._queued = self._queued, 0
            # Stopped: what was read and not written stays the backlog; failed: the next pass reads it again.
            self.accounting.end_pass(stop.is_set(), left)

    async def _pass(self, stop: asyncio.Event) -> None:
        await self._retry_dead_letters()
        await self._run_repairs()
        campaign_cursor = await self.checkpoints.aload(self.workflow, CAMPAIGN_STREAM)
        crm_cursor = await self.checkpoints.aload(self.workflow, CRM_STREAM)
        campaign_from_start = campaign_cursor is None
        crm_from_start = crm_cursor is None

        # 1. Campaign changes, all of them (one request per 5,000 profiles).
        pending: dict[str, Record] = {}
        next_campaign_cursor = campaign_cursor
        columns = [*self.campaign_fields, PROFILE_KEY, "PKey", "createdBy", "lastModified"]
        async for page in self.campaign_source.pages(PROFILE, columns, campaign_cursor):
            self._read(CAMPAIGN, len(page.records))
            for rec in page.records:
                if pending.pop(rec.key, None) is not None:
                    self.report.done("filtered", 1)  # superseded by a later change of the profile
                pending[rec.key] = rec
                self.campaign_writer.remember(rec.key, rec.values)
            self._set_backlog(len(pending))
            next_campaign_cursor = page.cursor or next_campaign_cursor
            if stop.is_set():
                return

        # 2. CRM changes page by page, joined with the Campaign changes of the same keys.
        crm_columns = [*self.crm_fields, "modifiedon"]
        async for page in self.crm_source.pages(CRM_TABLE, crm_columns, crm_cursor, key_column=CRM_KEY):
            self._read(CRM, len(page.records))
            items: dict[str, _Item] = {}
            for rec in page.records:
                if rec.deleted:
                    continue  # a deleted contact has nothing to sync
                items[rec.key] = _Item(rec.key, crm=rec)
            # Deleted contacts, and earlier changes of a contact on the same page: nothing to write.
            self.report.done("filtered", len(page.records) - len(items))
            for key, item in items.items():
                item.campaign = pending.pop(key, None)
            self._set_backlog(len(pending) + sum(_records(i) for i in items.values()))
            await self._apply(list(items.values()), campaign_complete=campaign_from_start, crm_complete=False)
            self._set_backlog(len(pending))  # (at once: the items are accounted for)
            if page.cursor is not None:
                await self.checkpoints.acommit(self.workflow, CRM_STREAM, page.cursor)
            if stop.is_set():
                return

        # 3. Campaign changes no CRM change matched. After a full CRM read, a key it did not
        #    return has no contact: nothing to write there.
        rest = [_Item(key, campaign=rec) for key, rec in pending.items()]
        for i in range(0, len(rest), self.batch_size):
            if i and stop.is_set():
                return
            chunk = rest[i:i + self.batch_size]
            await self._apply(chunk, campaign_complete=False, crm_complete=crm_from_start)
            self._set_backlog(len(rest) - i - len(chunk))
        if next_campaign_cursor is not None:
            await self.checkpoints.acommit(self.workflow, CAMPAIGN_STREAM, next_campaign_cursor)

    # ------------------------------------------------------------------ one batch of keys
    async def _apply(self, items: list[_Item], *, campaign_complete: bool, crm_complete: bool) -> None:
        if not items:
            return
        keys = [i.key for i in items]
        known_crm = await self.memory.aknown(self.workflow, CRM, keys)
        known_campaign = await self.memory.aknown(self.workflow, CAMPAIGN, keys)
        to_campaign: list[CampaignWrite] = []
        to_crm: list[tuple[str, dict[str, bool]]] = []
        for item in items:
            crm_obs = Observed(item.crm.values, parse_time(item.crm.modified)) if item.crm else None
            campaign_obs = (Observed(item.campaign.values, parse_time(item.campaign.modified))
                            if item.campaign else None)
            p = plan(self.pairs, self.direction, crm_obs, campaign_obs, known_crm.get(item.key, {}),
                     known_campaign.get(item.key, {}))
            if campaign_complete and item.campaign is None:
                p.to_campaign.clear()  # the full profile read did not return it: no such profile
            if crm_complete and item.crm is None:
                p.to_crm.clear()       # the full contact read did not return it: no such contact
            item.plan = p
            self.last.echoes += int(p.crm_echo) + int(p.campaign_echo)
            self.last.conflicts += p.conflicts
            self.last.first_sight += p.first_sight
            if p.to_campaign:
                mem = known_campaign.get(item.key, {})
                to_campaign.append(CampaignWrite(item.key, p.to_campaign,
                                                 item.campaign.values if item.campaign else None,
                                                 {f: mem.get(f) for f in p.to_campaign}))
            if p.to_crm:
                to_crm.append((item.key, p.to_crm))
        campaign_out, crm_out = await self._write(to_campaign, to_crm)
        await self._remember(items, known_crm, known_campaign, crm_out, campaign_out)
        await self._account(items, CRM, crm_out, dict(to_crm))
        await self._account(items, CAMPAIGN, campaign_out, {w.key: dict(w.values) for w in to_campaign})
        # The records read of a key (one or two) take its outcomes: one per side rejected (a dead
        # letter each), then one per side written; the rest needed no write (agree, echo, absent).
        crm_ok, campaign_ok = set(crm_out.written), set(campaign_out.written)
        crm_bad, campaign_bad = {r.key for r in crm_out.rejected}, {r.key for r in campaign_out.rejected}
        for item in items:
            n = _records(item)
            bad = min(n, (item.key in crm_bad) + (item.key in campaign_bad))
            ok = min(n - bad, (item.key in crm_ok) + (item.key in campaign_ok))
            self.report.done("dead_lettered", bad)
            self.report.done("written", ok)
            self.report.done("filtered", n - bad - ok)

    async def _write(self, to_campaign: list[CampaignWrite],
                     to_crm: list[tuple[str, dict[str, bool]]]) -> tuple[Outcome, Outcome]:
        if not to_campaign and not to_crm:
            return Outcome(), Outcome()
        self.writing = True
        try:
            campaign_out, crm_out = await asyncio.gather(self.campaign_writer.write(to_campaign),
                                                         self.crm_writer.write(to_crm))
        finally:
            self.writing = False
        return campaign_out, crm_out

    async def _remember(self, items: list[_Item], known_crm: dict[str, dict[str, bool]],
                  known_campaign: dict[str, dict[str, bool]], crm_out: Outcome, campaign_out: Outcome) -> None:
        """The echo memory after this batch: what each side was seen holding, overlaid with what
        it acknowledged we wrote. Stored before the cursors covering these records move."""
        crm_ok, campaign_ok = set(crm_out.written), set(campaign_out.written)
        new_crm: dict[str, dict[str, bool]] = {}
        new_campaign: dict[str, dict[str, bool]] = {}
        for item in items:
            crm = _held_after(known_crm.get(item.key, {}), item.crm, self.crm_fields,
                              item.plan.to_crm if item.key in crm_ok else {})
            campaign = _held_after(known_campaign.get(item.key, {}), item.campaign, self.campaign_fields,
                                   item.plan.to_campaign if item.key in campaign_ok else {})
            if crm is not None:
                new_crm[item.key] = crm
            if campaign is not None:
                new_campaign[item.key] = campaign
        await self.memory.aremember(self.workflow, CRM, new_crm)
        await self.memory.aremember(self.workflow, CAMPAIGN, new_campaign)

    async def _account(self, items: list[_Item], side: str, out: Outcome,
                       payloads: dict[str, dict[str, bool]]) -> None:
        stream = CRM_STREAM if side == CRM else CAMPAIGN_STREAM
        for bad in out.rejected:
            await self._dead_letter(stream, bad, payloads.get(bad.key, {}))
        if out.rejected:
            await self.accounting.count_letters()
        written = len(out.written)
        if side == CRM:
            self.last.written_crm += written
        else:
            self.last.written_campaign += written
        self.last.write_requests += out.requests
        self.last.absent += len(out.absent)
        self.last.rejected += len(out.rejected)

    async def _dead_letter(self, stream: str, bad: Rejected, payload: dict[str, bool]) -> None:
        await self.accounting.dead_letter(stream, bad.key, dict(payload), bad.status, bad.error)
        log.warning("%s: %s %s dead-lettered: HTTP %s %s", self.workflow, stream, bad.key, bad.status, bad.error)

    # ------------------------------------------------------------------ dead letters marked for retry
    async def _retry_dead_letters(self) -> None:
        """Re-send what RetryDeadLetters marked, if the side the values came from still holds
        them; if it holds others now, that newer change comes with its feed, and the dead letter
        is dropped as superseded. A write acknowledged now is remembered (no echo)."""
        for stream, target in ((CRM_STREAM, CRM), (CAMPAIGN_STREAM, CAMPAIGN)):
            marked = await self.letters.amarked_for_retry(self.workflow, stream)
            if not marked:
                continue
            wanted = {d.key: {f: flag(v) for f, v in d.resend_values().items()} for d in marked}
            now = await asyncio.gather(*(self._origin_values(target, key) for key in wanted))
            resend = {key: values for (key, values), held in zip(wanted.items(), now, strict=True)
                      if held is not None and all(held.get(f) == v for f, v in values.items())}
            if target == CRM:
                out = await self.crm_writer.write(list(resend.items()))
            else:
                out = await self.campaign_writer.write([CampaignWrite(k, v) for k, v in resend.items()])
            await self._remember_written(target, out, resend)
            rejected = {r.key for r in out.rejected}
            await self.letters.asettle_retry(self.workflow, stream, [k for k in wanted if k not in rejected],
                                             [(r.key, r.status, r.error) for r in out.rejected], list(wanted))
            self.report.resent(len(out.written))
            log.info("%s: %d dead letter(s) of %s retried: %d written, %d superseded or gone, %d rejected again",
                     self.workflow, len(wanted), stream, len(out.written), len(wanted) - len(resend) + len(out.absent),
                     len(out.rejected))
        await self.accounting.count_letters()

    async def _remember_written(self, target: str, out: Outcome, values: Mapping[str, Mapping[str, bool]]) -> None:
        """The echo memory of ``target`` after writes outside a feed's pass: what it acknowledged."""
        known = await self.memory.aknown(self.workflow, target, out.written)
        await self.memory.aremember(self.workflow, target, {k: {**known.get(k, {}), **values[k]} for k in out.written})

    # ------------------------------------------------------------------ verify --repair
    async def _run_repairs(self) -> None:
        """The keys ``syncplane verify --repair`` queued: each key's pairs decided again from what
        both sides hold now, as a pass with no memory decides them (rules.repair_plan: opt-out wins,
        written only where the workflow writes, an opt-out never cleared), and written. A key
        leaves the queue once handled: written, gone from a side, or rejected (a dead letter)."""
        if self.repairs is None:
            return
        keys = [r.key for r in await self.repairs.arepairs(self.workflow, REPAIR_STREAM)]
        if not keys:
            return
        contacts = await asyncio.gather(*(self.crm_writer.read(k, self.crm_fields) for k in keys))
        profiles = await asyncio.gather(*(self.campaign_writer.lookup(k) for k in keys))
        to_campaign: dict[str, dict[str, bool]] = {}
        to_crm: dict[str, dict[str, bool]] = {}
        rows: dict[str, dict[str, Any]] = {}
        for key, contact, profile in zip(keys, contacts, profiles, strict=True):
            if contact is None or profile is None:
                continue  # deleted since on a side: nothing to keep in sync
            p = repair_plan(self.pairs, self.direction, contact, profile)
            rows[key] = profile
            if p.to_campaign:
                to_campaign[key] = p.to_campaign
            if p.to_crm:
                to_crm[key] = p.to_crm
        campaign_out, crm_out = await self._write([CampaignWrite(k, v, rows[k]) for k, v in to_campaign.items()],
                                                  list(to_crm.items()))
        await self._remember_written(CRM, crm_out, to_crm)
        await self._remember_written(CAMPAIGN, campaign_out, to_campaign)
        await self._account([], CRM, crm_out, to_crm)
        await self._account([], CAMPAIGN, campaign_out, to_campaign)
        self.report.resent(len(crm_out.written) + len(campaign_out.written))
        await self.repairs.arepaired(self.workflow, REPAIR_STREAM, keys)
        log.info("%s: %d repair(s) queued by verify: %d written to the CRM, %d to Campaign, %d rejected",
                 self.workflow, len(keys), len(crm_out.written), len(campaign_out.written),
                 len(crm_out.rejected) + len(campaign_out.rejected))

    async def _origin_values(self, target: str, key: str) -> dict[str, bool] | None:
        """What the other side holds now, in ``target``'s field names; None if it has no such record."""
        if target == CRM:   # the values came from Campaign
            row = await self.campaign_writer.lookup(key)
            return None if row is None else {p.crm: flag(row.get(p.campaign)) for p in self.pairs}
        contact = await self.crm_writer.read(key, self.crm_fields)
        return None if contact is None else {p.campaign: flag(contact.get(p.crm)) for p in self.pairs}

    def _read(self, side: str, n: int) -> None:
        self.report.read(n)
        if side == CRM:
            self.last.read_crm += n
        else:
            self.last.read_campaign += n

    def _set_backlog(self, n: int) -> None:
        self._queued = n
        self.accounting.backlog(n)

    async def aclose(self) -> None:
        for closer in (self.crm_source, self.campaign_source):
            await closer.aclose()
        for c in self._closers:
            await c.aclose()


def _connection(spec: pb.WorkflowSpec, kind: pb.ConnectorKind.ValueType) -> pb.Connection:
    """The connection of that kind: the source is Dynamics except in MARKETING_TO_CRM mode."""
    for conn in (spec.source, spec.destination):
        if conn.kind == kind:
            return conn
    raise ValueError(f"the workflow has no {pb.ConnectorKind.Name(kind)} connection")


def direction_of(spec: pb.WorkflowSpec) -> Direction:
    return _DIRECTIONS.get(spec.opt_in_out.direction, Direction.DISABLED)


def build_optinout(workflow: str, spec: pb.WorkflowSpec, secrets: dict[str, ConnectionSecret],
                   stores: Stores, report: WorkerReport) -> OptInOutSync:
    """The opt-in/out sync of a workflow (``spec.type`` OPT_IN_OUT), keeping its cursors, dead
    letters and echo memory in ``stores`` and reading there the repairs ``verify`` queued."""
    crm_conn = _connection(spec, pb.CONNECTOR_KIND_DYNAMICS365)
    acs_conn = _connection(spec, pb.CONNECTOR_KIND_CAMPAIGN_STANDARD)
    crm_secret, acs_secret = secrets[crm_conn.credentials.name], secrets[acs_conn.credentials.name]
    crm_tokens = OAuth2ClientCredentials(crm_secret.token_url, crm_secret.credentials())
    acs_tokens = OAuth2ClientCredentials(acs_secret.token_url, acs_secret.credentials())
    crm_transport = Transport(concurrency=max_concurrency(crm_conn), gate=crm_tokens.gate)
    acs_transport = Transport(concurrency=max_concurrency(acs_conn), gate=acs_tokens.gate)
    batch_size = spec.batch_size or DEFAULT_BATCH_SIZE
    crm_source = DynamicsSource(crm_conn.endpoint, crm_tokens, key_column=CRM_KEY, page_size=MAX_PAGE_SIZE,
                                transport=crm_transport)
    crm_writer = DynamicsOptOutWriter(crm_conn.endpoint, crm_tokens, crm_transport, entity_set=CRM_TABLE,
                                      batch_size=batch_size)
    api_key = acs_secret.api_key or acs_secret.client_id
    campaign_source = CampaignSource(acs_conn.endpoint, acs_tokens, api_key, key_field={PROFILE: PROFILE_KEY},
                                     line_count=CAMPAIGN_LINE_COUNT, transport=acs_transport)
    campaign_writer = CampaignOptOutWriter(acs_conn.endpoint, acs_tokens, api_key, acs_secret.client_id,
                                           acs_transport)
    return OptInOutSync(workflow, direction_of(spec),
                        pairs_of(spec.opt_in_out.field_pairs), crm_source=crm_source, crm_writer=crm_writer,
                        campaign_source=campaign_source, campaign_writer=campaign_writer,
                        checkpoints=stores.checkpoints, letters=stores.letters, memory=stores.memory,
                        report=report, repairs=stores.repairs,
                        batch_size=batch_size, closers=[crm_transport, acs_transport, crm_tokens, acs_tokens],
                        links={"source" if conn.kind == spec.source.kind else "destination": tokens.gate.health
                               for conn, tokens in ((crm_conn, crm_tokens), (acs_conn, acs_tokens))})
