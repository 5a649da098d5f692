"""`syncplane verify` end to end: the control plane in-process, the worker a real process, the
sandbox over real HTTP. The destination is tampered with through the sandbox's own API (as a
marketer or another tool would), and verify must count exactly what was done."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.backends import eventually
from tests.embedded_plane import CRASH_TOLERANT, ControlPlane
from tests.integration.cli_env import cli
from tests.integration.ingress_env import (
    converge,
    expected_profiles,
    ingress_spec,
    prepare,
    profiles_converge,
    status_of,
    status_until,
)
from tests.integration.optinout_env import crm_row, profile, set_campaign, set_crm, start_worker
from tests.integration.test_egress import ALL, activities, egress_spec, expected_activities
from tests.integration.test_ingress import start, stop
from tests.integration.verify_env import counts, in_sync, settled, tamper_profiles, verified, verify

pytestmark = pytest.mark.supervisor(CRASH_TOLERANT)


@pytest.mark.timeout(600)
async def test_verify_counts_exactly_what_was_tampered_and_repair_fixes_it(plane: ControlPlane) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=2_000, loyalty_cards=300, seed=21))
    try:
        prepare(sb, plane.data_dir)
        await start(plane, "verified", ingress_spec(sb, cards=True))
        await profiles_converge(sb, 300, "the first load", cards=True)
        resp = await verify(plane.stub, "verified")
        assert counts(resp) == {"contact": (0, 0, 0), "new_loyaltycard": (0, 0, 0)}, resp
        assert {s.stream: s.counts.compared for s in resp.streams} == {"contact": 2_000, "new_loyaltycard": 300}
        assert resp.result.requests > 0

        # Tamper with the destination through Campaign's API and the sandbox's control routes.
        deleted_keys, extra_keys, edited_keys = await tamper_profiles(sb)
        async with httpx.AsyncClient(base_url=sb.acs_origin) as http:
            # a marketer's own profile, no CRM id: not the integration's, never compared
            assert (await http.post("/_sandbox/resources/profile/records",
                                    json={"email": "m@example.com"})).status_code == 201

        resp = await verify(plane.stub, "verified", samples=100)
        assert counts(resp) == {"contact": (3, 2, 4), "new_loyaltycard": (0, 0, 0)}, resp
        contact = next(s for s in resp.streams if s.stream == "contact")
        assert (list(contact.missing_keys), list(contact.extra_keys), list(contact.different_keys)) == \
            (deleted_keys, extra_keys, edited_keys)
        assert contact.counts.in_flight == 0, "nothing the workers will fix on their own"
        c = resp.result.counts
        assert (c.missing, c.extra, c.different) == (3, 2, 4)

        # The summary is kept in status; the CLI shows the same, as text and JSON.
        status = await status_of(plane.stub, "verified")
        assert (status.last_verify.counts.missing, status.last_verify.counts.extra,
                status.last_verify.counts.different) == (3, 2, 4)
        assert status.last_verify.HasField("verify_time")
        res = await cli(plane.port, "verify", "verified", "-o", "json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["result"]["counts"]["missing"] == 3 and doc["result"]["counts"]["different"] == 4
        res = await cli(plane.port, "verify", "verified", "--samples", "2")
        assert res.returncode == 0 and "DIFFERENCES" in res.stdout and deleted_keys[0] in res.stdout, res.stdout
        assert "3 missing, 2 extra, 4 different" in res.stdout
        described = (await cli(plane.port, "describe", "verified")).stdout
        assert "Last verify:" in described and "3 missing, 2 extra, 4 different (0 in flight)" in described, described

        # --repair queues them; the workers' next pass puts them right, through the pipeline.
        resp = await verify(plane.stub, "verified", repair=True)
        assert {s.stream: s.queued for s in resp.streams} == {"contact": 9, "new_loyaltycard": 0}
        expected = expected_profiles(sb)
        await profiles_converge(sb, 120, "the repair", expected=expected)
        assert in_sync(await verify(plane.stub, "verified")), "0 differences after the repair"
        assert sb.acs.profiles.find(extra_keys[0]) is None
    finally:
        await sb.stop()


async def test_verify_errors_are_one_clear_line(plane: ControlPlane) -> None:
    res = await cli(plane.port, "verify", "nope")
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    res = await cli(plane.port, "verify", "Bad_Name")
    assert res.returncode == 1 and "name" in res.stderr and "Traceback" not in res.stderr
    await plane.create("unreachable", "ingress")  # secrets whose token URL nothing listens on
    res = await cli(plane.port, "verify", "unreachable")
    assert res.returncode == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr


async def test_a_stopped_workflow_is_verified_against_its_spec(plane: ControlPlane) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=200, seed=4))
    try:
        prepare(sb, plane.data_dir)
        await start(plane, "stopped", ingress_spec(sb))
        await profiles_converge(sb, 120, "the first load")
        await stop(plane, "stopped")
        sb.d365.table("contacts").upsert(sorted(sb.d365.table("contacts").rows)[0], lastname="Changed")
        resp = await verify(plane.stub, "stopped")
        assert counts(resp) == {"contact": (0, 0, 1)}
        assert resp.result.counts.in_flight == 0, "a stopped workflow has nothing in flight"
        assert (await status_of(plane.stub, "stopped")).phase == pb.PHASE_STOPPED
    finally:
        await sb.stop()


async def test_verify_while_the_workflow_runs_names_the_records_in_flight(plane: ControlPlane) -> None:
    """Running, past its first load, its next poll an hour away: contacts edited since its last
    checkpoint differ and are reported in flight, by key, in the answer, the status and the CLI."""
    sb = await start_sandbox(seed=SeedSpec(contacts=300, seed=8))
    try:
        prepare(sb, plane.data_dir)
        await start(plane, "polling", ingress_spec(sb, poll_seconds=3600))
        await profiles_converge(sb, 120, "the first load")
        await eventually(lambda: settled(plane.stub, "polling", {"contact": (0, 0, 0)}), "the first load committed",
                         60, 1.0)
        edited = sorted(sb.d365.table("contacts").rows)[:5]
        for rid in edited:
            sb.d365.table("contacts").upsert(rid, lastname="Edited meanwhile")
        resp = await verify(plane.stub, "polling")
        assert counts(resp) == {"contact": (0, 0, 5)}, resp
        c = resp.result.counts
        assert c.in_flight == 5 and list(resp.streams[0].in_flight_keys) == edited, resp
        assert (await status_of(plane.stub, "polling")).phase == pb.PHASE_RUNNING
        assert (await status_of(plane.stub, "polling")).last_verify.counts.in_flight == 5
        doc = json.loads((await cli(plane.port, "get", "polling", "-o", "json")).stdout)
        assert int(doc["status"]["lastVerify"]["counts"]["inFlight"]) == 5, doc["status"]
        described = (await cli(plane.port, "describe", "polling")).stdout
        assert "0 missing, 0 extra, 5 different (5 in flight)" in described, described
    finally:
        await sb.stop()


async def test_egress_verify_counts_tampered_activities_and_repair_resends_them(plane: ControlPlane) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=200, events=600, seed=31))
    try:
        prepare(sb, plane.data_dir)
        await start(plane, "events", egress_spec(sb))
        wanted = len(expected_activities(sb, ALL))
        await converge(lambda: len(activities(sb)) == wanted, 300, "every wanted event as an activity")
        resp = await verify(plane.stub, "events")
        assert counts(resp) == {"events": (0, 0, 0)} and resp.streams[0].counts.compared == wanted

        rows = sorted(sb.d365.table("new_emailevents").rows.items())
        deleted, edited = rows[:2], rows[2:5]
        async with httpx.AsyncClient(base_url=sb.d365_origin) as http:
            for rid, _ in deleted:
                assert (await http.delete(f"/_sandbox/tables/new_emailevents/rows/{rid}")).status_code == 204
            for rid, _ in edited:
                r = await http.put(f"/_sandbox/tables/new_emailevents/rows/{rid}", json={"subject": "Tampered"})
                assert r.status_code == 200, r.text
            r = await http.put(f"/_sandbox/tables/new_emailevents/rows/{uuid.uuid4()}",
                               json={"new_eventid": "evt-unknown", "subject": "not from an event"})
            assert r.status_code == 200, r.text
        resp = await verify(plane.stub, "events")
        assert counts(resp) == {"events": (2, 1, 3)}, resp
        s = resp.streams[0]
        assert sorted(s.missing_keys) == sorted(a["new_eventid"] for _, a in deleted)
        assert sorted(s.different_keys) == sorted(a["new_eventid"] for _, a in edited)
        assert list(s.extra_keys) == ["evt-unknown"] and s.counts.in_flight == 0

        # repair: the events are sent again; egress deletes nothing, so the extra activity stays reported
        resp = await verify(plane.stub, "events", repair=True)
        assert resp.streams[0].queued == 5
        await eventually(lambda: settled(plane.stub, "events", {"events": (0, 1, 0)}), "the repaired activities",
                         120, 1.0)
    finally:
        await sb.stop()


async def test_optinout_verify_counts_the_refused_pairs_and_repair_lets_the_opt_outs_win(plane: ControlPlane) -> None:
    """Bidirectional, through a worker: writes each side refused (dead letters) leave pairs that
    differ with no news to decide them again. verify counts exactly those; --repair queues them
    and the next pass writes the opt-outs, on both sides."""
    sb = await start_sandbox(seed=SeedSpec(contacts=200, seed=41, opt_out_ratio=0.0))
    try:
        keys = await start_worker(plane.stub, plane.data_dir, sb, "BIDIRECTIONAL")
        set_crm(sb, keys[-1], donotemail=True)
        await converge(lambda: profile(sb, keys[-1])["blackList"] is True, 120, "the first sync")
        await verified(plane.stub, "optio")

        to_campaign, to_crm = keys[:3], keys[3:5]
        sb.acs.poison_keys("profile", *to_campaign, *(str(sb.acs.profiles.find(k)) for k in to_campaign))
        sb.d365.poison_keys("contacts", *to_crm)
        for k in to_campaign:
            set_crm(sb, k, donotbulkemail=True)
        for k in to_crm:
            set_campaign(sb, k, blackList=True)
        await status_until(plane.stub, "optio", lambda s: s.dead_letters == 5, 120)
        sb.acs.clear_poison()
        sb.d365.clear_poison()
        await eventually(lambda: settled(plane.stub, "optio", {"optinout": (0, 0, 5)}),
                         "the five refused pairs, settled", 60, 1.0)
        resp = await verified(plane.stub, "optio", {"optinout": (0, 0, 5)})
        assert list(resp.streams[0].different_keys) == sorted(to_campaign + to_crm)

        resp = await verify(plane.stub, "optio", repair=True)
        assert resp.streams[0].queued == 5 and resp.result.repair_requested
        await eventually(lambda: settled(plane.stub, "optio", {"optinout": (0, 0, 0)}), "the repaired pairs",
                         120, 1.0)
        assert [profile(sb, k)["blackListEmail"] for k in to_campaign] == [True] * 3
        assert [crm_row(sb, k)["donotemail"] for k in to_crm] == [True] * 2
        await verified(plane.stub, "optio")
    finally:
        await sb.stop()
