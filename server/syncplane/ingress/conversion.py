"""The conversion table: Dataverse attribute type by Campaign field type. PURE.

Each cell is a documented conversion or a problem found when the workflow starts (never a
dead letter per record). DOMAIN.md: boolean, integer, decimal, double, string, datetime and
date map across; anything else is sent as a string. The rows are Dataverse ``AttributeType``
values (AttributeTypeCode, Dataverse Web API reference), DateTime split by its
``DateTimeBehavior`` ("Behavior and format of the date and time column"); the columns are the
Campaign resource field types the resourceType schema reports.

How each source type arrives on the wire (Dataverse Web API JSON):

==================  ===============================================================
String, Memo,       a JSON string
EntityName
Boolean             true / false
Integer, BigInt     a JSON number
Picklist, State,    a JSON number; its label as ``<col>@OData.Community.Display.V1.
Status (choices)    FormattedValue`` when the request asks for that annotation
Decimal, Double,    a JSON number
Money
DateTime UserLocal  a UTC instant ``2024-05-01T22:00:00Z`` (Format DateOnly too: the
                    user's local midnight, in UTC)
DateTime DateOnly   ``2024-05-02``: a calendar date, no zone
DateTime            ``2024-05-02T09:30:00Z``: a wall time; the ``Z`` means no zone
TimeZoneIndependent
Uniqueidentifier,   a GUID string (lookups read as ``_<name>_value``, the table they
Lookup, Customer,   point to as ``…@Microsoft.Dynamics.CRM.lookuplogicalname`` when
Owner               asked)
==================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

#: Single-valued lookups, read as ``_<name>_value`` (AttributeTypeCode: Lookup, Customer, Owner).
LOOKUP_TYPES = frozenset({"Lookup", "Customer", "Owner"})
#: Choices: a number, with a display label (FormattedValue).
CHOICE_TYPES = frozenset({"Picklist", "State", "Status"})
TEXT_TYPES = frozenset({"String", "Memo", "EntityName"})
INTEGER_TYPES = frozenset({"Integer", "BigInt"})
DECIMAL_TYPES = frozenset({"Decimal", "Money"})
NUMBER_TYPES = INTEGER_TYPES | DECIMAL_TYPES | {"Double"}
GUID_TYPES = LOOKUP_TYPES | {"Uniqueidentifier"}
#: Types with no single value to send (a party list, calendar rules, images and files, …).
UNREADABLE_TYPES = frozenset({"PartyList", "CalendarRules", "Virtual", "ManagedProperty"})
BEHAVIOURS = ("UserLocal", "DateOnly", "TimeZoneIndependent")
#: Campaign resource field types (resourceType ``content.<field>.type``).
DESTINATION_TYPES = ("string", "boolean", "int", "double", "datetime", "date", "link")
CONVERSION_NOT_SUPPORTED = "CONVERSION_NOT_SUPPORTED"


@dataclass(frozen=True)
class SourceType:
    """A Dataverse column's type: ``AttributeType``, and for a DateTime its behaviour."""

    type: str
    behaviour: str = ""          # DateTime: UserLocal | DateOnly | TimeZoneIndependent

    @property
    def row(self) -> str:
        """The name of its row in the table, e.g. ``DateTime (DateOnly)``."""
        return f"{self.type} ({self.behaviour or 'UserLocal'})" if self.type == "DateTime" else self.type


class NotConvertible(Exception):
    """A table cell that is a start-time problem; the message says why and what to do instead."""


Converter = Callable[[Any], Any]


def _text_number(value: Any) -> str:
    """A number as plain decimal text: 12, 1234.5, 0.0001 (never 1e-04 or 12.0)."""
    if isinstance(value, bool):
        raise TypeError("a boolean is no number")
    if isinstance(value, int):
        return str(value)
    d = Decimal(str(value)).normalize()
    text = format(d, "f")
    return text


def _wall_time(value: Any) -> str:
    """A TimeZoneIndependent value as its wall time, without the ``Z`` that means no zone."""
    return str(value).replace("Z", "").replace(" ", "T")[:19]


def _iso_date(value: Any) -> str:
    return date.fromisoformat(str(value)[:10]).isoformat()


def _instant(value: Any) -> str:
    moment = datetime.fromisoformat(str(value).replace("Z", "+00:00").replace(" ", "T"))
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ") if moment.tzinfo is not None else moment.isoformat() + "Z"


def _to_string(source: SourceType, label: bool) -> Converter:
    t = source.type
    if t in TEXT_TYPES or t in GUID_TYPES:
        return str
    if t == "Boolean":
        return lambda v: "true" if v else "false"
    if t in NUMBER_TYPES:
        return _text_number
    if t in CHOICE_TYPES:
        return str if label else _text_number
    if t == "DateTime":
        return {"DateOnly": _iso_date, "TimeZoneIndependent": _wall_time}.get(source.behaviour, _instant)
    raise NotConvertible(f"{source.row} has no value to send as text")


