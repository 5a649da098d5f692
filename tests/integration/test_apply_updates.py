"""applyUpdates: false (issue 12, fault 2): the field is written when the destination record is
created, and on a replay, and never overwritten otherwise. Whether a record is new is decided at
the destination, by key, not by how the record was read (first load, delta, a full re-read after
an expired delta token or a filter change).

A table of variants: each way a record can be read, against a destination record that exists or
not. The engine runs in this process (inprocess.py); HTTP to the sandbox is real."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane_sandbox import Sandbox
from tests.integration.ingress_env import ingress_spec
from tests.integration.inprocess import InProcessIngress
from tests.integration.sandbox_fixtures import running_sandbox

OLD = "00000000-0000-4000-8000-0000000000d1"   # synced by the first load
NEW = "00000000-0000-4000-8000-0000000000d2"   # created in Dynamics after the first load


def spec_with(sb: Sandbox, *, replay: str = "", filtered: bool = False) -> pb.WorkflowSpec:
    spec = ingress_spec(sb)
    entity = spec.ingress.entities[0]
    for m in entity.fields:
        if m.destination == "lastName":
            m.apply_updates = False
    if filtered:
        entity.filter.conditions.add(field="statecode", operator=pb.FILTER_OPERATOR_EQUALS, value="0")
    if replay:
        spec.ingress.replay.source_table = "contact"
        spec.ingress.replay.request_id = replay
    return spec


@pytest.fixture
async def sb() -> AsyncIterator[Sandbox]:
    async with running_sandbox() as sandbox:
        yield sandbox


def last_name(sb: Sandbox, key: str) -> object:
    row = sb.acs.profiles.by_key(key)
    return None if row is None else row.get("lastName")


async def first_load(sb: Sandbox, tmp_path: Path) -> InProcessIngress:
    sb.d365.table("contacts").upsert(OLD, firstname="Ada", lastname="Before", emailaddress1="old@example.com",
                                     statecode=0)
    run = InProcessIngress(sb, spec_with(sb), tmp_path)
    await run.passes(1)
    assert last_name(sb, OLD) == "Before"
    return run


async def test_a_record_created_after_the_first_load_gets_the_field(sb: Sandbox, tmp_path: Path) -> None:
    run = await first_load(sb, tmp_path)
    try:
        sb.d365.table("contacts").upsert(NEW, firstname="Bob", lastname="Fresh", emailaddress1="new@example.com")
        await run.passes(1)  # a delta read: the profile does not exist yet, so it is created whole
        assert last_name(sb, NEW) == "Fresh"
    finally:
        await run.aclose()


@pytest.mark.parametrize("how", ["delta", "expired delta token", "filter change"])
async def test_an_existing_record_is_never_overwritten(sb: Sandbox, tmp_path: Path, how: str) -> None:
    run = await first_load(sb, tmp_path)
    try:
        sb.d365.table("contacts").upsert(OLD, lastname="After", firstname="Ada B.")
        if how == "expired delta token":
            sb.expire_delta_tokens()
        if how == "filter change":  # a restart with another filter: the table is read again in full
            await run.aclose()
            run = InProcessIngress(sb, spec_with(sb, filtered=True), tmp_path)
        await run.passes(2)
        row = sb.acs.profiles.by_key(OLD)
        assert row is not None and row["firstName"] == "Ada B."  # the other fields are updated
        assert last_name(sb, OLD) == "Before"
    finally:
        await run.aclose()


async def test_a_replay_writes_the_field(sb: Sandbox, tmp_path: Path) -> None:
    run = await first_load(sb, tmp_path)
    try:
        sb.d365.table("contacts").upsert(OLD, lastname="After")
        await run.passes(1)
        assert last_name(sb, OLD) == "Before"
        await run.aclose()
        run = InProcessIngress(sb, spec_with(sb, replay="r1"), tmp_path)
        await run.passes(1)
        assert last_name(sb, OLD) == "After"
        # Once: the next change is a delta again, and does not overwrite.
        sb.d365.table("contacts").upsert(OLD, lastname="Later")
        await run.passes(1)
        assert last_name(sb, OLD) == "After"
    finally:
        await run.aclose()


async def test_a_held_copy_re_sent_later_keeps_the_existing_records_field(sb: Sandbox, tmp_path: Path) -> None:
    """A card's tier is create-only. The card exists in Campaign; it is re-pointed to a contact not
    in Campaign yet (held) with another tier; when that contact arrives the held copy is written,
    and the existing card keeps its tier."""
    contacts, cards = sb.d365.table("contacts"), sb.d365.table("new_loyaltycards")
    contacts.upsert(OLD, lastname="Old", emailaddress1="old@example.com", statecode=0)
    contacts.upsert(NEW, lastname="New", statecode=0)  # no email: filtered out, so not in Campaign
    card = cards.upsert(None, new_cardnumber="K1", new_tier="gold", new_points=1,
                        **{"new_contactid@odata.bind": f"/contacts({OLD})"})
    spec = ingress_spec(sb, cards=True)
    spec.ingress.entities[0].filter.conditions.add(field="emailaddress1", operator=pb.FILTER_OPERATOR_IS_NOT_NULL)
    for m in spec.ingress.entities[1].fields:
        if m.destination == "tier":
            m.apply_updates = False
    run = InProcessIngress(sb, spec, tmp_path)
    try:
        await run.passes(1)
        cards.upsert(card, new_tier="platinum", new_points=2, **{"new_contactid@odata.bind": f"/contacts({NEW})"})
        await run.passes(1)
        assert run.held_keys("new_loyaltycard") == {card}
        contacts.upsert(NEW, emailaddress1="new@example.com")
        await run.passes(2)
        row = sb.acs.resource("cusLoyaltyCard").by_key(card)
        assert row is not None and row["points"] == 2 and row["profile"] == sb.acs.profiles.find(NEW)
        assert row["tier"] == "gold"
    finally:
        await run.aclose()


async def test_a_dead_letter_retried_later_keeps_the_existing_records_field(sb: Sandbox, tmp_path: Path) -> None:
    """An update Campaign rejects becomes a dead letter; retried once fixed, it updates the other
    fields and leaves the create-only one as the record was created."""
    run = await first_load(sb, tmp_path)
    try:
        sb.acs.poison_keys("profile", OLD)
        sb.d365.table("contacts").upsert(OLD, lastname="After", firstname="Ada B.")
        await run.passes(1)
        (letter,) = run.dead_letters()
        assert letter["key"] == OLD
        sb.acs.clear_poison()
        run.state.mark_for_retry(run.workflow)
        await run.passes(1)
        row = sb.acs.profiles.by_key(OLD)
        assert row is not None and row["firstName"] == "Ada B." and row["lastName"] == "Before"
        assert run.dead_letters() == []
    finally:
        await run.aclose()
