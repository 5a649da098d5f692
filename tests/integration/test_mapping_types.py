"""Mapping rules by type, end to end against the sandbox (issue 12 faults 3, 4, 5; issue 11
fault 3): polymorphic lookups, the conversion table, typed comparisons, choice labels. The
engine runs in this process (inprocess.py); its HTTP to the sandbox is real, and what it asks
for is checked in the sandbox's request log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.worker.startcheck import StartCheckFailed
from syncplane_sandbox import AcsField, Sandbox, start_sandbox
from tests.integration.ingress_env import ingress_spec
from tests.integration.inprocess import InProcessIngress

ADA = "00000000-0000-4000-8000-0000000000e1"
BOB = "00000000-0000-4000-8000-0000000000e2"
TYPED = [AcsField("cusCreditLimit", "string", 64), AcsField("cusChildren", "string", 16),
         AcsField("cusNoEmail", "string", 16), AcsField("cusBirthDate", "date"), AcsField("cusContact", "string", 32),
         AcsField("cusContactCode", "int"), AcsField("cusAppointment", "date"), AcsField("cusLastUsed", "datetime"),
         AcsField("cusAnniversary", "date"), AcsField("cusParent", "string", 64), AcsField("cusOwner", "string", 64)]


@pytest.fixture
async def sb() -> AsyncIterator[Sandbox]:
    sandbox = await start_sandbox()
    for f in TYPED:
        sandbox.acs.profiles.add_field(f)
    try:
        yield sandbox
    finally:
        await sandbox.stop()


def spec_mapping(sb: Sandbox, extra: dict[str, str], *, technical: bool = False) -> pb.WorkflowSpec:
    spec = ingress_spec(sb)
    entity = spec.ingress.entities[0]
    entity.technical_picklist_values = technical
    for src, dst in extra.items():
        entity.fields.add(source=src, destination=dst)
    return spec


def profile(sb: Sandbox, key: str) -> dict[str, Any]:
    row = sb.acs.profiles.by_key(key)
    assert row is not None, f"no profile {key}"
    return row


async def run_passes(sb: Sandbox, spec: pb.WorkflowSpec, tmp_path: Path, n: int = 1) -> InProcessIngress:
    run = InProcessIngress(sb, spec, tmp_path)
    try:
        await run.passes(n)
    except BaseException:
        await run.aclose()
        raise
    return run


async def test_money_integer_boolean_dates_and_choices_convert_by_the_table(sb: Sandbox, tmp_path: Path) -> None:
    sb.d365.table("contacts").upsert(ADA, lastname="Ada", emailaddress1="ada@example.com", creditlimit=1234.5,
                                     numberofchildren=3, donotemail=True, birthdate="1990-05-02",
                                     preferredcontactmethodcode=2, new_appointmentat="2024-05-02T23:30:00",
                                     lastusedincampaign="2024-05-02T23:30:00+02:00")
    spec = spec_mapping(sb, {"creditlimit": "cusCreditLimit", "numberofchildren": "cusChildren",
                             "donotemail": "cusNoEmail", "birthdate": "cusBirthDate",
                             "preferredcontactmethodcode": "cusContact", "new_appointmentat": "cusAppointment",
                             "lastusedincampaign": "cusLastUsed"})
    run = await run_passes(sb, spec, tmp_path)
    try:
        p = profile(sb, ADA)
        assert (p["cusCreditLimit"], p["cusChildren"], p["cusNoEmail"]) == ("1234.5", "3", "true")
        assert p["cusBirthDate"] == "1990-05-02"          # DateOnly: the date as entered
        assert p["cusAppointment"] == "2024-05-02"        # TimeZoneIndependent: the wall time's date
        assert p["cusLastUsed"].startswith("2024-05-02 21:30:00")  # UserLocal: the instant
        assert p["cusContact"] == "Email"                 # technicalPicklistValues off: the label
        assert run.dead_letters() == []
        # The read asked for exactly the annotation the mapping needs.
        prefers = {(r.prefer or "") for r in sb.requests.records(server="d365")
                   if "contacts?" in r.path and "track-changes" in (r.prefer or "")}  # the sync's reads
        assert prefers and all('odata.include-annotations="OData.Community.Display.V1.FormattedValue"' in p
                               for p in prefers)
    finally:
        await run.aclose()


async def test_technical_choice_values_and_no_annotations_asked(sb: Sandbox, tmp_path: Path) -> None:
    sb.d365.table("contacts").upsert(ADA, lastname="Ada", emailaddress1="ada@example.com", preferredcontactmethodcode=2)
    run = await run_passes(sb, spec_mapping(sb, {"preferredcontactmethodcode": "cusContactCode"}, technical=True),
                           tmp_path)
    try:
        assert profile(sb, ADA)["cusContactCode"] == 2
        prefers = [(r.prefer or "") for r in sb.requests.records(server="d365") if "contacts?" in r.path]
        assert prefers and not any("include-annotations" in p for p in prefers)
    finally:
        await run.aclose()


async def test_customer_and_owner_lookups_are_read_as_their_values(sb: Sandbox, tmp_path: Path) -> None:
    account = sb.d365.table("accounts").upsert(name="Contoso")
    user = sb.d365.table("systemusers").upsert(fullname="Grace Hopper")
    contacts = sb.d365.table("contacts")
    contacts.upsert(ADA, lastname="Ada", emailaddress1="ada@example.com",
                    **{"parentcustomerid_account@odata.bind": f"/accounts({account})",
                       "ownerid@odata.bind": f"/systemusers({user})"})
    contacts.upsert(BOB, lastname="Bob", emailaddress1="bob@example.com",
                    **{"parentcustomerid_contact@odata.bind": f"/contacts({ADA})"})
    run = await run_passes(sb, spec_mapping(sb, {"parentcustomerid": "cusParent", "ownerid": "cusOwner"}), tmp_path)
    try:
        assert (profile(sb, ADA)["cusParent"], profile(sb, ADA)["cusOwner"]) == (account, user)
        assert profile(sb, BOB)["cusParent"] == ADA
        assert run.dead_letters() == []
    finally:
        await run.aclose()


async def test_a_polymorphic_link_follows_the_table_its_value_points_to(sb: Sandbox, tmp_path: Path) -> None:
    """A Customer lookup mapped to a link to profiles: a contact links, an account links to nothing
    (no profile holds accounts), and the read asks for the lookup's table annotation."""
    sb.acs.profiles.add_field(AcsField("cusParentProfile", "link", target="profile"))
    account = sb.d365.table("accounts").upsert(name="Contoso")
    contacts = sb.d365.table("contacts")
    contacts.upsert(ADA, lastname="Ada", emailaddress1="ada@example.com",
                    **{"parentcustomerid_account@odata.bind": f"/accounts({account})"})
    contacts.upsert(BOB, lastname="Bob", emailaddress1="bob@example.com",
                    **{"parentcustomerid_contact@odata.bind": f"/contacts({ADA})"})
    run = await run_passes(sb, spec_mapping(sb, {"parentcustomerid": "cusParentProfile"}), tmp_path, 2)
    try:
        assert profile(sb, BOB)["cusParentProfile"] == sb.acs.profiles.find(ADA)
        assert profile(sb, ADA)["cusParentProfile"] is None
        assert run.held_keys("contact") == set() and run.dead_letters() == []
        prefers = [(r.prefer or "") for r in sb.requests.records(server="d365")
                   if "contacts?" in r.path and "track-changes" in (r.prefer or "")]  # the sync's reads
        assert prefers and all("Microsoft.Dynamics.CRM.lookuplogicalname" in p for p in prefers)
    finally:
        await run.aclose()


