"""Held children (issue 12, fault 1): a held record is superseded by any newer event for the
same key. A loyalty card whose contact is not in Campaign yet is held; while it is held the
card may be updated, re-pointed, deleted, and its contact may arrive. Whatever the
interleaving, once the passes settle the destination equals the mapped source, and the held
count is the number of cards still waiting for their contact.

The worker's engine runs in this process (inprocess.py) so that Hypothesis can try many
interleavings; the connectors speak real HTTP to the sandbox."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.state.records import HoldPolicy
from syncplane_sandbox import Sandbox, start_sandbox
from tests.integration.ingress_env import ingress_spec
from tests.integration.inprocess import InProcessIngress, run_example
from tests.integration.sandbox_fixtures import running_sandbox

WAITING = "00000000-0000-4000-8000-00000000000a"   # a contact without an email: filtered out, so not in Campaign
SYNCED = "00000000-0000-4000-8000-00000000000b"    # a contact that is in Campaign
CARDS = [f"00000000-0000-4000-8000-0000000000c{i}" for i in range(2)]
STREAM = "new_loyaltycard"


def held_spec(sandbox: Sandbox) -> pb.WorkflowSpec:
    """Contacts with an email only (so a contact without one is not in Campaign), and cards."""
    spec = ingress_spec(sandbox, cards=True, batch_size=50)
    contacts = spec.ingress.entities[0]
    contacts.filter.conditions.add(field="emailaddress1", operator=pb.FILTER_OPERATOR_IS_NOT_NULL)
    return spec


def expected_cards(sb: Sandbox) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """(cards Campaign must hold: crmId → fields, cards that must be held)."""
    contacts = sb.d365.table("contacts")
    synced = {rid for rid, row in contacts.rows.items() if row.get("emailaddress1")}
    out: dict[str, dict[str, Any]] = {}
    waiting: set[str] = set()
    for rid, row in sb.d365.table("new_loyaltycards").rows.items():
        if row.get("new_contactid") in synced:
            out[rid] = {"points": row.get("new_points"), "cardNumber": row.get("new_cardnumber"),
                        "profile": sb.acs.profiles.find(row["new_contactid"])}
        else:
            waiting.add(rid)
    return out, waiting


def actual_cards(sb: Sandbox) -> dict[str, dict[str, Any]]:
    return {str(r["crmId"]): {"points": r.get("points"), "cardNumber": r.get("cardNumber"),
                              "profile": r.get("profile")}
            for r in sb.acs.resource("cusLoyaltyCard").rows.values()}


card = st.sampled_from(range(len(CARDS)))
parent = st.sampled_from([WAITING, WAITING, SYNCED])  # mostly the waiting one: holds are the point
ops = st.lists(st.one_of(
    st.tuples(st.just("create"), card, parent, st.integers(0, 1000)),
    st.tuples(st.just("update"), card, st.integers(0, 1000)),
    st.tuples(st.just("repoint"), card, parent),
    st.tuples(st.just("delete"), card),
    st.tuples(st.just("arrive"),),
    st.tuples(st.just("pass"),),
    st.tuples(st.just("pass"),),
), min_size=1, max_size=16)


def apply(sb: Sandbox, op: tuple[Any, ...]) -> bool:
    """Apply one source edit; True when it was a sync pass instead."""
    cards = sb.d365.table("new_loyaltycards")
    kind = op[0]
    if kind == "pass":
        return True
    if kind == "arrive":
        sb.d365.table("contacts").upsert(WAITING, emailaddress1="waiting@example.com")
    elif kind == "create" and CARDS[op[1]] not in cards.rows:
        cards.upsert(CARDS[op[1]], new_cardnumber=f"K{op[1]}", new_points=op[3],
                     **{"new_contactid@odata.bind": f"/contacts({op[2]})"})
    elif kind == "update" and CARDS[op[1]] in cards.rows:
        cards.upsert(CARDS[op[1]], new_points=op[2])
    elif kind == "repoint" and CARDS[op[1]] in cards.rows:
        cards.upsert(CARDS[op[1]], **{"new_contactid@odata.bind": f"/contacts({op[2]})"})
    elif kind == "delete" and CARDS[op[1]] in cards.rows:
        cards.delete(CARDS[op[1]])
    return False


async def scenario(steps: list[tuple[Any, ...]], state_dir: Path) -> None:
    async with running_sandbox() as sb:
        contacts = sb.d365.table("contacts")
        contacts.upsert(WAITING, firstname="Wait", lastname="Ing")
        contacts.upsert(SYNCED, firstname="Syn", lastname="Ced", emailaddress1="synced@example.com")
        async with aclosing(InProcessIngress(sb, held_spec(sb), state_dir)) as run:
            await run.passes(1)
            for step in steps:
                if apply(sb, step):
                    await run.passes(1)
            await run.passes(3)  # quiescence: two passes with nothing new, and one to re-send what was held
            want, waiting = expected_cards(sb)
            got = actual_cards(sb)
            # Cards waiting for their contact are held, and counted; every other card is exactly the source.
            assert run.held_keys(STREAM) == waiting
            assert run.report.held == len(waiting)
            assert {k: v for k, v in got.items() if k not in waiting} == want
            # The contact arrives (again: an edit): every held card is written, none is left held, and
            # no card deleted or re-pointed meanwhile comes back.
            sb.d365.table("contacts").upsert(WAITING, emailaddress1="waiting@example.com")
            await run.passes(3)
            want, waiting = expected_cards(sb)
            assert not waiting
            assert actual_cards(sb) == want
            assert run.held_keys(STREAM) == set()
            assert run.report.held == 0
            assert run.dead_letters() == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_a_held_card_is_superseded_by_any_newer_event_for_its_key(steps: list[tuple[Any, ...]]) -> None:
    run_example(lambda state_dir: scenario(steps, state_dir))


def test_the_issue_example_deleted_and_repointed_cards_while_held() -> None:
    """K1 and K2 held (their contact has no email); K1 deleted, K2 re-pointed to a synced contact
    with new values; then the first contact gets an email."""
    steps: list[tuple[Any, ...]] = [("create", 0, WAITING, 10), ("create", 1, WAITING, 20), ("pass",),
                                    ("delete", 0), ("repoint", 1, SYNCED), ("update", 1, 99), ("pass",),
                                    ("arrive",), ("pass",)]
    run_example(lambda state_dir: scenario(steps, state_dir))


async def test_the_issue_example_through_a_real_worker(tmp_path: Path) -> None:
    """The same example through the control plane and a worker process: the worker's own held
    count follows, K1 is not resurrected, K2 keeps its new values, and verify finds 0 differences."""
    from tests.backends import eventually
    from tests.embedded_plane import CRASH_TOLERANT, ControlPlane, serve
    from tests.integration.ingress_env import converge, prepare, status_until
    from tests.integration.test_ingress import start
    from tests.integration.verify_env import verified

    sb = await start_sandbox()
    try:
        contacts, cards = sb.d365.table("contacts"), sb.d365.table("new_loyaltycards")
        contacts.upsert(WAITING, firstname="Wait", lastname="Ing")
        contacts.upsert(SYNCED, firstname="Syn", lastname="Ced", emailaddress1="synced@example.com")
        k1, k2, probe = CARDS[0], CARDS[1], "00000000-0000-4000-8000-0000000000cf"
        for key, points in ((k1, 10), (k2, 20)):
            cards.upsert(key, new_cardnumber=key[-4:], new_points=points,
                         **{"new_contactid@odata.bind": f"/contacts({WAITING})"})
        async for plane in serve(tmp_path, config=CRASH_TOLERANT):
            prepare(sb, plane.data_dir)
            await start(plane, "held", held_spec(sb))
            await status_until(plane.stub, "held", lambda st: st.phase == pb.PHASE_RUNNING, 60)

            async def held(n: int, plane: ControlPlane = plane) -> bool:
                return [r["held"] for r in await plane.worker_reports("held")] == [n]

            await eventually(lambda: held(2), "the worker holding K1 and K2", 60)
            cards.delete(k1)
            cards.upsert(k2, new_points=99, **{"new_contactid@odata.bind": f"/contacts({SYNCED})"})
            await converge(lambda: actual_cards(sb).get(k2, {}).get("points") == 99, 60, "K2's new values")
            await eventually(lambda: held(0), "K1 and K2 no longer held", 60)
            # The contact arrives; a probe card on it tells when the cards after it were written.
            cards.upsert(probe, new_cardnumber="PRB", new_points=1,
                         **{"new_contactid@odata.bind": f"/contacts({WAITING})"})
            contacts.upsert(WAITING, emailaddress1="waiting@example.com")
            await converge(lambda: probe in actual_cards(sb), 60, "the probe card, after its contact")
            want, waiting = expected_cards(sb)
            assert not waiting and actual_cards(sb) == want and k1 not in want
            await verified(plane.stub, "held")
    finally:
        await sb.stop()


def _asked_about(sb: Sandbox, key: str, since: int) -> int:
    """Campaign requests since request ``since`` naming ``key`` (a link's lookup of the parent, a card's own)."""
    return sum(key in r.path for r in sb.requests.records(since=since, server="acs"))


@pytest.mark.parametrize("held_by", ["arrival", "removal"])
async def test_a_held_child_is_sent_once_when_its_parent_lands_not_every_pass(tmp_path: Path, held_by: str) -> None:
    """Brief s7-bugs 3: held loyalty cards were sent again every pass while their contact was away (a Campaign
    request each, forever: ingress holds have no attempt limit). Held on ``arrival`` (the contact never in
    Campaign) or on ``removal`` (its profile removed by deleteExcluded, worker/children.py): while the contact
    stays away, pass after pass (each marked by a probe card that lands), Campaign is not asked about it again;
    once it lands, each card is sent once, and Campaign holds every card once."""
    from tests.backends import eventually
    from tests.embedded_plane import CRASH_TOLERANT, ControlPlane, serve
    from tests.integration.ingress_env import converge, prepare, status_until
    from tests.integration.test_ingress import start

    sb = await start_sandbox()
    try:
        contacts, cards = sb.d365.table("contacts"), sb.d365.table("new_loyaltycards")
        email = {"emailaddress1": "waiting@example.com"} if held_by == "removal" else {}
        contacts.upsert(WAITING, firstname="Wait", lastname="Ing", **email)
        contacts.upsert(SYNCED, firstname="Syn", lastname="Ced", emailaddress1="synced@example.com")
        for key, points in ((CARDS[0], 10), (CARDS[1], 20)):
            cards.upsert(key, new_cardnumber=key[-4:], new_points=points,
                         **{"new_contactid@odata.bind": f"/contacts({WAITING})"})
        spec = held_spec(sb)
        spec.ingress.entities[0].filter.delete_excluded = True
        async for plane in serve(tmp_path, config=CRASH_TOLERANT):
            prepare(sb, plane.data_dir)
            await start(plane, "held", spec)
            await status_until(plane.stub, "held", lambda st: st.phase == pb.PHASE_RUNNING, 60)

            async def held(n: int, plane: ControlPlane = plane) -> bool:
                return [r["held"] for r in await plane.worker_reports("held")] == [n]

            if held_by == "removal":
                await converge(lambda: set(actual_cards(sb)) == set(CARDS), 60, "the cards with their contact")
                contacts.upsert(WAITING, emailaddress1=None)   # filtered out now: its profile goes, the cards held
            await eventually(lambda: held(2), "the worker holding both cards", 60)
            since = sb.requests.records(server="acs")[-1].seq
            for i in range(3):   # passes, each seen to end by a probe card of a contact that is there
                probe = f"00000000-0000-4000-8000-0000000000d{i}"
                cards.upsert(probe, new_cardnumber=f"P{i}", new_points=i,
                             **{"new_contactid@odata.bind": f"/contacts({SYNCED})"})

                def landed_probe(probe: str = probe) -> bool:
                    return probe in actual_cards(sb)

                await converge(landed_probe, 60, f"probe card {i}")
            away = {key: _asked_about(sb, key, since) for key in (WAITING, *CARDS)}
            assert away == dict.fromkeys((WAITING, *CARDS), 0), f"asked while the contact was away: {away}"

            landed = sb.requests.records(server="acs")[-1].seq
            contacts.upsert(WAITING, emailaddress1="back@example.com")
            await converge(lambda: {k for k in CARDS if k in actual_cards(sb)} == set(CARDS), 60, "the cards, sent")
            await eventually(lambda: held(0), "nothing held", 60)
            assert [_asked_about(sb, key, landed) for key in CARDS] == [1, 1], "each card sent once"
            rows = [str(r["crmId"]) for r in sb.acs.resource("cusLoyaltyCard").rows.values()]
            assert sorted(rows) == sorted(set(rows)) and set(CARDS) <= set(rows)   # once each, none lost
            assert {k: actual_cards(sb)[k]["points"] for k in CARDS} == {CARDS[0]: 10, CARDS[1]: 20}
    finally:
        await sb.stop()


async def test_a_held_child_is_sent_when_its_parent_lands_by_a_route_the_signal_cannot_see(tmp_path: Path) -> None:
    """A held card waits for its contact's landed signal (the profiles this workflow writes), and for the hold
    policy's ``recheck_seconds`` (0 here) besides: a profile made in Campaign by another route (another
    workflow, a marketer, an import) changes no signal of this workflow's, and the card must still land, once,
    and leave the held set. Red when the signal was the only trigger: the card stayed held for good."""
    async with running_sandbox() as sb:
        sb.d365.table("contacts").upsert(WAITING, firstname="Wait", lastname="Ing")   # no email: not this workflow's
        sb.d365.table("contacts").upsert(SYNCED, firstname="Syn", lastname="Ced", emailaddress1="synced@example.com")
        sb.d365.table("new_loyaltycards").upsert(CARDS[0], new_cardnumber="K0", new_points=7,
                                                 **{"new_contactid@odata.bind": f"/contacts({WAITING})"})
        async with aclosing(InProcessIngress(sb, held_spec(sb), tmp_path)) as run:
            run.runner.hold_policy = HoldPolicy(max_attempts=None, recheck_seconds=0.0)
            await run.passes(2)
            assert run.held_keys(STREAM) == {CARDS[0]}
            sb.acs.profiles.add(externalId=WAITING, email="elsewhere@example.com", lastName="Made elsewhere")
            await run.passes(2)
            want, _ = expected_cards_of_profiles(sb)
            assert run.held_keys(STREAM) == set()
            assert run.report.held == 0
            assert actual_cards(sb) == want
            assert run.dead_letters() == []


def expected_cards_of_profiles(sb: Sandbox) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """As :func:`expected_cards`, with the contacts whose profile is in Campaign however it got there."""
    out: dict[str, dict[str, Any]] = {}
    waiting: set[str] = set()
    for rid, row in sb.d365.table("new_loyaltycards").rows.items():
        profile = sb.acs.profiles.find(row.get("new_contactid"))
        if profile is None:
            waiting.add(rid)
        else:
            out[rid] = {"points": row.get("new_points"), "cardNumber": row.get("new_cardnumber"), "profile": profile}
    return out, waiting
