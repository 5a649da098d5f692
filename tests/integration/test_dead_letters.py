"""Dead letters end to end: poison records rejected by the Campaign emulator land in the
workers' dead-letter store with their reasons; ListDeadLetters shows them over gRPC;
RetryDeadLetters (gRPC, and the CLI against the same port) has the workers send them
again; once the destination accepts them they are written and the count drops to zero.
The control plane runs in-process, the worker as a real OS process, the sandbox over
real HTTP. Plus the dead-letter table itself: the additive migration, mark and settle."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.state.records import REDACTED
from syncplane.state.sqlite import SqliteWorkerState
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.embedded_plane import ControlPlane
from tests.integration.cli_env import cli
from tests.integration.ingress_env import (
    converge,
    expected_profiles,
    ingress_spec,
    poison_contacts,
    prepare,
    prepared_sandbox,
    profiles_converge,
    status_until,
)
from tests.integration.test_api_errors import error_info, expect, field_paths
from tests.integration.verify_env import verified

NAME = "letters"
PARENT = f"workflows/{NAME}"


async def all_letters(plane: ControlPlane, page_size: int = 0) -> list[svc.DeadLetter]:
    req = svc.ListDeadLettersRequest(parent=PARENT, page_size=page_size)
    out: list[svc.DeadLetter] = []
    while True:
        resp = await plane.stub.ListDeadLetters(req)
        out.extend(resp.dead_letters)
        if not resp.next_page_token:
            return out
        req.page_token = resp.next_page_token


async def letters_until(plane: ControlPlane, predicate: Callable[[list[svc.DeadLetter]], bool],
                        timeout: float, what: str) -> list[svc.DeadLetter]:
    """Poll ListDeadLetters until the predicate holds (the workers run on their own clock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate(letters := await all_letters(plane)):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; dead letters: {letters}")
        await asyncio.sleep(0.2)
    return letters


async def run_cli(plane: ControlPlane, *args: str) -> str:
    """The real CLI's stdout; it must succeed."""
    res = await cli(plane.port, *args)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.timeout(600)
async def test_poison_records_are_dead_lettered_then_retried_into_the_destination(plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=400, seed=11), plane.data_dir) as sb:
        bad = poison_contacts(sb, 4)
        await plane.stub.CreateWorkflow(svc.CreateWorkflowRequest(
            workflow_id=NAME, workflow=pb.Workflow(spec=ingress_spec(sb, batch_size=100))))
        await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name=PARENT))
        everything = expected_profiles(sb)
        good = {k: v for k, v in everything.items() if k not in bad}
        await profiles_converge(sb, 120, "all but the poison records", expected=good)

        # Each poison record is listed with its reason, over gRPC.
        letters = await letters_until(plane, lambda ls: len(ls) == 4, 60, "four dead letters")
        assert [d.key for d in letters] == bad
        for d in letters:
            assert d.stream == "contact" and d.resource == "profile" and d.key_field == "externalId"
            assert d.http_status == 400 and "poison" in d.error.lower(), d.error
            assert d.attempts == 1 and not d.retry_pending and not d.deleted
            assert d.first_seen_time.ToNanoseconds() > 0
            assert d.last_seen_time.ToNanoseconds() >= d.first_seen_time.ToNanoseconds()
            assert d.payload["email"] == everything[d.key]["email"]
            assert d.payload["externalId"] == d.key
        # the store's count and the worker's counters arrive by different paths: wait for both
        status = await status_until(plane.stub, NAME, lambda s: s.dead_letters == 4 and s.counters.dead_lettered >= 4,
                                    30)
        assert status.counters.dead_lettered == 4

        # Pages: opaque tokens, the total on every page.
        first = await plane.stub.ListDeadLetters(svc.ListDeadLettersRequest(parent=PARENT, page_size=3))
        assert [d.key for d in first.dead_letters] == bad[:3] and first.total_size == 4 and first.next_page_token
        second = await plane.stub.ListDeadLetters(svc.ListDeadLettersRequest(
            parent=PARENT, page_size=3, page_token=first.next_page_token))
        assert [d.key for d in second.dead_letters] == bad[3:] and not second.next_page_token

        # The CLI shows them too (payload included with -o json).
        listed = json.loads(await run_cli(plane, "deadletters", "list", NAME, "-o", "json"))
        assert [i["key"] for i in listed["items"]] == bad and listed["items"][0]["httpStatus"] == 400

        # Retried while the destination still rejects it: kept, one more attempt, a new last-seen.
        await plane.stub.RetryDeadLetters(svc.RetryDeadLettersRequest(parent=PARENT, keys=[bad[0]]))
        again = await letters_until(plane, lambda ls: ls[0].attempts == 2 and not ls[0].retry_pending, 60,
                                    "the rejected retry to be counted")
        assert len(again) == 4 and again[0].last_seen_time.ToNanoseconds() > letters[0].last_seen_time.ToNanoseconds()
        assert again[0].first_seen_time == letters[0].first_seen_time
        assert all(d.attempts == 1 for d in again[1:]), "only the selected key was retried"

        # The destination accepts them now: a retry of two keys over gRPC delivers those two...
        sb.acs.clear_poison()
        resp = await plane.stub.RetryDeadLetters(svc.RetryDeadLettersRequest(parent=PARENT, keys=bad[:2]))
        assert resp.marked_count == 2
        with_two = {**good, **{k: everything[k] for k in bad[:2]}}
        await profiles_converge(sb, 60, "the two retried records", expected=with_two)
        left = await letters_until(plane, lambda ls: len(ls) == 2, 30, "two dead letters left")
        assert [d.key for d in left] == bad[2:]
        await status_until(plane.stub, NAME, lambda s: s.dead_letters == 2, 30)

        # ...and the CLI retries the rest, against the same server port.
        out = await run_cli(plane, "deadletters", "retry", NAME)
        assert "2 dead letter(s) marked for retry" in out, out
        await profiles_converge(sb, 60, "every record", expected=everything)
        await letters_until(plane, lambda ls: not ls, 30, "no dead letters")
        status = await status_until(plane.stub, NAME, lambda s: s.dead_letters == 0, 30)
        assert status.counters.dead_lettered == 4, "a retry is not a new dead letter"
        table = await run_cli(plane, "list")
        header, row = table.splitlines()[0].split(), next(r.split() for r in table.splitlines() if r.startswith(NAME))
        assert header == ["NAME", "TYPE", "DESIRED", "PHASE", "DEGRADED", "BACKLOG", "DRIFT", "DEADLETTERS", "AGE"]
        assert row[header.index("DEADLETTERS")] == "0"
        await verified(plane.stub, NAME)