@pytest.mark.parametrize(("mapping", "technical", "problem"), [
    ({"lastusedincampaign": "cusBirthDate"}, False, "time zone"),       # UserLocal -> date
    ({"anniversary": "cusAnniversary"}, False, "time zone"),             # UserLocal, Format DateOnly -> date
    ({"birthdate": "cusLastUsed"}, False, "no time of day"),             # DateOnly -> datetime
    ({"preferredcontactmethodcode": "cusContactCode"}, False, "technicalPicklistValues"),  # a label -> int
    ({"creditlimit": "cusContactCode"}, False, "fractions"),             # Money -> int
])
async def test_a_conversion_the_table_refuses_fails_the_start(sb: Sandbox, tmp_path: Path, mapping: dict[str, str],
                                                              technical: bool, problem: str) -> None:
    sb.d365.table("contacts").upsert(ADA, lastname="Ada", emailaddress1="ada@example.com")
    with pytest.raises(StartCheckFailed, match=problem) as caught:
        await run_passes(sb, spec_mapping(sb, mapping, technical=technical), tmp_path)
    assert caught.value.reason == "CONVERSION_NOT_SUPPORTED"
    assert caught.value.problems[0].path.startswith("spec.ingress.entities[0].fields[")
    assert sb.acs.profiles.by_key(ADA) is None  # nothing was written


