"""Egress end to end: Campaign email events become Dynamics activities, through a real
worker process and the sandbox over real HTTP. Checked on the activities themselves."""

from __future__ import annotations

import os
import signal
import uuid
from collections import Counter
from typing import Any

import pytest

from syncplane.egress.transform import crm_time
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane_sandbox import Sandbox, SeedSpec, start_sandbox
from tests.backends import eventually
from tests.embedded_plane import CRASH_TOLERANT, ControlPlane, worker_processes
from tests.factories import spec as default_spec
from tests.integration.ingress_env import converge, dead_letters, prepare, status_of
from tests.integration.test_ingress import restart_with, start
from tests.integration.verify_env import verified

pytestmark = pytest.mark.supervisor(CRASH_TOLERANT)


def egress_spec(sb: Sandbox, **switches: bool) -> pb.WorkflowSpec:
    s = default_spec("egress")
    s.source.endpoint = sb.acs_url
    s.destination.endpoint = sb.d365_url
    s.poll_interval.seconds = 1
    s.batch_size = 1000
    for name, on in switches.items():
        setattr(s.egress, name, on)
    return s


def wanted(event: dict[str, Any], enabled: set[str]) -> bool:
    kind = event["eventType"]
    return kind in enabled and (kind != "bounce" or event["bounceType"] == "hard")


