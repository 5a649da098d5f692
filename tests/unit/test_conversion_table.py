"""The conversion table (issue 12, fault 4): every Dataverse attribute type x Campaign field
type cell is either a documented conversion whose output the Campaign field accepts, or a
start-time problem with a reason. The values' acceptance is judged by the sandbox's Campaign
field validation (the witness of what Campaign takes), not by our own code."""

from __future__ import annotations

import uuid
from datetime import UTC
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.ingress.conversion import DESTINATION_TYPES, NotConvertible, SourceType, converter
from syncplane_sandbox import AcsField, AcsState, SandboxClock

ROWS = [SourceType(t) for t in ("String", "Memo", "EntityName", "Boolean", "Integer", "BigInt", "Decimal",
                                "Money", "Double", "Picklist", "State", "Status", "Uniqueidentifier", "Lookup",
                                "Customer", "Owner", "PartyList", "Virtual")] + \
    [SourceType("DateTime", b) for b in ("UserLocal", "DateOnly", "TimeZoneIndependent")]

# The documented cells (server/syncplane/ingress/README.md, "The conversion table"; the document itself is
# checked against the code in test_ingress_rules_doc.py): (row, destination) that convert; all others are
# start-time problems. "string" takes every readable type (DOMAIN.md: anything else is a string).
READABLE = {r.row for r in ROWS} - {"PartyList", "Virtual"}
CONVERTS = {(row, "string") for row in READABLE} | {
    ("Boolean", "boolean"),
    *((t, "int") for t in ("Integer", "BigInt", "Picklist", "State", "Status")),
    *((t, "double") for t in ("Integer", "BigInt", "Decimal", "Money", "Double")),
    ("DateTime (UserLocal)", "datetime"), ("DateTime (TimeZoneIndependent)", "datetime"),
    ("DateTime (DateOnly)", "date"), ("DateTime (TimeZoneIndependent)", "date"),
    *((t, "link") for t in ("Lookup", "Customer", "Owner")),
}

moments = st.datetimes(min_value=__import__("datetime").datetime(1900, 1, 1),
                       max_value=__import__("datetime").datetime(2100, 1, 1))
WIRE: dict[str, st.SearchStrategy[Any]] = {
    "String": st.text(max_size=40), "Memo": st.text(max_size=40), "EntityName": st.sampled_from(["contact", "account"]),
    "Boolean": st.booleans(), "Integer": st.integers(-(2**31), 2**31 - 1), "BigInt": st.integers(-(2**63), 2**63 - 1),
    "Decimal": st.decimals(min_value=-10**9, max_value=10**9, places=4).map(float),
    "Money": st.decimals(min_value=-10**9, max_value=10**9, places=2).map(float),
    "Double": st.floats(allow_nan=False, allow_infinity=False, width=64),
    "Picklist": st.integers(0, 10**6), "State": st.integers(0, 5), "Status": st.integers(0, 10**6),
    "Uniqueidentifier": st.uuids().map(str), "Lookup": st.uuids().map(str), "Customer": st.uuids().map(str),
    "Owner": st.uuids().map(str), "PartyList": st.just([]), "Virtual": st.just(None),
    "DateTime (UserLocal)": moments.map(lambda m: m.strftime("%Y-%m-%dT%H:%M:%SZ")),
    "DateTime (DateOnly)": moments.map(lambda m: m.date().isoformat()),
    "DateTime (TimeZoneIndependent)": moments.map(lambda m: m.strftime("%Y-%m-%dT%H:%M:%SZ")),
}


def campaign_accepts(destination: str, value: Any) -> Any:
    """What the sandbox's Campaign stores for the value in a field of that type (400 raises)."""
    state = AcsState(SandboxClock(), "ORG")
    fields = [AcsField("crmId", "string", 100)] + [AcsField(f"f_{t}", t) for t in DESTINATION_TYPES if t != "link"]
    resource = state.add_custom_resource("cusTypes", fields, key_field="crmId")
    return resource.validate({f"f_{destination}": value})[f"f_{destination}"]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.row)
@pytest.mark.parametrize("destination", DESTINATION_TYPES)
def test_each_cell_is_documented(row: SourceType, destination: str) -> None:
    documented = (row.row, destination) in CONVERTS
    try:
        converter(row, destination)
    except NotConvertible as exc:
        assert not documented, f"{row.row} -> {destination} should convert"
        assert str(exc), "a start-time problem says why"
        return
    assert documented, f"{row.row} -> {destination} converts but the table says it is a start-time problem"


@settings(max_examples=600, deadline=None)
@given(data=st.data(), cell=st.sampled_from(sorted(CONVERTS)))
def test_every_conversion_is_accepted_by_its_campaign_field(data: st.DataObject, cell: tuple[str, str]) -> None:
    row_name, destination = cell
    row = next(r for r in ROWS if r.row == row_name)
    wire = data.draw(WIRE[row_name])
    out = converter(row, destination)(wire)
    if destination == "link":
        assert str(uuid.UUID(out)) == wire  # the sink resolves the parent's PKey by this key
        return
    stored = campaign_accepts(destination, out)
    # What each conversion means, checked against the wire value:
    if destination == "string":
        assert isinstance(out, str)
        if row_name in ("Integer", "BigInt", "Picklist", "State", "Status"):
            assert int(out) == wire
        if row_name in ("Decimal", "Money", "Double"):
            assert Decimal(out) == Decimal(str(wire))
        if row_name == "Boolean":
            assert out == ("true" if wire else "false")
        if row_name == "DateTime (DateOnly)":
            assert out == wire
        if row_name == "DateTime (TimeZoneIndependent)":
            assert out == wire[:19]  # the wall time, no zone claimed
    if destination == "date":
        assert stored == wire[:10]  # the calendar date as entered: no shift by a zone
    if destination == "datetime" and row_name == "DateTime (UserLocal)":
        from syncplane_sandbox.acs_state import parse_acs_time
        from syncplane_sandbox.d365_state import parse_datetime
        assert parse_acs_time(stored) == parse_datetime(wire).astimezone(UTC).timestamp()


def test_the_issue_examples() -> None:
    """Money, Integer and Boolean to a Campaign string are strings; a UserLocal date-time to a
    Campaign date is refused at start (it would be a day early east of UTC)."""
    assert converter(SourceType("Money"), "string")(1234.5) == "1234.5"
    assert converter(SourceType("Integer"), "string")(3) == "3"
    assert converter(SourceType("Boolean"), "string")(True) == "true"
    with pytest.raises(NotConvertible, match="time zone"):
        converter(SourceType("DateTime", "UserLocal"), "date")
    assert converter(SourceType("DateTime", "DateOnly"), "date")("2024-05-02") == "2024-05-02"
    assert converter(SourceType("Picklist"), "string", label=True)("Email") == "Email"
    with pytest.raises(NotConvertible, match="technicalPicklistValues"):
        converter(SourceType("Picklist"), "int", label=True)
