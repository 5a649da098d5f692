"""The linked children of a parent the integration removes from the destination.

A contact with loyalty cards leaves Campaign: a filter with deleteExcluded now excludes it (read
by delta, or by the full re-read a new filter starts), or it is deleted at the source with
applyDeletes. Its cards must not stay linked to a profile that is gone: they are deleted at the
destination and held (DOMAIN.md: a child whose parent is not there is held), and when the contact
comes back (re-included, created again) they come back with it. Whatever Campaign itself does
with the cards of a deleted profile: keep them (its default) or delete them (the link's
"Behavior if deleted or duplicated"), both sandbox forms. `verify` agrees at every step: the held
cards are counted as held, not missing.

The worker's engine runs in this process (inprocess.py) for speed; the connectors speak real
HTTP to the sandbox, and verify is the real comparison over the same HTTP."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.service.verify import SqliteWorkerStateAccess
from syncplane.verify.run import verify
from syncplane_sandbox import Sandbox, start_sandbox
from tests.integration.ingress_env import ingress_spec
from tests.integration.inprocess import InProcessIngress, sandbox_secrets
from tests.integration.test_held_children import actual_cards

STAYS = "00000000-0000-4000-8000-0000000000a1"    # a contact that stays in Campaign
LEAVES = "00000000-0000-4000-8000-0000000000a2"   # the contact that leaves, then comes back
CARDS = {"00000000-0000-4000-8000-0000000000d1": STAYS, "00000000-0000-4000-8000-0000000000d2": LEAVES,
         "00000000-0000-4000-8000-0000000000d3": LEAVES}
LEAVING_CARDS = {card for card, contact in CARDS.items() if contact == LEAVES}
STREAM = "new_loyaltycard"


def spec_of(sb: Sandbox, filtered: bool) -> pb.WorkflowSpec:
    """Contacts (applyDeletes) and cards; ``filtered``: active contacts only, the excluded deleted."""
    spec = ingress_spec(sb, cards=True, batch_size=50)
    if filtered:
        contacts = spec.ingress.entities[0]
        contacts.filter.conditions.add(field="statecode", operator=pb.FILTER_OPERATOR_EQUALS, value="0")
        contacts.filter.delete_excluded = True
    return spec


def expected_cards(sb: Sandbox) -> dict[str, dict[str, Any]]:
    """The cards Campaign must hold (as ``actual_cards`` reads them): those whose contact has a
    profile, linked to it."""
    out = {}
    for rid, row in sb.d365.table("new_loyaltycards").rows.items():
        profile = sb.acs.profiles.find(row["new_contactid"])
        if profile is not None:
            out[rid] = {"points": row.get("new_points"), "cardNumber": row.get("new_cardnumber"), "profile": profile}
    return out


def leave_by_filter(sb: Sandbox) -> None:
    sb.d365.table("contacts").upsert(LEAVES, statecode=1)


def leave_by_filter_change(sb: Sandbox) -> None:
    """Made inactive while no filter runs: the new filter's full re-read is what excludes it."""
    sb.d365.table("contacts").upsert(LEAVES, statecode=1)


def come_back_by_filter(sb: Sandbox) -> None:
    sb.d365.table("contacts").upsert(LEAVES, statecode=0)


def leave_by_delete(sb: Sandbox) -> None:
    sb.d365.table("contacts").delete(LEAVES)


def come_back_by_create(sb: Sandbox) -> None:
    sb.d365.table("contacts").upsert(LEAVES, firstname="Lea", lastname="Ves", emailaddress1="back@example.com",
                                     statecode=0)


Step = Callable[[Sandbox], None]
# way the contact leaves → (spec before, spec after it left, the source edit, the edit that brings it back)
WAYS: dict[str, tuple[bool, bool, Step, Step]] = {
    "a filter excludes it (delta read)": (True, True, leave_by_filter, come_back_by_filter),
    "a new filter excludes it (full re-read)": (False, True, leave_by_filter_change, come_back_by_filter),
    "deleted at the source": (True, True, leave_by_delete, come_back_by_create),
}