@pytest.mark.parametrize(("field", "op", "value", "admitted"), [
    ("creditlimit", pb.FILTER_OPERATOR_EQUALS, "1234.50", {ADA}),        # Money 1234.5
    ("creditlimit", pb.FILTER_OPERATOR_GREATER_THAN, "999", {ADA}),      # not "1234.5" < "999" as text
    ("numberofchildren", pb.FILTER_OPERATOR_GREATER_THAN, "9", {BOB}),  # 12 > 9, though "12" < "9" as text
    ("donotemail", pb.FILTER_OPERATOR_EQUALS, "TRUE", {ADA}),
    ("preferredcontactmethodcode", pb.FILTER_OPERATOR_EQUALS, "email", {ADA}),  # a choice by its label
    ("preferredcontactmethodcode", pb.FILTER_OPERATOR_EQUALS, "3", {BOB}),
    ("birthdate", pb.FILTER_OPERATOR_GREATER_THAN, "1990-05-01", {ADA}),
    ("lastusedincampaign", pb.FILTER_OPERATOR_LESS_THAN, "2024-05-03T00:00:00+02:00", {ADA}),
    ("parentcustomerid", pb.FILTER_OPERATOR_EQUALS, ADA.upper(), {BOB}),
])
async def test_filters_compare_by_the_columns_type(sb: Sandbox, tmp_path: Path, field: str, op: int, value: str,
                                                   admitted: set[str]) -> None:
    contacts = sb.d365.table("contacts")
    contacts.upsert(ADA, lastname="Ada", emailaddress1="ada@example.com", creditlimit=1234.5, numberofchildren=3,
                    donotemail=True, preferredcontactmethodcode=2, birthdate="1990-05-02",
                    lastusedincampaign="2024-05-02T21:00:00Z")
    contacts.upsert(BOB, lastname="Bob", emailaddress1="bob@example.com", creditlimit=99.0, numberofchildren=12,
                    donotemail=False, preferredcontactmethodcode=3, birthdate="1980-01-01",
                    lastusedincampaign="2024-05-02T23:00:00Z",
                    **{"parentcustomerid_contact@odata.bind": f"/contacts({ADA})"})
    spec = ingress_spec(sb)
    spec.ingress.entities[0].filter.conditions.add(field=field, operator=op, value=value)
    run = await run_passes(sb, spec, tmp_path)
    try:
        assert {k for k in (ADA, BOB) if sb.acs.profiles.by_key(k) is not None} == admitted
    finally:
        await run.aclose()


async def test_replacements_match_by_type_and_a_bad_spec_value_fails_the_start(sb: Sandbox, tmp_path: Path) -> None:
    sb.d365.table("contacts").upsert(ADA, lastname="Ada", emailaddress1="ada@example.com", creditlimit=100.0,
                                     numberofchildren=0)
    spec = spec_mapping(sb, {"creditlimit": "cusCreditLimit", "numberofchildren": "cusChildren"})
    spec.ingress.entities[0].replacements.add(field="creditlimit", value="100", replacement="standard")
    spec.ingress.entities[0].replacements.add(field="numberofchildren", value="0.0", replacement="none")
    run = await run_passes(sb, spec, tmp_path)
    try:
        assert (profile(sb, ADA)["cusCreditLimit"], profile(sb, ADA)["cusChildren"]) == ("standard", "none")
    finally:
        await run.aclose()
    bad = spec_mapping(sb, {})
    bad.ingress.entities[0].filter.conditions.add(field="donotemail", operator=pb.FILTER_OPERATOR_EQUALS,
                                                  value="maybe")
    with pytest.raises(StartCheckFailed, match=r"filter\.conditions"):
        await run_passes(sb, bad, tmp_path / "bad")


async def test_a_refused_conversion_puts_the_workflow_in_error_with_its_reason(tmp_path: Path, sb: Sandbox) -> None:
    """Through the control plane and a real worker: the start fails with CONVERSION_NOT_SUPPORTED
    naming the mapping, and no record is dead-lettered."""
    from tests.embedded_plane import CRASH_TOLERANT, serve
    from tests.integration.ingress_env import prepare, status_until
    from tests.integration.test_ingress import start

    sb.d365.table("contacts").upsert(ADA, lastname="Ada", emailaddress1="ada@example.com",
                                     lastusedincampaign="2024-05-02T23:30:00Z")
    async for plane in serve(tmp_path, config=CRASH_TOLERANT):
        prepare(sb, plane.data_dir)
        await start(plane, "typed", spec_mapping(sb, {"lastusedincampaign": "cusBirthDate"}))
        status = await status_until(plane.stub, "typed", lambda s: s.phase == pb.PHASE_ERROR, 120)
        assert status.last_error.reason == "CONVERSION_NOT_SUPPORTED"
        assert "spec.ingress.entities[0].fields[4]" in status.last_error.message
        assert "time zone" in status.last_error.message
        assert status.counters.dead_lettered == 0 and sb.acs.profiles.by_key(ADA) is None
