"""The split first load's pure parts (worker/split.py): range bounds in Dataverse's GUID order,
and claims by compare-and-set on the embedded checkpoint store (SQLite, real file, two
connections as two worker processes would have)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.connectors.dynamics import sql_guid_order
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.worker import split
from syncplane.worker.split import bounds, claim, claimable, owning

GUIDS = st.lists(st.uuids().map(str), min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(sample=GUIDS, ranges=st.integers(1, 9))
def test_bounds_increase_in_sql_server_order_and_cut_the_sample_evenly(sample: list[str], ranges: int) -> None:
    inner = bounds(sample, ranges)
    assert len(inner) <= ranges - 1
    keys = [sql_guid_order(b) for b in inner]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)  # strictly increasing for the service
    distinct = len(set(sample))
    if distinct >= 2 * ranges:
        assert len(inner) == ranges - 1
        ordered = sorted(set(sample), key=sql_guid_order)
        edges = [0, *(ordered.index(b) for b in inner), distinct]
        sizes = [edges[i + 1] - edges[i] for i in range(len(edges) - 1)]
        assert max(sizes) - min(sizes) <= 1  # equal parts of the sample


def test_keys_that_are_not_guids_make_one_range() -> None:
    assert bounds(["a@example.com", "b@example.com", "c@example.com"], 3) == []


def test_sql_server_order_is_not_the_text_order() -> None:
    a, b = "00000000-0000-0000-0000-000000000001", "ffffffff-ffff-ffff-ffff-000000000000"
    assert a < b and sql_guid_order(a) > sql_guid_order(b)  # the last group is the most significant


CLAIMS = [  # (stored, holder asking, may take)
    (None, "w1", True),
    (json.dumps({"holder": "w1", "until": 10**12}), "w1", True),    # its own: renewed
    (json.dumps({"holder": "w2", "until": 10**12}), "w1", False),   # another's, live
    (json.dumps({"holder": "w2", "until": 1.0}), "w1", True),       # another's, expired
    (json.dumps({"delta": "delta x", "inner": []}), "w1", False),   # a plan, not a claim
    ("not json", "w1", True),                                       # unreadable: taken over
]


def test_who_may_take_a_claim() -> None:
    for stored, holder, may in CLAIMS:
        assert claimable(stored, holder, time.time()) is may, (stored, holder)


RELEASES = [  # (stored, holder releasing, released)
    (json.dumps({"holder": "w1", "until": 10**12}), "w1", True),    # its own, live
    (json.dumps({"holder": "w1", "until": 1.0}), "w1", True),       # its own, expired
    (json.dumps({"holder": "w2", "until": 10**12}), "w1", False),   # another's
    (None, "w1", False),                                            # nobody's
    (json.dumps({"delta": "delta x", "inner": []}), "w1", False),   # a plan, not a claim
    ("not json", "w1", False),
]


async def test_who_may_release_a_claim(tmp_path: Path) -> None:
    s = SqliteWorkerState(tmp_path / "s.db")
    try:
        for n, (stored, holder, released) in enumerate(RELEASES):
            key = f"contact@claim-{n}"
            if stored is not None:
                assert await s.aswap("wf", key, None, stored)
            assert await split.release(s, "wf", key, holder) is released, (stored, holder)
            after = await s.aload("wf", key)
            if released:
                assert json.loads(after or "{}") == {"holder": holder, "until": 0}
                assert await claim(s, "wf", key, "w3"), "a released claim is free at once"
            else:
                assert after == stored, "left as it was"
    finally:
        s.close()


def test_two_workers_racing_for_one_claim_one_wins(tmp_path: Path) -> None:
    async def scenario() -> list[bool]:
        a, b = SqliteWorkerState(tmp_path / "s.db"), SqliteWorkerState(tmp_path / "s.db")
        try:
            results = []
            for i in range(50):
                key = f"contact@claim-{i}"
                results.append(await asyncio.gather(claim(a, "wf", key, "w1"), claim(b, "wf", key, "w2")))
            return [sum(pair) == 1 for pair in results]
        finally:
            a.close()
            b.close()

    assert all(asyncio.run(scenario()))


def test_a_swap_sets_only_from_the_expected_value(tmp_path: Path) -> None:
    s = SqliteWorkerState(tmp_path / "s.db")
    try:
        assert s.swap("wf", "k", None, "one")
        assert not s.swap("wf", "k", None, "two")        # present: not from absent
        assert not s.swap("wf", "k", "other", "two")     # not what it holds
        assert s.swap("wf", "k", "one", "two") and s.load("wf", "k") == "two"
        assert s.load("wf", str(uuid.uuid4())) is None
    finally:
        s.close()


class FailingStore(SqliteWorkerState):
    """The real embedded store, made unreachable on demand (as a partitioned pod sees its store)."""

    down = False

    async def aload(self, workflow: str, stream: str) -> str | None:
        if self.down:
            raise OSError("the checkpoint store is unreachable")
        return await super().aload(workflow, stream)


async def test_a_graceful_stop_releases_the_claim_for_another_worker_at_once(tmp_path: Path) -> None:
    a, b = SqliteWorkerState(tmp_path / "s.db"), SqliteWorkerState(tmp_path / "s.db")
    stop = asyncio.Event()
    try:
        async def one_pass(_: asyncio.Event) -> None:
            stop.set()  # the worker is asked to stop during its pass

        assert await owning(a, "wf", "runner", "w1", one_pass, stop)
        assert await claim(b, "wf", "runner@owner", "w2"), "the stopped holder released its claim"
        assert not await claim(a, "wf", "runner@owner", "w1"), "and holds it no more"
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
async def test_a_stop_during_the_pass_halts_it(tmp_path: Path) -> None:
    a = SqliteWorkerState(tmp_path / "s.db")
    stop = asyncio.Event()
    try:
        async def until_halted(halt: asyncio.Event) -> None:
            asyncio.get_running_loop().call_soon(stop.set)  # the worker is asked to stop meanwhile
            await halt.wait()

        assert await owning(a, "wf", "runner", "w1", until_halted, stop)
        assert await claim(a, "wf", "runner@owner", "w2"), "released on the graceful stop"
    finally:
        a.close()


async def test_a_pass_without_a_graceful_stop_keeps_its_claim(tmp_path: Path) -> None:
    a, b = SqliteWorkerState(tmp_path / "s.db"), SqliteWorkerState(tmp_path / "s.db")
    try:
        async def one_pass(_: asyncio.Event) -> None:
            return None

        assert await owning(a, "wf", "runner", "w1", one_pass, asyncio.Event())
        assert not await claim(b, "wf", "runner@owner", "w2"), "live until it expires: the next pass is w1's"
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
async def test_a_claim_that_cannot_be_renewed_stops_the_pass_before_another_worker_may_take_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(split, "RENEW_EVERY", 0.01)
    monkeypatch.setattr(split, "CLAIM_TTL", 4.0)  # given up after 2 s unrenewed
    store = FailingStore(tmp_path / "s.db")
    taken_over: list[bool] = []
    try:
        async def until_stopped(stop: asyncio.Event) -> None:
            store.down = True  # from now on no renewal reaches the store
            await stop.wait()  # the pass ends only when told to: by the lost claim here
            store.down = False
            held = json.loads(await store.aload("wf", "runner@owner") or "{}")
            taken_over.append(held.get("until", 0) <= time.time())

        assert await owning(store, "wf", "runner", "w1", until_stopped, asyncio.Event())
        assert taken_over == [False], "the pass stopped while its claim was still live: no overlap"
    finally:
        store.close()