def state_rows(db: Path, workflow: str) -> dict[str, int]:
    """The workflow's rows in each table of the workers' state database."""
    con = sqlite3.connect(db)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: con.execute(f"SELECT COUNT(*) FROM {t} WHERE workflow = ?", (workflow,)).fetchone()[0]
                for t in tables}
    finally:
        con.close()


@pytest.mark.timeout(600)
async def test_a_workflow_created_again_after_a_delete_starts_afresh(plane: ControlPlane) -> None:
    """Deleting a workflow forgets its workers' state: checkpoints, dead letters, held records.
    A workflow created again under the same name reads everything again and has no dead letters."""
    sb = await start_sandbox(seed=SeedSpec(contacts=300, seed=12))
    db = plane.data_dir / "worker-state.db"
    try:
        prepare(sb, plane.data_dir)
        poison_contacts(sb, 2)
        spec = ingress_spec(sb, batch_size=100)
        create = svc.CreateWorkflowRequest(workflow_id=NAME, workflow=pb.Workflow(spec=spec))
        await plane.stub.CreateWorkflow(create)
        await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name=PARENT))
        await letters_until(plane, lambda ls: len(ls) == 2, 120, "two dead letters")
        await status_until(plane.stub, NAME, lambda s: s.backlog == 0 and s.phase == pb.PHASE_RUNNING, 60)
        rows = state_rows(db, NAME)
        assert rows["checkpoints"] >= 1 and rows["dead_letters"] == 2, rows

        await plane.stub.StopWorkflow(svc.StopWorkflowRequest(name=PARENT))
        await status_until(plane.stub, NAME, lambda s: s.phase == pb.PHASE_STOPPED, 60)
        await plane.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=PARENT))
        await converge(lambda: not any(state_rows(db, NAME).values()), 30,
                       lambda: f"the deleted workflow's state forgotten: {state_rows(db, NAME)}")

        # The same name again, the destination accepting everything now: a full read writes the two
        # records the old checkpoint had gone past, and the old dead letters are gone.
        sb.acs.clear_poison()
        seq = max((r.seq for r in sb.requests.records()), default=0)
        await plane.stub.CreateWorkflow(create)
        await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name=PARENT))
        everything = expected_profiles(sb)
        await profiles_converge(sb, 120, "every record", expected=everything)
        first = next(r.path for r in sb.requests.records(since=seq, server="d365") if "/contacts" in r.path)
        assert "$deltatoken" not in first and "$skiptoken" not in first, first
        assert await all_letters(plane) == []
        await verified(plane.stub, NAME)
    finally:
        await sb.stop()


