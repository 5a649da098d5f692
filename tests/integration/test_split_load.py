"""The first load of one table split across workers (issue 18 item 4): the sandbox answers
``$filter`` on a GUID key as Dataverse does (SQL Server's ``uniqueidentifier`` order), key
ranges read through the connector cover the table exactly once, and a workflow with
``workers: 4`` loads contacts, through a ``kill -9`` and changes made during the load, equal at
the destination (counted by key at the sandbox).

The end-to-end tests load SPLIT_N contacts (20,000 by default). The issue's figure is 200,000
(``SPLIT_N=200000``), too long for the tier: on the shared 2-core machine (Nov 30) the plain load
took 953.7 s and the one through ``kill -9`` and changes 1,443.6 s, both passing. The in-process
sandbox and control plane share one event loop with four workers' traffic: in a run at load 20-43
the supervisor's polls did not reach the workers for 30 s, all four stopped as orphans every
~80 s, and a quarter of the load was not written in 900 s."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncplane.connectors.dynamics import DynamicsSource, key_range_filter
from syncplane.connectors.http import Credentials, OAuth2ClientCredentials
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.worker.split import bounds, range_filters
from syncplane_sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Sandbox, SeedSpec, start_sandbox
from tests.embedded_plane import CRASH_TOLERANT, ControlPlane, worker_processes
from tests.integration.ingress_env import (
    change_during_load,
    converge,
    ingress_spec,
    prepare,
    profile_key_count,
    profiles_converge,
    status_until,
)
from tests.integration.sandbox_fixtures import open_clients, running_sandbox

pytestmark = pytest.mark.supervisor(CRASH_TOLERANT)


@pytest.fixture
async def empty() -> AsyncIterator[Sandbox]:
    async with running_sandbox(SeedSpec(contacts=0, seed=1)) as sb:
        yield sb


def _contacts(sb: Sandbox, keys: list[str]) -> None:
    table = sb.d365.table("contacts")
    for rid in list(table.rows):
        table.delete(rid)
    for i, key in enumerate(keys):
        table.upsert(key, emailaddress1=f"c{i}@example.com", lastname=f"L{i}")


# (a, b) with a < b in SQL Server's order, and the text order says the opposite or nothing: the last
# group is the most significant; then the 4th; the 3rd, 2nd and 1st compare byte-swapped.
SQL_ORDER = [
    ("01000000-0000-0000-0000-000000000000", "00000000-0000-0000-0000-000000000001"),  # 5th group first
    ("00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-010000000000"),  # 5th: left to right
    ("00000000-0000-0000-0001-000000000000", "00000000-0000-0000-0100-000000000000"),  # 4th: left to right
    ("00000000-0000-ffff-0000-000000000000", "00000000-0000-0000-0001-000000000000"),  # 4th before 3rd
    ("00000000-0000-0100-0000-000000000000", "00000000-0000-0001-0000-000000000000"),  # 3rd: byte-swapped
    ("00000000-ffff-0000-0000-000000000000", "00000000-0000-0001-0000-000000000000"),  # 3rd before 2nd
    ("00000000-0100-0000-0000-000000000000", "00000000-0001-0000-0000-000000000000"),  # 2nd: byte-swapped
    ("ffffffff-0000-0000-0000-000000000000", "00000000-0001-0000-0000-000000000000"),  # 2nd before 1st
    ("00000100-0000-0000-0000-000000000000", "00000001-0000-0000-0000-000000000000"),  # 1st: byte-swapped
]


@pytest.mark.parametrize(("low", "high"), SQL_ORDER)
async def test_sandbox_filters_guids_in_sql_server_order(empty: Sandbox, low: str, high: str) -> None:
    _contacts(empty, [low, high])
    async for c in open_clients(empty):
        for op, want in (("lt", {low}), ("le", {low, high}), ("gt", set()), ("ge", {high}), ("eq", {high})):
            r = await c.d365("GET", f"contacts?$select=contactid&$filter=contactid {op} {high}")
            assert r.status_code == 200, r.text
            assert {row["contactid"] for row in r.json()["value"]} == want, (op, low, high)


def _keys(style: str, n: int, rng: random.Random) -> list[str]:
    if style == "random":  # uuid4
        return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]
    if style == "sequential":  # NEWSEQUENTIALID-like: one machine's GUIDs differ in the first group only
        base = rng.getrandbits(32)
        return [f"{(base + i) % 2**32:08x}-1a2b-11ef-8c3d-00155d012345" for i in range(n)]
    if style == "last-group":  # differing only where SQL Server looks first
        return [f"6f9619ff-8b86-d011-b42d-{rng.getrandbits(48):012x}" for _ in range(n)]
    # "middle": differing in groups 2-4 only, where the byte order is swapped
    return [f"00000000-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}-000000000000"
            for _ in range(n)]


@pytest.mark.parametrize("style", ["random", "sequential", "last-group", "middle"])
@pytest.mark.parametrize("ranges", [2, 3, 4, 7])
async def test_key_ranges_read_every_row_exactly_once(empty: Sandbox, style: str, ranges: int) -> None:
    rng = random.Random(f"{style}-{ranges}")
    keys = sorted(set(_keys(style, 1500, rng)))
    _contacts(empty, keys)
    tokens = OAuth2ClientCredentials(empty.d365_token_url, Credentials(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET,
                                                                       scope=empty.d365_scope))
    source = DynamicsSource(empty.d365_url, tokens, key_column="contactid", page_size=200)
    try:
        delta, sample = await source.start_tracking("contacts", ["lastname"], "contactid", sample=300,
                                                     rng=rng)
        assert delta.startswith("delta ") and len(sample) == 300
        inner = bounds(sample, ranges)
        assert len(inner) == ranges - 1
        seen: list[str] = []
        sizes = []
        for where in range_filters("contactid", inner):
            got = [r.key async for page in source.pages("contacts", ["lastname"], None, where=where)
                   for r in page.records]
            sizes.append(len(got))
            seen += got
        assert sorted(seen) == keys  # every row once: the ranges are disjoint and cover the table
        assert min(sizes) > len(keys) / ranges / 3, sizes  # cut from a sample: about equal
    finally:
        await source.aclose()
        await tokens.aclose()


def test_a_range_filter_names_guids_unquoted() -> None:
    low, high = "00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"
    assert key_range_filter("contactid", low, high) == f"contactid ge {low} and contactid lt {high}"
    assert key_range_filter("contactid", None, None) is None
    with pytest.raises(ValueError):
        key_range_filter("contactid", "x' or 1 eq 1", None)


# ---------------------------------------------------------------------- workers: 4, end to end


def _split_state(data_dir: Path, workflow: str) -> dict[str, str]:
    db = sqlite3.connect(str(data_dir / "worker-state.db"))
    try:
        return {s: c for s, c in db.execute("SELECT stream, cursor FROM checkpoints WHERE workflow = ?", (workflow,))}
    finally:
        db.close()


async def _split_load(plane: ControlPlane, contacts: int, *, kill: bool, change: bool) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=contacts, seed=18))
    try:
        prepare(sb, plane.data_dir)
        spec = ingress_spec(sb, batch_size=1000)
        spec.workers = 4
        await plane.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="split", workflow=pb.Workflow(spec=spec)))
        await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/split"))
        table = sb.d365.table("contacts")
        rng = random.Random(4)
        if kill or change:
            await converge(lambda: len(sb.acs.profiles.rows) >= contacts // 4, 900, "a quarter of the load written")
        if kill:
            with sb.faults.acs.holding():  # Campaign holds every write until the kill: it comes mid-load
                victims = [p for p in worker_processes(plane.data_dir) if "--index" in p.cmdline()
                           and p.cmdline()[p.cmdline().index("--index") + 1] == "2"]
                assert victims, "worker 2 is running"
                os.kill(victims[0].pid, signal.SIGKILL)
        if change:
            change_during_load(sb, rng, changed=500, deleted=100, created=200)
        expected_n = len(table.rows)
        await profiles_converge(sb, 1500, "the split load")
        assert profile_key_count(sb) == (expected_n, expected_n)  # no duplicate, none lost
        state = _split_state(plane.data_dir, "split")
        ranges = sorted(k for k in state if k.startswith("contact@range-"))
        assert ranges == [f"contact@range-{i}" for i in range(4)], sorted(state)
        assert all('"range-done"' in state[k] for k in ranges)
        assert '"delta ' in state["contact"]  # the stream goes on from the delta token taken at the start
        # The four workers' counters add up (summed by the supervisor): every record read is
        # accounted for once the backlog is empty. Counters count since each worker started, so a
        # worker restarted under load (or killed) takes its own counts with it: no equality with
        # the table's size is asserted here.
        def accounted(s: pb.WorkflowStatus) -> bool:
            c = s.counters
            return s.backlog == 0 and c.read == c.written + c.deleted + c.filtered + c.dead_lettered + c.held \
                + c.failed
        status = await status_until(plane.stub, "split", accounted, 120)
        assert status.counters.written > 0
        assert status.phase == pb.PHASE_RUNNING
        assert status.counters.dead_lettered == 0
    finally:
        await sb.stop()


@pytest.mark.timeout(1800)
async def test_contacts_with_4_workers_end_equal(plane: ControlPlane) -> None:
    await _split_load(plane, int(os.environ.get("SPLIT_N", 20_000)), kill=False, change=False)


@pytest.mark.timeout(1800)
async def test_contacts_with_4_workers_through_kill_9_and_changes_during_the_load(plane: ControlPlane) -> None:
    await _split_load(plane, int(os.environ.get("SPLIT_N", 20_000)), kill=True, change=True)