def expected_activities(sb: Sandbox, enabled: set[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for e in sb.acs.events.rows.values():
        if wanted(e, enabled):
            out[e["eventId"]] = {
                "subject": f"{e['campaignId']} {e['deliveryId']}", "new_eventtype": e["eventType"],
                "regardingobjectid": e["externalId"], "new_campaignname": e["campaignName"],
                "new_deliveryname": e["deliveryName"], "new_eventdate": crm_time(e["date"]),
                "new_trackingurl": e["trackingUrl"] if e["eventType"] == "click" else None,
                "new_mirrorpageurl": e["mirrorPageUrl"]}
    return out


def activities(sb: Sandbox) -> list[dict[str, Any]]:
    return list(sb.d365.table("new_emailevents").rows.values())


def actual_activities(sb: Sandbox) -> dict[str, dict[str, Any]]:
    fields = ("subject", "new_eventtype", "regardingobjectid", "new_campaignname", "new_deliveryname",
              "new_eventdate", "new_trackingurl", "new_mirrorpageurl")
    return {a["new_eventid"]: {f: a.get(f) for f in fields} for a in activities(sb)}


def normalise_dates(d: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Dataverse may render a DateTime with or without fractions: compare to the second."""
    return {k: {**v, "new_eventdate": str(v["new_eventdate"])[:19]} for k, v in d.items()}


ALL = {"send", "open", "click", "bounce"}


@pytest.mark.timeout(900)
async def test_twenty_thousand_events_become_the_right_activities_without_duplicates(plane: ControlPlane) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=2_000, events=20_000, seed=21))
    try:
        prepare(sb, plane.data_dir)
        spec = egress_spec(sb)
        await start(plane, "events", spec)
        # kill -9 the worker mid-run: the event id is the activity's key, so no duplicates
        await converge(lambda: len(activities(sb)) >= 5_000 and bool(worker_processes(plane.data_dir)), 300,
                       "5,000 activities")
        with sb.faults.d365.holding():  # Dataverse holds every write until the kill: it comes mid-run
            os.kill(worker_processes(plane.data_dir)[0].pid, signal.SIGKILL)
        expected = normalise_dates(expected_activities(sb, ALL))
        await converge(lambda: len(activities(sb)) == len(expected), 600,
                       lambda: f"{len(activities(sb))} of {len(expected)} activities")
        assert normalise_dates(actual_activities(sb)) == expected
        ids = [a["new_eventid"] for a in activities(sb)]
        assert len(ids) == len(set(ids)), "duplicate activities"
        kinds = Counter(a["new_eventtype"] for a in activities(sb))
        assert kinds == Counter(v["new_eventtype"] for v in expected.values())
        assert set(kinds) == ALL  # a mix of every type arrived
        await verified(plane.stub, "events")  # every event is its activity
        soft = sum(1 for e in sb.acs.events.rows.values() if e["eventType"] == "bounce" and e["bounceType"] != "hard")
        assert soft > 0 and kinds["bounce"] == sum(1 for e in sb.acs.events.rows.values()
                                                    if e["eventType"] == "bounce") - soft

        # Switching opens off: new opens stop, the other types keep flowing.
        off = pb.WorkflowSpec()
        off.CopyFrom(spec)
        off.egress.open = False
        await restart_with(plane, "events", off, ["spec.egress"])
        before = len(activities(sb))
        sb.generate_events(2_000, seed=5)
        expected_after = expected_activities(sb, ALL - {"open"})
        opens_before = kinds["open"]
        written = {a["new_eventid"] for a in activities(sb)}
        new_wanted = len({k for k in expected_after if k not in written})
        await converge(lambda: len(activities(sb)) == before + new_wanted, 300,
                       lambda: f"{len(activities(sb)) - before} of {new_wanted} new activities")
        assert Counter(a["new_eventtype"] for a in activities(sb))["open"] == opens_before
        # the opens written before are not extra: the spec no longer writes opens, whatever is there stays
        await verified(plane.stub, "events")
    finally:
        await sb.stop()


async def test_an_event_before_its_contact_is_held_then_delivered_or_dead_lettered(plane: ControlPlane) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=10, seed=4))
    try:
        prepare(sb, plane.data_dir)
        late, never = str(uuid.uuid4()), str(uuid.uuid4())
        for i, contact in enumerate((late, never)):
            sb.acs.events.create({"eventId": f"evt-held-{i}", "eventType": "send", "externalId": contact,
                                  "campaignId": "OP0001", "campaignName": "c", "deliveryId": "DM000101",
                                  "deliveryName": "d", "date": "2026-11-28 10:00:00.000Z",
                                  "mirrorPageUrl": "https://m.example.com/x"}, created_by="campaign")
        sb.acs.events.create({"eventId": "evt-ok", "eventType": "send",
                              "externalId": next(iter(sb.d365.table("contacts").rows)), "campaignId": "OP0001",
                              "campaignName": "c", "deliveryId": "DM000101", "deliveryName": "d",
                              "date": "2026-11-28 10:00:00.000Z", "mirrorPageUrl": "https://m.example.com/y"},
                             created_by="campaign")
        await start(plane, "held", egress_spec(sb))
        await converge(lambda: {a["new_eventid"] for a in activities(sb)} == {"evt-ok"}, 60, "the deliverable event")

        async def held(n: int) -> bool:   # the worker's own report
            return [r["held"] for r in await plane.worker_reports("held")] == [n]

        await eventually(lambda: held(2), "the worker reporting its two held events", 30)
        # The contact arrives in the CRM later: its held event follows.
        sb.d365.table("contacts").upsert(late, lastname="Late", emailaddress1="late@example.com")
        await converge(lambda: {a["new_eventid"] for a in activities(sb)} == {"evt-ok", "evt-held-0"}, 60,
                       "the held event, once its contact exists")

        # The other never comes: after the bounded number of passes it is a dead letter, with the reason.
        def dead() -> list[dict[str, Any]]:
            return dead_letters(plane.data_dir, "held")

        await converge(lambda: len(dead()) == 1, 120, "the event whose contact never came, dead-lettered")
        letter = dead()[0]
        assert letter["key"] == "evt-held-1" and letter["status"] == 404
        assert "held for" in letter["error"] and never in letter["error"]
        assert {a["new_eventid"] for a in activities(sb)} == {"evt-ok", "evt-held-0"}
        await eventually(lambda: held(0), "the worker reporting nothing held any more", 30)
        resp = await verified(plane.stub, "held", {"events": (1, 0, 0)})  # exactly the dead-lettered event
        assert list(resp.streams[0].missing_keys) == ["evt-held-1"]
    finally:
        await sb.stop()


@pytest.mark.timeout(600)
async def test_with_two_workers_one_runs_the_feed_and_each_event_is_written_once(plane: ControlPlane) -> None:
    """``workers: 2`` for one event feed: worker 0 runs it, worker 1 stands by (embedded workers
    have an index; on Kubernetes the pods claim it: tests/k8s/test_claimed_runner_kubernetes.py)."""
    sb = await start_sandbox(seed=SeedSpec(contacts=200, events=1_000, seed=18))
    try:
        prepare(sb, plane.data_dir)
        spec = egress_spec(sb)
        spec.workers = 2
        await start(plane, "events2", spec)
        expected = expected_activities(sb, ALL)
        status = pb.WorkflowStatus()

        async def delivered() -> bool:
            nonlocal status
            status = await status_of(plane.stub, "events2")
            # Both workers ready as well: the feed may be delivered before worker 1 (the stand-by) is up.
            return (len(activities(sb)) == len(expected) and status.counters.written >= len(expected)
                    and status.ready_workers == 2 and status.phase == pb.PHASE_RUNNING)

        await eventually(delivered, lambda: f"{len(activities(sb))} of {len(expected)} activities; {status}", 300)
        assert status.counters.written == len(expected), status.counters  # once, not once per worker
        ids = [a["new_eventid"] for a in activities(sb)]
        assert len(ids) == len(set(ids)) == len(expected)
    finally:
        await sb.stop()