async def test_dead_letter_calls_validate_their_input(plane: ControlPlane) -> None:
    await plane.create(NAME)
    err = await expect(plane.stub.ListDeadLetters(svc.ListDeadLettersRequest(parent="workflows/nope")),
                       grpc.StatusCode.NOT_FOUND)
    assert error_info(err).reason == "NOT_FOUND"
    await expect(plane.stub.RetryDeadLetters(svc.RetryDeadLettersRequest(parent="workflows/nope")),
                 grpc.StatusCode.NOT_FOUND)
    err = await expect(plane.stub.ListDeadLetters(svc.ListDeadLettersRequest(parent="Bad_Name", page_size=-1)),
                       grpc.StatusCode.INVALID_ARGUMENT)
    assert field_paths(err) == ["parent", "page_size"]
    err = await expect(plane.stub.ListDeadLetters(svc.ListDeadLettersRequest(parent=PARENT, page_token="x")),
                       grpc.StatusCode.INVALID_ARGUMENT)
    assert field_paths(err) == ["page_token"]
    err = await expect(plane.stub.RetryDeadLetters(svc.RetryDeadLettersRequest(parent=PARENT, keys=["a", "", "a"])),
                       grpc.StatusCode.INVALID_ARGUMENT)
    assert field_paths(err) == ["keys[1]", "keys[2]"]
    # Nothing is dead-lettered yet: an unknown key marks nothing and says which.
    err = await expect(plane.stub.RetryDeadLetters(svc.RetryDeadLettersRequest(parent=PARENT, keys=["c-1"])),
                       grpc.StatusCode.INVALID_ARGUMENT)
    assert field_paths(err) == ["keys[0]"]
    resp = await plane.stub.RetryDeadLetters(svc.RetryDeadLettersRequest(parent=PARENT))
    assert resp.marked_count == 0
    empty = await plane.stub.ListDeadLetters(svc.ListDeadLettersRequest(parent=PARENT))
    assert not empty.dead_letters and empty.total_size == 0 and not empty.next_page_token


# -- the table itself ------------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE dead_letters (
    workflow TEXT NOT NULL, stream TEXT NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    status INTEGER NOT NULL, error TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    attempts INTEGER NOT NULL, PRIMARY KEY (workflow, stream, key));
INSERT INTO dead_letters VALUES ('wf', 'contact', 'c-1', '{"email": "x"}', 400, 'bad', 1.0, 2.0, 3);
"""


def test_an_older_table_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    for _ in range(2):  # opening twice migrates once
        state = SqliteWorkerState(path)
        (letter,) = state.list_dead_letters("wf", None, 10)
        state.close()
    assert (letter.key, letter.payload, letter.attempts, letter.first_seen) == ("c-1", {"email": "x"}, 3, 1.0)
    assert (letter.resource, letter.key_field, letter.deleted, letter.retry) == ("", "", False, False)


def test_mark_is_all_or_nothing_and_settle_deletes_or_counts(tmp_path: Path) -> None:
    state = SqliteWorkerState(tmp_path / "state.db")
    for key in ("c-1", "c-2", "c-3"):
        state.dead_letter("wf", "contact", key, {"email": key, "apiKey": "k3y"}, 400, "bad", resource="profile",
                          key_field="externalId")
    state.dead_letter("other", "contact", "c-9", {}, 400, "bad")
    assert state.mark_for_retry("wf", ["c-1", "nope"]) == (0, ["nope"])
    assert not state.marked_for_retry("wf", "contact")
    assert state.mark_for_retry("wf", ["c-1", "c-2"]) == (2, [])
    marked = state.marked_for_retry("wf", "contact")
    assert [m.key for m in marked] == ["c-1", "c-2"]
    assert marked[0].payload == {"email": "c-1", "apiKey": REDACTED}, "no credentials stored"
    assert marked[0].resend_values() == {"email": "c-1"}, "nor re-sent"
    state.settle_retry("wf", "contact", ["c-1"], [("c-2", 422, "still bad")], ["c-1", "c-2"])
    rows = {d.key: d for d in state.list_dead_letters("wf", None, 10)}
    assert sorted(rows) == ["c-2", "c-3"]
    assert (rows["c-2"].attempts, rows["c-2"].status, rows["c-2"].error, rows["c-2"].retry) == (2, 422, "still bad",
                                                                                                  False)
    assert state.dead_letter_count("wf") == 2 and state.dead_letter_count("other") == 1
    assert state.mark_for_retry("wf") == (2, [])
    page = state.list_dead_letters("wf", ("contact", "c-2"), 10)
    assert [d.key for d in page] == ["c-3"] and page[0].retry
    state.close()