#: The DateTime column's cells, by Campaign field type: what that field holds, and by the column's behaviour
#: ("*": any other) its converter, or why there is none.
_DATETIME_CELLS: dict[str, tuple[str, dict[str, Converter | str]]] = {
    "datetime": ("a date and time", {
        "": _instant, "UserLocal": _instant,
        "TimeZoneIndependent": lambda v: _wall_time(v) + "Z",  # the wall time, labelled UTC: it has no zone
        "*": "a DateOnly date has no time of day: map it to a date field"}),
    "date": ("a date", {
        "DateOnly": _iso_date,
        "TimeZoneIndependent": _iso_date,  # the wall time's own date: no zone to convert from
        "*": "a UserLocal date and time is a UTC instant: its calendar date depends on the user's time zone "
             "(cut to UTC it is a day early east of UTC); change the column's behaviour to DateOnly, or map "
             "it to a datetime field"}),
}


def converter(source: SourceType, destination: str, *, label: bool = False) -> Converter:
    """The cell of the table: a function from the wire value (never None: None stays None) to
    the value Campaign's field takes. ``label``: a choice is sent as its display label (the
    mapping's technicalPicklistValues is off). Raises :class:`NotConvertible` for a cell that
    is a start-time problem."""
    t = source.type
    if t in UNREADABLE_TYPES:
        raise NotConvertible(f"{source.row} columns have no single value to send")
    if destination == "string":
        return _to_string(source, label)
    if destination == "boolean":
        if t == "Boolean":
            return bool
        raise NotConvertible(f"{source.row} is not a yes/no value; map it to a string field")
    if destination == "int":
        if t in INTEGER_TYPES or (t in CHOICE_TYPES and not label):
            return int
        if t in CHOICE_TYPES:
            raise NotConvertible("a choice's display label is text: map it to a string field, or set "
                                 "technicalPicklistValues to send its number")
        if t in NUMBER_TYPES:
            raise NotConvertible(f"{source.row} has fractions an integer field would lose; map it to a double "
                                 "or string field")
        raise NotConvertible(f"{source.row} is not a number")
    if destination == "double":
        if t in NUMBER_TYPES:
            return float
        raise NotConvertible(f"{source.row} is not a number")
    if destination in _DATETIME_CELLS:
        what, cells = _DATETIME_CELLS[destination]
        if t != "DateTime":
            raise NotConvertible(f"{source.row} is not {what}")
        cell = cells.get(source.behaviour, cells["*"])
        if isinstance(cell, str):
            raise NotConvertible(cell)
        return cell
    if destination == "link":
        if t in LOOKUP_TYPES:
            return str
        raise NotConvertible(f"{source.row} is not a lookup: a link takes a lookup to the linked table")
    raise NotConvertible(f"Campaign field type {destination!r} is not one syncplane writes")


def try_converter(source: SourceType, destination: str, *, label: bool = False) -> Converter | str:
    """The cell's converter, or the problem's message."""
    try:
        return converter(source, destination, label=label)
    except NotConvertible as exc:
        return str(exc)


def source_type(attribute_type: str, behaviour: str = "") -> SourceType:
    return SourceType(attribute_type, behaviour if attribute_type == "DateTime" else "")


def infer(value: Any) -> SourceType:
    """The source type of a value whose column's metadata is not known (an unbound transform)."""
    if isinstance(value, bool):
        return SourceType("Boolean")
    if isinstance(value, int):
        return SourceType("Integer")
    if isinstance(value, float):
        return SourceType("Double")
    return SourceType("String")


def parse_decimal(text: str) -> Decimal:
    try:
        return Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None



def replacement_value(destination: str, text: str) -> Any:
    """A value replacement's new value (spec text) as the destination field's type. Raises
    :class:`NotConvertible` when the text is not of that type."""
    try:
        if destination in ("string", "link"):
            return text
        if destination == "boolean":
            low = text.strip().lower()
            if low not in ("true", "false"):
                raise ValueError("not true or false")
            return low == "true"
        if destination == "int":
            return int(text.strip())
        if destination == "double":
            return float(text.strip())
        if destination == "date":
            return date.fromisoformat(text.strip()[:10]).isoformat()
        if destination == "datetime":
            return _instant(text.strip())
    except ValueError as exc:
        raise NotConvertible(f"{text!r} is not a Campaign {destination} value ({exc})") from None
    raise NotConvertible(f"Campaign field type {destination!r} is not one syncplane writes")
