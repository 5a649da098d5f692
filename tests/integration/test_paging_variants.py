"""Change-tracked reads whose links come out in every form OData allows (present, missing,
repeated, looping), against the sandbox over real HTTP: the ingress pipeline (the Dataverse
source, the Campaign sink, the SQLite checkpoint store) runs poll after poll.

The invariant: a committed cursor always makes progress, or the stream fails loudly.
- no poll re-reads forever (each poll sends a bounded number of requests);
- no change is missed (once the service answers the documented way again, one poll brings
  the destination level with the source, and the poll after it reads nothing);
- a poll that cannot make progress raises NO_DELTA_LINK or PAGING_LOOP, and the cursor it
  left behind is not a stale resume point inside the read.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncplane.connectors.base import ConnectorError
from syncplane.connectors.campaign import CampaignSink
from syncplane.connectors.dynamics import DynamicsSource
from syncplane.connectors.http import Credentials, OAuth2ClientCredentials
from syncplane.contract.report import WorkerReport
from syncplane.ingress.deletes import DeleteReconciler
from syncplane.ingress.transform import EntityTransform
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.worker.pipeline import Checkpoint, Pipeline, Stream
from syncplane_sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Sandbox, SeedSpec, start_sandbox
from syncplane_sandbox.variants import PAGE_ACTIONS
from tests.backends import eventually
from tests.embedded_plane import ControlPlane
from tests.factories import spec
from tests.integration.ingress_env import (
    actual_profiles,
    converge,
    diff,
    expected_profiles,
    ingress_spec,
    prepare,
    profiles_converge,
)
from tests.integration.verify_env import verified

PAGE_SIZE = 3
_INSERTS = itertools.count()
STALLS = {"NO_DELTA_LINK", "PAGING_LOOP"}


class Harness:
    """One ingress stream (contacts → profiles) run poll by poll, as the engine runs it."""

    def __init__(self, sb: Sandbox, state_dir: Path) -> None:
        self.sb = sb
        self.d365_tokens = OAuth2ClientCredentials(sb.d365_token_url, Credentials(
            SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, scope=sb.d365_scope))
        self.acs_tokens = OAuth2ClientCredentials(sb.acs_token_url, Credentials(
            SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, scope="openid,AdobeID,campaign_sdk", organization=sb.options.org,
            api_host=sb.acs_origin))
        self.source = DynamicsSource(sb.d365_url, self.d365_tokens, key_column="contactid", page_size=PAGE_SIZE)
        self.sink = CampaignSink(sb.acs_url, self.acs_tokens, SANDBOX_CLIENT_ID, owner=SANDBOX_CLIENT_ID)
        self.state = SqliteWorkerState(state_dir / "worker-state.db")
        entity = spec("ingress").ingress.entities[0]
        self.stream = Stream(name="contact", table="contacts", resource="profile", key_field="externalId",
                             transform=EntityTransform(entity))
        self.report = WorkerReport("paging", 0, 1)
        reconcile = DeleteReconciler(self.source, "contacts", "contactid", self.sink, "profile", "externalId")
        self.pipeline = Pipeline("paging", self.stream, self.source, self.sink, self.report, 100,
                                 checkpoints=self.state, letters=self.state, reconcile=reconcile)

    def cursor(self) -> str | None:
        return Checkpoint.loads(self.state.load("paging", "contact")).cursor

    async def poll(self) -> ConnectorError | None:
        """One pass; fails the test when it sends more requests than a finite read needs."""
        rows = len(self.sb.d365.table("contacts").rows) + 20
        # a full read (twice: a resync) and a delta read, each page once, plus token requests
        bound = 3 * (math.ceil(rows / PAGE_SIZE) + 2) + 4
        before = len(self.sb.requests.records(server="d365"))
        task = asyncio.ensure_future(self.pipeline.run_once(asyncio.Event()))
        while not task.done():
            sent = len(self.sb.requests.records(server="d365")) - before
            if sent > bound:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise AssertionError(f"a poll sent {sent} requests to Dataverse for {rows} rows: it re-reads forever")
            await asyncio.wait({task}, timeout=0.05)
        try:
            task.result()
        except ConnectorError as exc:
            return exc
        return None

    async def aclose(self) -> None:
        for closable in (self.source, self.sink, self.d365_tokens, self.acs_tokens):
            await closable.aclose()
        self.state.close()


def change(sb: Sandbox, kind: str, n: int) -> None:
    table = sb.d365.table("contacts")
    ids = sorted(table.rows)
    if kind == "insert" or not ids:
        table.upsert(firstname=f"New{n}", lastname="Inserted", emailaddress1=f"new{next(_INSERTS)}@example.com")
    elif kind == "update":
        table.upsert(ids[n % len(ids)], lastname=f"Updated{n}")
    else:
        table.delete(ids[n % len(ids)])


def level(sb: Sandbox) -> str | None:
    """The destination equals the source (inserts, updates and deletes); None when so."""
    expected, actual = expected_profiles(sb), actual_profiles(sb)
    return None if expected == actual else diff(expected, actual)


POLL = st.tuples(st.lists(st.sampled_from(PAGE_ACTIONS), max_size=6),
                 st.lists(st.tuples(st.sampled_from(["insert", "update", "delete"]), st.integers(0, 1000)),
                          max_size=3))


async def scenario(polls: list[tuple[list[str], list[tuple[str, int]]]], state_dir: Path) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=7, seed=5))
    harness = Harness(sb, state_dir)
    try:
        for actions, changes in polls:
            for kind, n in changes:
                change(sb, kind, n)
            sb.variants.paging.set(script=actions)
            error = await harness.poll()
            if error is not None:
                assert error.reason in STALLS, f"an unclear error: {error.reason}: {error}"
                cursor = harness.cursor()
                assert cursor is None or "$skiptoken" not in cursor, \
                    f"after {error.reason} the stored cursor is a stale point inside the read: {cursor}"
        # The service answers the documented way again: one poll catches up, the next reads nothing.
        sb.variants.paging.reset()
        assert await harness.poll() is None
        assert level(sb) is None, f"a change was missed: {level(sb)}"
        cursor = harness.cursor()
        assert cursor is not None and cursor.startswith("delta ") and "$deltatoken" in cursor
        read_before = harness.report.counters.read
        assert await harness.poll() is None
        assert harness.report.counters.read == read_before, "a poll with nothing new re-read records"
    finally:
        await harness.aclose()
        await sb.stop()


@pytest.mark.timeout(900)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(polls=st.lists(POLL, min_size=1, max_size=4))
def test_any_page_sequence_makes_progress_or_fails_loudly(polls: list[Any], tmp_path_factory: Any) -> None:
    asyncio.run(scenario(polls, tmp_path_factory.mktemp("paging")))


@pytest.mark.parametrize(("actions", "reason", "written"), [
    (["keep", "keep", "no-link"], "NO_DELTA_LINK", 7),  # the case: the last page has no link at all
    (["keep", "repeat"], "PAGING_LOOP", 6),              # a next link to the page itself
    (["keep", "keep", "loop"], "PAGING_LOOP", 7),        # the last page links back to the first
])
async def test_a_read_that_cannot_progress_fails_loudly_and_restarts(tmp_path: Path, actions: list[str],
                                                                     reason: str, written: int) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=7, seed=5))  # three pages: 3, 3 and 1 rows
    harness = Harness(sb, tmp_path)
    try:
        sb.variants.paging.set(script=actions)
        error = await harness.poll()
        assert error is not None and error.reason == reason and "contacts" in str(error)
        assert len(actual_profiles(sb)) == written, "the rows read before the failure were written"
        assert harness.cursor() is not None and "$skiptoken" not in str(harness.cursor())
        # Changes anywhere in the table are seen by the next poll (the issue: it re-read page two forever).
        table = sb.d365.table("contacts")
        for rid in list(table.rows):
            table.upsert(rid, lastname="Seen")
        assert await harness.poll() is None
        assert level(sb) is None and {p["lastName"] for p in actual_profiles(sb).values()} == {"Seen"}
    finally:
        await harness.aclose()
        await sb.stop()


async def test_a_worker_reports_a_stream_that_cannot_progress(plane: ControlPlane) -> None:
    """A real worker process against a service that never sends the delta link: every record
    still arrives, and the pass's error names the stall (the status then shows it as its reason)."""
    sb = await start_sandbox(seed=SeedSpec(contacts=1_200, seed=8))
    try:
        prepare(sb, plane.data_dir)
        sb.variants.paging.set(default="no-link")
        await plane.stub.CreateWorkflow(svc.CreateWorkflowRequest(
            workflow_id="stalled", workflow=pb.Workflow(spec=ingress_spec(sb, batch_size=500))))
        await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/stalled"))
        await profiles_converge(sb, 120, "the stalled workflow's load")

        async def stalled() -> bool:
            reports = await plane.worker_reports("stalled")
            return bool(reports) and (reports[0].get("last_error") or {}).get("reason") == "NO_DELTA_LINK"

        await eventually(stalled, "NO_DELTA_LINK as the worker's last error", 60)
        # The service sends its delta links again: the stream moves on, new rows arrive.
        sb.variants.paging.reset()
        new = sb.d365.table("contacts").upsert(firstname="After", lastname="Recovery",
                                               emailaddress1="after.recovery@example.com")
        await converge(lambda: new in actual_profiles(sb), 120, "a row created after the service recovered")
        await verified(plane.stub, "stalled")
    finally:
        await sb.stop()
