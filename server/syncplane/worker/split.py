"""The first load of one table, split across workers (issue 18 item 4).

A delta feed cannot be split, but the first full read can: a read without change tracking
allows ``$filter``. So, for an ingress stream that has never committed a cursor, with
``spec.workers`` > 1:

1. **The delta token first.** One worker (whoever claims the plan) takes it: a change-tracked
   read of the key column alone to its ``@odata.deltaLink`` (Dataverse hands out the token
   only at the end of a tracked read; ``Prefer: odata.track-changes``). Every change made from
   then on is in that delta.
2. **Ranges on the primary key.** The same read samples the keys (reservoir, a few thousand:
   memory stays flat) and cuts them into ``workers`` half-open ranges of about equal size,
   ``[b(i), b(i+1))``, read with ``$filter=contactid ge b(i) and contactid lt b(i+1)``. The
   bounds are ordered as SQL Server orders ``uniqueidentifier`` values
   (:func:`~syncplane.connectors.dynamics.sql_guid_order`: the last 6 bytes first), which is
   how Dataverse evaluates ``gt``/``lt`` on them; ordered as text, the bounds would not be
   monotonic for the service, and rows would fall between ranges or into two.

   Why the key and not ``createdon``: the key is unique and never changes, so the ranges are
   disjoint and cover the table whatever happens during the load. ``createdon`` is not
   unique (bulk imports stamp thousands of rows alike, and ``overriddencreatedon`` sets it
   from a migration), so equal-size ranges cannot be cut on it, and its distribution is
   skewed by how the data arrived. Sampling real keys (not cutting the GUID space evenly)
   matters because Dataverse's keys are sequential GUIDs: an even cut of the space would
   put every row in one range. A table whose keys are not GUIDs is read as one range.
3. **One range per worker, claimed.** Each range is claimed in the checkpoint store, a
   Lease-like ``{"holder", "until"}`` set by compare-and-set
   (:meth:`~syncplane.state.stores.AsyncCheckpointStore.aswap`: SQLite embedded, the
   ``<wf>-checkpoints`` ConfigMap's resourceVersion on Kubernetes), renewed while the range is
   read. A worker tries its own range first (its index; on Kubernetes, where pods have no
   index, the first free one), then any range not done whose claim expired. Embedded, the
   holder is the worker's index, so a worker restarted after ``kill -9`` takes its range back
   at once; on Kubernetes a replaced pod's range is free after :data:`CLAIM_TTL`.
4. **Each range commits its own progress** (``<stream>@range-<i>``, a pipeline checkpoint
   whose cursor is the range's next link): a killed worker resumes its range there. Dead
   letters and held records are the stream's own: its pipeline re-sends them.
5. **Then the delta, from the token taken at the start.** When every range is done, the
   stream's checkpoint becomes that delta cursor (with the table's size, the ranges' sum) and
   the stream's owner reads changes from there as usual: whatever changed during the load is
   written again. The owner is worker ``i mod workers`` for stream ``i`` embedded; on
   Kubernetes, where the pods of a Deployment have no index, whoever holds the claim
   ``<stream>@owner`` (:func:`owning`), renewed while it reads. The write is an upsert by
   key, so a row read by a range and by the delta is written twice and ends equal: no
   duplicate, no loss.

Keys in the checkpoint store, after the stream's own (e.g. ``contact``): ``contact@split``
(the plan, or the claim of whoever is taking it), ``contact@claim-<i>`` and
``contact@range-<i>``. Backlog and counters need nothing here: each worker reports its own,
and the control plane sums the reports.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from syncplane.connectors.dynamics import RANGE_DONE, key_range_filter, sql_guid_order
from syncplane.state.stores import AsyncCheckpointStore
from syncplane.worker.pipeline import Checkpoint

log = logging.getLogger(__name__)

#: How long a claim holds without renewal (seconds), and how often its holder renews it.
CLAIM_TTL = 30.0
RENEW_EVERY = 5.0
#: Keys sampled while taking the delta token, to cut the ranges.
SAMPLE = 4096


def bounds(sample: Sequence[str], ranges: int) -> list[str]:
    """The ``ranges - 1`` inner bounds cutting the keys of ``sample`` into ``ranges`` parts of
    about equal size, in Dataverse's (SQL Server's) GUID order, strictly increasing; ``[]`` (one
    range) when a key is not a GUID or there are too few keys."""
    try:
        ordered = sorted(set(sample), key=sql_guid_order)
    except ValueError:
        return []
    cut: list[str] = []
    for i in range(1, ranges):
        if ordered and (b := ordered[len(ordered) * i // ranges]) not in cut and b != ordered[0]:
            cut.append(b)
    return cut


def range_filters(key_column: str, inner: Sequence[str]) -> list[str | None]:
    """The ``$filter`` of each range: ``[-inf, b1)``, ``[b1, b2)``, …, ``[bn, +inf)``."""
    edges: list[str | None] = [None, *inner, None]
    return [key_range_filter(key_column, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


@dataclass(frozen=True)
class Plan:
    """What the worker that took the delta token wrote: the delta cursor and the range bounds."""

    delta: str
    inner: tuple[str, ...]

    @property
    def ranges(self) -> int:
        """How many key ranges: one more than the inner bounds."""
        return len(self.inner) + 1


def _claim(raw: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def claimable(raw: str | None, holder: str, now: float) -> bool:
    """Whether ``holder`` may take (or renew) a claim whose stored value is ``raw``: absent,
    its own, or expired (``until`` in epoch seconds)."""
    claim = _claim(raw)
    if claim is None or "holder" not in claim:
        return raw is None or claim is None
    return bool(claim["holder"] == holder or float(claim.get("until", 0)) <= now)


async def claim(store: AsyncCheckpointStore, workflow: str, key: str, holder: str,
                ttl: float | None = None) -> bool:
    """Take or renew the claim ``key`` for ``holder`` until now + ``ttl`` seconds (default
    :data:`CLAIM_TTL`); False when another holder's claim is live, or another worker changed it
    at the same moment."""
    ttl = CLAIM_TTL if ttl is None else ttl
    return await _swap_claim(store, workflow, key, lambda raw, now: claimable(raw, holder, now),
                             lambda now: json.dumps({"holder": holder, "until": now + ttl}))


async def release(store: AsyncCheckpointStore, workflow: str, key: str, holder: str) -> bool:
    """Give up ``holder``'s claim ``key`` at once (its ``until`` set to 0), so that another worker
    takes it without waiting for it to expire; False when the claim is not ``holder``'s or was
    changed at the same moment (it then expires on its own)."""
    return await _swap_claim(store, workflow, key, lambda raw, now: _holder(raw) == holder,
                             lambda now: json.dumps({"holder": holder, "until": 0}))


def _holder(raw: str | None) -> object:
    held = _claim(raw)
    return None if held is None else held.get("holder")


async def _swap_claim(store: AsyncCheckpointStore, workflow: str, key: str,
                      allowed: Callable[[str | None, float], bool], value: Callable[[float], str]) -> bool:
    """Compare-and-set the claim ``key``: read it and, when ``allowed(stored, now)`` (``now`` in
    epoch seconds), replace exactly what was read with ``value(now)``. False when not allowed, or
    when another worker changed it in between (the store's swap refused)."""
    raw = await store.aload(workflow, key)
    now = time.time()
    if not allowed(raw, now):
        return False
    return await store.aswap(workflow, key, raw, value(now))


class SplitLoad:
    """The split first load of one stream, as one worker takes part in it.

    ``take_token()`` returns (delta cursor, key sample) (``DynamicsSource.start_tracking``);
    ``run_range(i, where, stop)`` runs the pipeline of range ``i`` (committing under
    :meth:`range_key`) until ``stop`` or the range's end.
    """

    def __init__(self, workflow: str, stream: str, key_column: str, workers: int, index: int, holder: str,
                 store: AsyncCheckpointStore, fingerprint: str,
                 take_token: Callable[[], Awaitable[tuple[str, list[str]]]],
                 run_range: Callable[[int, str | None, asyncio.Event], Awaitable[None]]) -> None:
        self.workflow, self.stream, self.key_column = workflow, stream, key_column
        self.workers, self.index, self.holder = max(1, workers), index, holder
        self.store, self.fingerprint = store, fingerprint
        self.take_token, self.run_range = take_token, run_range

    def range_key(self, i: int) -> str:
        """The checkpoint key range ``i`` commits under (``<stream>@range-<i>``)."""
        return f"{self.stream}@range-{i}"

    @property
    def plan_key(self) -> str:
        """The checkpoint key of the split's plan (``<stream>@split``)."""
        return f"{self.stream}@split"

    async def needed(self) -> bool:
        """Whether the stream's first load is still to do (its own checkpoint has no cursor)."""
        return Checkpoint.loads(await self.store.aload(self.workflow, self.stream)).cursor is None

    async def run(self, stop: asyncio.Event) -> bool:
        """This worker's part in one pass: the plan (taken if nobody has), then the ranges it can
        claim. Returns True once the load is over and the stream's checkpoint is the delta cursor
        (its own pipeline goes on from there), False while ranges remain (here or elsewhere)."""
        main_raw = await self.store.aload(self.workflow, self.stream)
        if Checkpoint.loads(main_raw).cursor is not None:
            return True
        plan = await self._plan()
        if plan is None:
            return False  # another worker is taking the delta token
        n = plan.ranges
        if n == 1:
            return True  # nothing to split (e.g. keys that are not GUIDs): the stream's own first load
        filters = range_filters(self.key_column, plan.inner)
        for i in [(self.index + k) % n for k in range(n)]:
            if stop.is_set():
                return False
            if await self._done(i) is not None:
                continue
            await _while_claimed(self.store, self.workflow, self.stream, self.holder, f"{self.stream}@claim-{i}",
                                 stop, functools.partial(self.run_range, i, filters[i]))
        if stop.is_set():
            return False
        rows = 0
        for i in range(n):
            done = await self._done(i)
            if done is None:
                return False
            rows += max(0, done)
        checkpoint = Checkpoint(cursor=plan.delta, filter=self.fingerprint, rows=rows)
        if await self.store.aswap(self.workflow, self.stream, main_raw, checkpoint.dumps()):
            log.info("%s: split first load done (%d ranges, %d rows); changes from the delta token taken "
                     "at its start", self.stream, n, rows)
        return True

    async def _done(self, i: int) -> int | None:
        """Range ``i``'s rows when it was read to its end, else None."""
        cp = Checkpoint.loads(await self.store.aload(self.workflow, self.range_key(i)))
        return (cp.rows if cp.rows >= 0 else cp.partial) if cp.cursor == RANGE_DONE else None

    async def _plan(self) -> Plan | None:
        raw = await self.store.aload(self.workflow, self.plan_key)
        value = _claim(raw)
        if value is not None and isinstance(value.get("delta"), str):
            return Plan(value["delta"], tuple(str(b) for b in value.get("inner", [])))
        if not await claim(self.store, self.workflow, self.plan_key, self.holder):
            return None
        async with _Renewal(self.store, self.workflow, self.stream, self.holder, self.plan_key) as lost:
            delta, sample = await self.take_token()
            if lost.is_set():
                return None
        plan = Plan(delta, tuple(bounds(sample, self.workers)))
        if not await _swap_claim(self.store, self.workflow, self.plan_key,
                                 lambda raw, now: claimable(raw, self.holder, now),
                                 lambda now: json.dumps({"delta": plan.delta, "inner": list(plan.inner)})):
            return None
        log.info("%s: split first load over %d ranges; delta token taken", self.stream, plan.ranges)
        return plan


async def owning(store: AsyncCheckpointStore, workflow: str, stream: str, holder: str,
                 run: Callable[[asyncio.Event], Awaitable[object]], stop: asyncio.Event) -> bool:
    """Run ``run(stop)`` (the stream's own pass) if ``holder`` holds or takes the claim
    ``<stream>@owner``, renewed meanwhile; the pass stops if the claim is lost. Returns whether
    it ran. For workers without an index (Kubernetes pods): one of them reads the delta."""
    return await _while_claimed(store, workflow, stream, holder, f"{stream}@owner", stop, run)


async def _while_claimed(store: AsyncCheckpointStore, workflow: str, stream: str, holder: str, key: str,
                         stop: asyncio.Event, run: Callable[[asyncio.Event], Awaitable[object]]) -> bool:
    """Run ``run(halt)`` if ``holder`` holds or takes the claim ``key``, renewed while it runs;
    ``halt`` is set when ``stop`` is or when the claim is lost (:class:`_Renewal`), and ``run``
    is to return soon after. Returns whether it ran (False: another worker holds the claim)."""
    if not await claim(store, workflow, key, holder):
        return False
    async with _Renewal(store, workflow, stream, holder, key, stop) as halt:
        await run(halt)
    return True


class _Renewal:
    """Renews a claim every :data:`RENEW_EVERY` seconds while the block runs. The event it yields
    (``halt``) is set when the block is to stop: ``stop`` set (when given), or the claim lost:
    taken by another worker, or not renewed for ``CLAIM_TTL / 2`` seconds (the store unreachable
    from here: the block stops well before another worker may take the claim, and two must never
    work at once). When ``stop`` is set at the block's end (a graceful stop), the claim is
    released for another worker to take at once."""

    def __init__(self, store: AsyncCheckpointStore, workflow: str, stream: str, holder: str, key: str,
                 stop: asyncio.Event | None = None) -> None:
        self.store, self.workflow, self.stream, self.holder, self.key = store, workflow, stream, holder, key
        self.stop = stop
        self.lost = asyncio.Event()
        self.halt = asyncio.Event()
        self.tasks: list[asyncio.Future[None]] = []

    async def __aenter__(self) -> asyncio.Event:
        self.tasks = [asyncio.ensure_future(self._renew())]
        if self.stop is not None:
            self.tasks.append(asyncio.ensure_future(self._halt_on(self.stop)))
        return self.halt

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.stop is not None and self.stop.is_set() and not self.lost.is_set():
            try:
                await release(self.store, self.workflow, self.key, self.holder)
            except Exception as exc:  # it expires on its own after CLAIM_TTL
                log.warning("%s: could not release claim %s: %s", self.stream, self.key, exc)

    async def _halt_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.halt.set()

    def _lose(self) -> None:
        self.lost.set()
        self.halt.set()

    async def _renew(self) -> None:
        renewed_at = time.monotonic()
        while True:
            await asyncio.sleep(RENEW_EVERY)  # a renewal period, not a stand-in for synchronisation
            try:
                renewed = await claim(self.store, self.workflow, self.key, self.holder)
            except Exception as exc:  # the store is down: retried until the claim may have lapsed
                if time.monotonic() - renewed_at >= CLAIM_TTL / 2:
                    log.warning("%s: claim %s not renewed for %.0f s (%s); stopping it here", self.stream,
                                self.key, time.monotonic() - renewed_at, exc)
                    self._lose()
                    return
                log.warning("%s: could not renew claim %s: %s", self.stream, self.key, exc)
                continue
            renewed_at = time.monotonic()
            if not renewed:
                log.warning("%s: claim %s was taken by another worker; stopping it here", self.stream, self.key)
                self._lose()
                return
