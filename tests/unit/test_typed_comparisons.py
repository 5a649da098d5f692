"""Filters and value replacements compare by the column's type (issue 12, fault 5): for every
attribute type of the conversion table, a spec value written in any of the forms a user may
write it (1 / 1.0 / 1.00, TRUE / true, a GUID in capitals or braces, an instant with an offset)
equals the record's value as the service sends it, and orders by the type, not by the text."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.ingress.compare import matches, parse_spec_value
from syncplane.ingress.conversion import NotConvertible, SourceType
from syncplane.proto.v1 import workflow_pb2 as pb

EQ, NE, GT, LT = (pb.FILTER_OPERATOR_EQUALS, pb.FILTER_OPERATOR_NOT_EQUALS, pb.FILTER_OPERATOR_GREATER_THAN,
                  pb.FILTER_OPERATOR_LESS_THAN)
moments = st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(2090, 1, 1)).map(
    lambda m: m.replace(microsecond=0))


def spellings(t: SourceType, draw: st.DrawFn) -> tuple[Any, str, Any]:
    """(the wire value, a spec text meaning the same value, a sort key of the value)."""
    name = t.row
    if name == "Boolean":
        b = draw(st.booleans())
        return b, draw(st.sampled_from(["true", "TRUE", "1", "yes"] if b else ["false", "False", "0", "no"])), b
    if name in ("Integer", "BigInt", "Picklist", "State", "Status"):
        n = draw(st.integers(0, 10**6))
        return n, draw(st.sampled_from([str(n), f"{n}.0", f" {n} ", f"{n}.00"])), n
    if name in ("Decimal", "Money", "Double"):
        d = draw(st.decimals(min_value=-10**6, max_value=10**6, places=2))
        return float(d), draw(st.sampled_from([str(d), f"{d}0", format(d.normalize(), "f")])), Decimal(str(float(d)))
    if name in ("Uniqueidentifier", "Lookup", "Customer", "Owner"):
        u = draw(st.uuids())
        return str(u), draw(st.sampled_from([str(u).upper(), "{" + str(u) + "}", str(u)])), u.int
    if name == "DateTime (DateOnly)":
        m = draw(moments)
        return m.date().isoformat(), m.date().isoformat(), m.date()
    if name == "DateTime (UserLocal)":
        m = draw(moments)
        wire = m.strftime("%Y-%m-%dT%H:%M:%SZ")
        hours = draw(st.integers(-11, 13))
        local = m.replace(tzinfo=UTC).astimezone(timezone(timedelta(hours=hours)))
        return wire, local.isoformat(), m
    if name == "DateTime (TimeZoneIndependent)":
        m = draw(moments)
        return m.strftime("%Y-%m-%dT%H:%M:%SZ"), draw(st.sampled_from([m.isoformat(), m.isoformat() + "+05:00"])), m
    v = draw(st.text(alphabet="abcXYZ ", min_size=1, max_size=8))
    return v, draw(st.sampled_from([v, v.upper(), v.lower()])), v.casefold()


TYPES = [SourceType(t) for t in ("String", "Memo", "EntityName", "Boolean", "Integer", "BigInt", "Decimal", "Money",
                                 "Double", "Picklist", "State", "Status", "Uniqueidentifier", "Lookup", "Customer",
                                 "Owner")] + \
    [SourceType("DateTime", b) for b in ("UserLocal", "DateOnly", "TimeZoneIndependent")]


@settings(max_examples=800, deadline=None)
@given(data=st.data(), t=st.sampled_from(TYPES))
def test_equal_values_match_in_any_spelling_and_order_by_type(data: st.DataObject, t: SourceType) -> None:
    wire, spec_text, key = data.draw(st.composite(lambda draw: spellings(t, draw))())
    spec = parse_spec_value(t, EQ, spec_text)
    assert matches(t, EQ, spec, wire) and not matches(t, NE, spec, wire)
    _, other_text, other_key = data.draw(st.composite(lambda draw: spellings(t, draw))())
    if t.type == "Boolean" or t.type in ("Uniqueidentifier", "Lookup", "Customer", "Owner"):
        with pytest.raises(NotConvertible):
            parse_spec_value(t, GT, other_text)
        return
    gt = parse_spec_value(t, GT, other_text)
    lt = parse_spec_value(t, LT, other_text)
    assert matches(t, GT, gt, wire) == (key > other_key)
    assert matches(t, LT, lt, wire) == (key < other_key)


def test_the_issue_examples() -> None:
    money, boolean = SourceType("Money"), SourceType("Boolean")
    assert matches(money, EQ, parse_spec_value(money, EQ, "10"), 10.0)        # not "10.0" == "10"
    assert matches(money, GT, parse_spec_value(money, GT, "9"), 10.5)         # not "10.5" < "9" as text
    assert matches(boolean, EQ, parse_spec_value(boolean, EQ, "TRUE"), True)
    choice = SourceType("Picklist")
    by_label = parse_spec_value(choice, EQ, "Email")
    assert by_label.label and matches(choice, EQ, by_label, 2, "Email")
    assert not matches(choice, EQ, by_label, 3, "Phone")
    with pytest.raises(NotConvertible):
        parse_spec_value(boolean, EQ, "maybe")
    with pytest.raises(NotConvertible):
        parse_spec_value(SourceType("Integer"), pb.FILTER_OPERATOR_CONTAINS, "1")
    guid = str(uuid.uuid4())
    assert matches(SourceType("Lookup"), EQ, parse_spec_value(SourceType("Lookup"), EQ, guid.upper()), guid)
