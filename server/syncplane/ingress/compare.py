"""Filters and value replacements compare by the column's type, as the user meant the spec
value: a boolean, a number, a date, a GUID, text. PURE.

The spec holds every value as text (``"0"``, ``"true"``, ``"2024-05-01"``); it is parsed once,
at start, by the source column's type (a value that does not parse is a start-time problem),
and each record's value is compared in that type, never as the text form the service sent.

========================  ==================================================================
Boolean                   ``true``/``false`` (also ``1``/``0``, ``yes``/``no``)
Integer, BigInt, Decimal, numbers (``1``, ``1.0`` and ``1.00`` are equal)
Double, Money
Picklist, State, Status   a number compares the choice's value; other text its display
                          label, case-insensitively (the worker then asks for the labels)
DateTime                  by behaviour: DateOnly as dates; UserLocal as instants (a spec
                          value without a zone is UTC; a bare date is its UTC midnight);
                          TimeZoneIndependent as wall times (a zone in the spec is ignored)
Uniqueidentifier, lookups GUIDs (case and braces do not matter)
String, Memo, EntityName  text, case-insensitively (Dataverse's default collation)
========================  ==================================================================

Operators: equals / not equals on every type; greater / less than on numbers, dates and text;
contains on text and choice labels. Anything else is a start-time problem.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from syncplane.ingress.conversion import (
    CHOICE_TYPES,
    GUID_TYPES,
    NUMBER_TYPES,
    TEXT_TYPES,
    UNREADABLE_TYPES,
    NotConvertible,
    SourceType,
    parse_decimal,
)
from syncplane.proto.v1 import workflow_pb2 as pb

ORDERED = (pb.FILTER_OPERATOR_GREATER_THAN, pb.FILTER_OPERATOR_LESS_THAN)
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


@dataclass(frozen=True)
class SpecValue:
    """A spec value parsed in the column's type. ``label``: it compares a choice's label."""

    value: Any
    label: bool = False


def _domain(source: SourceType, raw: Any, *, spec: bool) -> Any:
    """A value in the comparison domain of its column's type. ``spec``: ``raw`` is the spec's
    text (zones are read as the column's behaviour says)."""
    t = source.type
    if t == "Boolean":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(f"{raw!r} is not true or false")
    if t in NUMBER_TYPES or t in CHOICE_TYPES:
        if isinstance(raw, bool):
            raise ValueError("a boolean is no number")
        return Decimal(str(raw)) if not isinstance(raw, str) else parse_decimal(raw)
    if t == "DateTime":
        text = str(raw).strip()
        if source.behaviour == "DateOnly":
            return date.fromisoformat(text[:10])
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
        if source.behaviour == "TimeZoneIndependent":
            return moment.replace(tzinfo=None)
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if t in GUID_TYPES:
        return uuid.UUID(str(raw).strip().strip("{}"))
    return str(raw).casefold()


def parse_spec_value(source: SourceType, operator: int, text: str) -> SpecValue:
    """The spec's value of a filter condition (or a replacement's match) in the column's type.
    Raises :class:`NotConvertible` naming what the value or the operator should be."""
    t = source.type
    if t in UNREADABLE_TYPES:
        raise NotConvertible(f"{source.row} columns have no single value to compare")
    if operator in (pb.FILTER_OPERATOR_IS_NULL, pb.FILTER_OPERATOR_IS_NOT_NULL):
        return SpecValue(None)
    if operator == pb.FILTER_OPERATOR_CONTAINS:
        if t in TEXT_TYPES:
            return SpecValue(text.casefold())
        if t in CHOICE_TYPES:
            return SpecValue(text.casefold(), label=True)
        raise NotConvertible(f"contains compares text; {source.row} is not text")
    if t in CHOICE_TYPES:
        try:
            return SpecValue(parse_decimal(text))
        except ValueError:
            if operator in ORDERED:
                raise NotConvertible(f"{text!r} is no choice value to order by; give the number") from None
            return SpecValue(text.strip().casefold(), label=True)
    if operator in ORDERED and (t == "Boolean" or t in GUID_TYPES):
        raise NotConvertible(f"{source.row} values have no order")
    try:
        return SpecValue(_domain(source, text, spec=True))
    except ValueError as exc:
        raise NotConvertible(f"{text!r} is not a {source.row} value: {exc}") from None


def matches(source: SourceType, operator: int, spec: SpecValue, actual: Any, label: str | None = None) -> bool:
    """Whether a record's value (as read; ``label``: a choice's display label) meets the condition."""
    if operator == pb.FILTER_OPERATOR_IS_NULL:
        return actual is None
    if operator == pb.FILTER_OPERATOR_IS_NOT_NULL:
        return actual is not None
    if actual is None:
        return operator == pb.FILTER_OPERATOR_NOT_EQUALS
    if spec.label:
        if label is None:
            return operator == pb.FILTER_OPERATOR_NOT_EQUALS
        value: Any = label.casefold()
    else:
        try:
            value = _domain(source, actual, spec=False)
        except (ValueError, TypeError, ArithmeticError):
            return operator == pb.FILTER_OPERATOR_NOT_EQUALS  # not of the column's type: no match
    if operator == pb.FILTER_OPERATOR_EQUALS:
        return bool(value == spec.value)
    if operator == pb.FILTER_OPERATOR_NOT_EQUALS:
        return bool(value != spec.value)
    if operator == pb.FILTER_OPERATOR_CONTAINS:
        return str(spec.value) in str(value)
    try:
        return bool(value > spec.value) if operator == pb.FILTER_OPERATOR_GREATER_THAN else bool(value < spec.value)
    except TypeError:
        return False