async def verify_counts(sb: Sandbox, spec: pb.WorkflowSpec, state_db: Path) -> dict[str, tuple[int, ...]]:
    """stream → (missing, extra, different, held), by the real comparison."""
    report = await verify("wf", spec, sandbox_secrets(sb), SqliteWorkerStateAccess(state_db), running=False)
    return {s.stream: (len(s.diff.missing), len(s.diff.extra), len(s.diff.different), s.diff.held)
            for s in report.streams}


async def settled(run: InProcessIngress, check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Passes until ``check`` holds (at most 10: a pass is the unit of progress, not time)."""
    for _ in range(10):
        await run.passes(1)
        result = check()
        if result if isinstance(result, bool) else await result:
            return
    raise AssertionError(f"not settled after 10 passes: {what}")


@pytest.mark.parametrize("link_delete", ["keep", "cascade"])
@pytest.mark.parametrize("way", list(WAYS))
async def test_children_of_a_removed_parent_are_held_and_come_back(way: str, link_delete: str,
                                                                     tmp_path: Path) -> None:
    before, after, leave, come_back = WAYS[way]
    sb = await start_sandbox()
    runs: list[InProcessIngress] = []
    try:
        sb.acs.set_link_delete(link_delete)
        contacts, cards = sb.d365.table("contacts"), sb.d365.table("new_loyaltycards")
        for contact, name in ((STAYS, "Sta"), (LEAVES, "Lea")):
            contacts.upsert(contact, firstname=name, lastname="Ys", emailaddress1=f"{name}@example.com", statecode=0)
        for i, (card, contact) in enumerate(CARDS.items()):
            cards.upsert(card, new_cardnumber=f"K{i}", new_points=10 * i,
                         **{"new_contactid@odata.bind": f"/contacts({contact})"})
        run = InProcessIngress(sb, spec_of(sb, before), tmp_path)
        runs.append(run)
        await settled(run, lambda: len(actual_cards(sb)) == 3 and actual_cards(sb) == expected_cards(sb),
                      "the first load")

        leave(sb)
        if after != before:  # a new filter: the workers restart with it and re-read the contacts
            await runs.pop().aclose()
            run = InProcessIngress(sb, spec_of(sb, after), tmp_path)
            runs.append(run)
        await settled(run, lambda: sb.acs.profiles.find(LEAVES) is None and set(actual_cards(sb)) == set(CARDS)
                      - LEAVING_CARDS, "the contact removed, its cards with it")
        await run.passes(2)  # and it stays so: nothing re-sends a card while its contact is away
        got = actual_cards(sb)
        assert set(got) == set(CARDS) - LEAVING_CARDS and all(c["profile"] is not None for c in got.values())
        assert run.held_keys(STREAM) == LEAVING_CARDS and run.report.held == len(LEAVING_CARDS)
        assert run.dead_letters() == []
        spec = spec_of(sb, after)
        assert await verify_counts(sb, spec, tmp_path / "worker-state.db") == {
            "contact": (0, 0, 0, 0), STREAM: (0, 0, 0, len(LEAVING_CARDS))}, "held cards are expected absent"

        come_back(sb)
        await settled(run, lambda: set(actual_cards(sb)) == set(CARDS), "the contact back, its cards with it")
        back = sb.acs.profiles.find(LEAVES)
        assert back is not None and {k: c["profile"] for k, c in actual_cards(sb).items() if k in LEAVING_CARDS} \
            == dict.fromkeys(LEAVING_CARDS, back)
        assert actual_cards(sb) == expected_cards(sb)
        assert run.held_keys(STREAM) == set() and run.report.held == 0 and run.dead_letters() == []
        assert await verify_counts(sb, spec, tmp_path / "worker-state.db") == {
            "contact": (0, 0, 0, 0), STREAM: (0, 0, 0, 0)}
    finally:
        for r in runs:
            await r.aclose()
        await sb.stop()
