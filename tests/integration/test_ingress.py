"""The ingress workflow end to end: the control plane in-process, the worker as a real OS
process, the sandbox emulators over real HTTP. Every check is on the destination's data
(counted by key) or on the sandbox's request log, never on our own objects."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest

from syncplane.credentials import write_local_secret
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.state.sqlite import SqliteWorkerState
from syncplane_sandbox import Sandbox, SeedSpec
from tests.embedded_plane import CRASH_TOLERANT, ControlPlane, worker_processes
from tests.integration.conftest import watch_until
from tests.integration.ingress_env import (
    actual_profiles,
    converge,
    dead_letters,
    expected_profiles,
    ingress_spec,
    poison_contacts,
    prepared_sandbox,
    profile_key_count,
    profiles_converge,
    status_of,
    status_until,
)
from tests.integration.sandbox_fixtures import running_sandbox
from tests.integration.verify_env import verified

pytestmark = pytest.mark.supervisor(CRASH_TOLERANT)


async def start(plane: ControlPlane, name: str, spec: pb.WorkflowSpec) -> None:
    await plane.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id=name, workflow=pb.Workflow(spec=spec)))
    await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name=f"workflows/{name}"))


async def stop(plane: ControlPlane, name: str) -> pb.Workflow:
    rev = plane.store.revision()
    await plane.stub.StopWorkflow(svc.StopWorkflowRequest(name=f"workflows/{name}"))
    wf, _ = await watch_until(plane.stub, name, lambda w: w.status.phase == pb.PHASE_STOPPED, rev, timeout=90)
    return wf


async def restart_with(plane: ControlPlane, name: str, spec: pb.WorkflowSpec, paths: list[str]) -> None:
    from google.protobuf import field_mask_pb2

    wf = pb.Workflow(name=f"workflows/{name}", spec=spec)
    await plane.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=wf,
                                                              update_mask=field_mask_pb2.FieldMask(paths=paths)))
    await stop(plane, name)
    await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name=f"workflows/{name}"))


def worker_pid(plane: ControlPlane) -> int | None:
    procs = worker_processes(plane.data_dir)
    return procs[0].pid if procs else None


async def load_then_update_and_delete(plane: ControlPlane, sb: Sandbox, contacts: int, spec: pb.WorkflowSpec,
                                      updates: int, deletes: int, card_deletes: int) -> None:
    """A first load of ``contacts`` contacts and their cards, then updates and deletes through change
    tracking; each stage converges, and the last one ends with verify = 0 differences."""
    await start(plane, "ingress", spec)
    await profiles_converge(sb, 600, f"the first load of {contacts} contacts and their cards", cards=True)
    status = await status_of(plane.stub, "ingress")
    assert status.counters.dead_lettered == 0
    assert profile_key_count(sb) == (contacts, contacts)

    # Updates and deletes flow through change tracking.
    table = sb.d365.table("contacts")
    ids = sorted(table.rows)
    rng = random.Random(1)
    for rid in rng.sample(ids, updates):
        table.upsert(rid, lastname="Updated")
    # (contacts no card links to: the sandbox does not cascade a delete into the cards' lookups)
    linked = {r["new_contactid"] for r in sb.d365.table("new_loyaltycards").rows.values()}
    for rid in rng.sample([i for i in ids if i not in linked], deletes):
        table.delete(rid)
    card_ids = sorted(sb.d365.table("new_loyaltycards").rows)
    for rid in card_ids[:card_deletes]:
        sb.d365.table("new_loyaltycards").delete(rid)
    await profiles_converge(sb, 120, "updates and deletes", cards=True)
    await verified(plane.stub, "ingress")


async def filter_to_active_contacts(plane: ControlPlane, sb: Sandbox, spec: pb.WorkflowSpec) -> None:
    """Restart ``spec`` with a filter on contacts (statecode = 0) that deletes the excluded at the
    destination; a filter change re-reads the table. Returns once Campaign holds the active ones only."""
    changed = pb.WorkflowSpec()
    changed.CopyFrom(spec)
    entity = changed.ingress.entities[0]
    entity.filter.conditions.add(field="statecode", operator=pb.FILTER_OPERATOR_EQUALS, value="0")
    entity.filter.delete_excluded = True
    await restart_with(plane, "ingress", changed, ["spec.ingress"])
    active = expected_profiles(sb, lambda row: row.get("statecode") == 0)
    assert len(active) < len(sb.d365.table("contacts").rows)
    await profiles_converge(sb, 300, "the filter change", where=lambda row: row.get("statecode") == 0)


@pytest.mark.timeout(1200)
async def test_full_ingress_then_updates_deletes_and_filter_change(plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=50_000, loyalty_cards=2_000, seed=7), plane.data_dir) as sb:
        spec = ingress_spec(sb, cards=True)
        await load_then_update_and_delete(plane, sb, 50_000, spec, updates=300, deletes=200, card_deletes=50)
        await filter_to_active_contacts(plane, sb, spec)


async def test_a_filter_deleting_excluded_parents_leaves_no_child_linked_to_them(plane: ControlPlane) -> None:
    """The cards of the contacts the new filter excludes are deleted with their profiles and held
    (the whole kind, each way a parent leaves and comes back: test_parent_deletes.py)."""
    async with prepared_sandbox(SeedSpec(contacts=2_000, loyalty_cards=200, seed=7), plane.data_dir) as sb:
        spec = ingress_spec(sb, cards=True)
        await load_then_update_and_delete(plane, sb, 2_000, spec, updates=30, deletes=20, card_deletes=5)
        await filter_to_active_contacts(plane, sb, spec)
        await verified(plane.stub, "ingress")


@pytest.mark.timeout(1200)
async def test_kill_9_at_ten_random_moments_loses_and_duplicates_nothing(plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=100_000, seed=11), plane.data_dir) as sb:
        await start(plane, "crashy", ingress_spec(sb, batch_size=1000))
        rng = random.Random(20261128)
        kills = 0
        for written_at in sorted(rng.sample(range(2_000, 90_000), 10)):
            def reached(w: int = written_at) -> bool:
                return len(sb.acs.profiles.rows) >= w and worker_pid(plane) is not None

            await converge(reached, 300, f"{written_at} profiles written and a worker running")
            pid = worker_pid(plane)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            kills += 1
        assert kills == 10
        await profiles_converge(sb, 600, "consistency after 10 kills")
        assert profile_key_count(sb) == (100_000, 100_000)  # no duplicates, none lost
        status = await status_of(plane.stub, "crashy")
        assert status.phase == pb.PHASE_RUNNING
        await verified(plane.stub, "crashy")


@pytest.mark.timeout(900)
async def test_throttling_errors_and_token_expiry_lose_nothing(plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=600, seed=5), plane.data_dir) as sb:
        sb.faults.set(rate_429=0.10, rate_503=0.05, retry_after_s=1)
        await start(plane, "faulty", ingress_spec(sb, batch_size=100))
        await converge(lambda: len(sb.acs.profiles.rows) >= 200, 300, "a third delivered")
        sb.expire_tokens()  # mid-run: every issued token is now invalid
        await profiles_converge(sb, 600, "delivery under faults")
        log = sb.requests
        assert sum(1 for r in log.records() if r.status == 429) > 0
        assert sum(1 for r in log.records() if r.status == 503) > 0
        assert sum(1 for r in log.records() if r.status == 401) > 0, "the expired token was used and refused"
        # Strict on the connection that carried the Retry-After; on the client's other connections a
        # request may have been in flight already when the response left: allow it 500 ms to arrive.
        assert log.retry_after_violations(in_flight_grace=0.5) == [], "a request went out before Retry-After"
        throttled = [r for r in log.records() if r.retry_after is not None and r.connection]
        assert any(o.connection == t.connection and o.seq > t.seq for t in throttled for o in log.records()), \
            "the strict same-connection check had something to check"
        status = await status_until(plane.stub, "faulty", lambda s: s.counters.written >= 600, 30)
        assert status.counters.dead_lettered == 0 and status.phase == pb.PHASE_RUNNING
        await verified(plane.stub, "faulty")  # through the same faults: verify honours them too


async def test_stop_during_heavy_sync_commits_and_start_resumes(plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=30_000, seed=9), plane.data_dir) as sb:
        await start(plane, "heavy", ingress_spec(sb, batch_size=500))
        await converge(lambda: len(sb.acs.profiles.rows) >= 6_000, 300, "6,000 profiles written")
        # Campaign holds every write until the worker is told to stop: the stop comes mid-load
        # whatever the machine's speed. Released once STOPPING shows, so the drain can end.
        with sb.faults.acs.holding():
            pid = worker_pid(plane)
            assert pid is not None
            stopping = asyncio.ensure_future(stop(plane, "heavy"))
            await status_until(plane.stub, "heavy", lambda s: s.phase == pb.PHASE_STOPPING, 60)
        await stopping
        assert worker_processes(plane.data_dir) == []
        # The worker drained (exit 0, not killed by the supervisor's escalation) and committed.
        log_text = (plane.data_dir / "run" / "logs" / "heavy.0.log").read_text()
        assert "drained and stopped" in log_text
        state = SqliteWorkerState(plane.data_dir / "worker-state.db")
        cursor = state.load("heavy", "contact")
        state.close()
        assert cursor is not None and "$skiptoken=" in cursor, "a mid-load checkpoint was committed"
        written_before = len(sb.acs.profiles.rows)
        seq = max((r.seq for r in sb.requests.records()), default=0)

        await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/heavy"))
        expected = expected_profiles(sb)
        await profiles_converge(sb, 300, "completion after restart")
        reads = [r for r in sb.requests.records(since=seq, server="d365") if "/contacts?" in r.path]
        assert reads and "$skiptoken=" in reads[0].path, "the restart resumed from the checkpoint, not from the start"
        posts = [r for r in sb.requests.records(since=seq, server="acs") if r.method == "POST"]
        assert len(posts) < len(expected) - written_before + 2_000, "records before the checkpoint were re-sent"
        await verified(plane.stub, "heavy")


async def test_rejected_records_go_to_dead_letters_and_the_rest_is_written(plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=1_000, seed=3), plane.data_dir) as sb:
        bad = poison_contacts(sb, 3)
        await start(plane, "poison", ingress_spec(sb, batch_size=1000))
        expected = {k: v for k, v in expected_profiles(sb).items() if k not in bad}

        await profiles_converge(sb, 120, "all but the poison records", expected=expected)
        # the letters are stored once the batch's writes return, a moment after the last profile lands
        await converge(lambda: len(dead_letters(plane.data_dir, "poison")) == len(bad), 30,
                       lambda: f"the {len(bad)} poison records dead-lettered: {dead_letters(plane.data_dir, 'poison')}")
        letters = dead_letters(plane.data_dir, "poison")
        assert sorted(d["key"] for d in letters) == bad
        assert all(d["status"] == 400 and d["error"] for d in letters)
        assert all(d["payload"] for d in letters), "the record itself is kept for a retry"
        # the counters come with the worker's next report after the last watermark commit: wait for all of them
        status = await status_until(plane.stub, "poison",
                                    lambda s: s.counters.written + s.counters.dead_lettered >= 1000, 30)
        assert status.counters.dead_lettered == 3 and status.counters.written == 997 and status.backlog == 0
        resp = await verified(plane.stub, "poison", {"contact": (3, 0, 0)})  # exactly the dead letters are missing
        assert list(resp.streams[0].missing_keys) == bad


async def test_replay_rewrites_one_table_and_the_table_size_is_reported(plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=2_000, loyalty_cards=300, seed=13), plane.data_dir) as sb:
        spec = ingress_spec(sb, cards=True)
        await start(plane, "replayed", spec)
        await profiles_converge(sb, 120, "the first load", cards=True)
        status = await status_until(plane.stub, "replayed", lambda s: len(s.tables) == 2, 30)
        assert {t.source_table: t.rows for t in status.tables} == {"contact": 2_000, "new_loyaltycard": 300}

        # Someone edits profiles in Campaign: change tracking on the CRM side cannot see it.
        tampered = sorted(sb.acs.profiles.rows)[:25]
        for pkey in tampered:
            sb.acs.profiles.set(pkey, lastName="Tampered")
        assert actual_profiles(sb) != expected_profiles(sb)
        seq = max(r.seq for r in sb.requests.records())

        replay = pb.WorkflowSpec()
        replay.CopyFrom(spec)
        replay.ingress.replay.source_table = "contact"
        replay.ingress.replay.request_id = "r1"
        await restart_with(plane, "replayed", replay, ["spec.ingress.replay"])
        await profiles_converge(sb, 120, "the replay")
        # Only the replayed table was read in full again.
        full_reads = [r.path for r in sb.requests.records(since=seq, server="d365")
                      if "$select=" in r.path and "$skiptoken" not in r.path and "$deltatoken" not in r.path]
        assert any(p.split("?")[0].endswith("/contacts") for p in full_reads)
        assert not any(p.split("?")[0].endswith("/new_loyaltycards") for p in full_reads)

        # The same request id does not replay again on the next restart.
        seq = max(r.seq for r in sb.requests.records())
        await stop(plane, "replayed")
        await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/replayed"))
        await status_until(plane.stub, "replayed", lambda s: s.phase == pb.PHASE_RUNNING, 30)
        await converge(lambda: any("$deltatoken" in r.path for r in sb.requests.records(since=seq, server="d365")
                                   if "/contacts" in r.path), 30, "a delta read of contacts")
        assert not any("$select=" in r.path and "$deltatoken" not in r.path and "$skiptoken" not in r.path
                       for r in sb.requests.records(since=seq, server="d365") if "/contacts" in r.path)
        await verified(plane.stub, "replayed")


@pytest.mark.timeout(900)
async def test_a_field_removed_mid_sync_stops_with_schema_changed_and_resumes_after_the_fix(
        plane: ControlPlane) -> None:
    async with prepared_sandbox(SeedSpec(contacts=50_000, seed=17), plane.data_dir) as sb:
        spec = ingress_spec(sb, batch_size=1000)
        await start(plane, "schema", spec)
        await converge(lambda: len(sb.acs.profiles.rows) >= 10_000, 300, "10,000 profiles written")
        rev = plane.store.revision()
        sb.d365.table("contacts").drop_column("lastname")  # published mid-run in the CRM
        wf, _ = await watch_until(plane.stub, "schema", lambda w: w.status.phase == pb.PHASE_ERROR, rev, timeout=120)
        assert wf.status.last_error.reason == "SCHEMA_CHANGED"
        assert "'contact'" in wf.status.last_error.message and "'lastname'" in wf.status.last_error.message
        status = await status_of(plane.stub, "schema")
        assert status.counters.dead_lettered == 0, "nothing was dead-lettered on the way"

        # The fix: map without the dropped column, then start again (from ERROR).
        fixed = pb.WorkflowSpec()
        fixed.CopyFrom(spec)
        entity = fixed.ingress.entities[0]
        kept = [f for f in entity.fields if f.source != "lastname"]
        del entity.fields[:]
        entity.fields.extend(kept)
        await restart_with(plane, "schema", fixed, ["spec.ingress"])
        await status_until(plane.stub, "schema", lambda s: s.phase == pb.PHASE_RUNNING, 60)

        def consistent() -> bool:
            if len(sb.acs.profiles.rows) != 50_000:
                return False
            expected = {k: {f: v[f] for f in ("externalId", "email", "firstName")}
                        for k, v in expected_profiles(sb).items()}
            actual = {k: {f: v[f] for f in ("externalId", "email", "firstName")}
                      for k, v in actual_profiles(sb).items()}
            return expected == actual

        await converge(consistent, 300, "every contact delivered after the fix")
        assert profile_key_count(sb) == (50_000, 50_000)
        await verified(plane.stub, "schema")  # against the fixed mapping: lastname is no longer compared


async def test_wrong_credentials_give_error_without_leaking_the_secret(plane: ControlPlane) -> None:
    async with running_sandbox(SeedSpec(contacts=10, seed=2)) as sb:
        wrong = "not-the-secret-4711"
        for name, url, audience in (("d365-sandbox", sb.d365_token_url, {"scope": sb.d365_scope}),
                                    ("acs-sandbox", sb.acs_token_url, {"organization": sb.options.org,
                                                                       "apiHost": sb.acs_origin})):
            write_local_secret(plane.data_dir / "secrets", name, {"clientId": sb.client_id, "clientSecret": wrong,
                                                                  "tokenUrl": url, **audience})
        rev = plane.store.revision()
        await start(plane, "badcreds", ingress_spec(sb))
        wf, _ = await watch_until(plane.stub, "badcreds", lambda w: w.status.phase == pb.PHASE_ERROR, rev, timeout=60)
        assert wf.status.last_error.reason == "BAD_CREDENTIALS"
        assert sb.client_id in wf.status.last_error.message  # says which client, never the secret
        assert wrong not in str(wf) and wrong not in (plane.data_dir / "run" / "logs" / "badcreds.0.log").read_text()
