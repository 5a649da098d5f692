"""One source record in, one destination action out. Pure: no I/O.

Order: deletes, then value replacements, then the filter (on source fields,
mapped or not), then picklist labels, mapping, type conversion and
truncation to the destination's lengths (each truncation is counted).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import Enum
from typing import Any

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.connectors.base import Record

FORMATTED = "@OData.Community.Display.V1.FormattedValue"
# Campaign field lengths (DOMAIN.md); a custom resource declares its own.
PROFILE_LENGTHS = {"email": 128, "firstName": 30, "lastName": 50, "externalId": 100}


class Action(Enum):
    UPSERT = "upsert"
    DELETE = "delete"
    SKIP = "skip"


@dataclass(frozen=True)
class Transformed:
    action: Action
    key: str
    values: dict[str, Any] = field(default_factory=dict)
    truncated: tuple[str, ...] = ()
    # Destination fields of mappings with applyUpdates: false: written when the destination
    # record is created (or on a replay), never over an existing record's value.
    create_only: frozenset[str] = frozenset()


def convert(value: Any) -> Any:
    """boolean, integer, decimal, double, string, datetime and date map across; anything else is a string."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _matches(cond: pb.FilterCondition, values: dict[str, Any]) -> bool:
    actual = values.get(cond.field)
    op = cond.operator
    if op == pb.FILTER_OPERATOR_IS_NULL:
        return actual is None
    if op == pb.FILTER_OPERATOR_IS_NOT_NULL:
        return actual is not None
    if actual is None:
        return op == pb.FILTER_OPERATOR_NOT_EQUALS
    text = str(actual).lower() if isinstance(actual, bool) else str(actual)
    if op == pb.FILTER_OPERATOR_EQUALS:
        return text == cond.value
    if op == pb.FILTER_OPERATOR_NOT_EQUALS:
        return text != cond.value
    if op == pb.FILTER_OPERATOR_CONTAINS:
        return cond.value.lower() in text.lower()
    a, b = _number(text), _number(cond.value)
    if a is None or b is None:
        a_s, b_s = text, cond.value  # ISO dates compare as strings
        return a_s > b_s if op == pb.FILTER_OPERATOR_GREATER_THAN else a_s < b_s
    return a > b if op == pb.FILTER_OPERATOR_GREATER_THAN else a < b


class EntityTransform:
    def __init__(self, entity: pb.EntityMapping, lengths: dict[str, int] | None = None) -> None:
        self.entity = entity
        self.lengths = PROFILE_LENGTHS if lengths is None and entity.destination_resource == "profile" \
            else (lengths or {})
        self.replacements: dict[str, dict[str, str]] = {}
        for r in entity.replacements:
            self.replacements.setdefault(r.field, {})[r.value] = r.replacement

    def passes_filter(self, values: dict[str, Any]) -> bool:
        conditions = self.entity.filter.conditions
        if not conditions:
            return True
        results = (_matches(c, values) for c in conditions)
        return any(results) if self.entity.filter.combinator == pb.FILTER_COMBINATOR_OR else all(results)

    def filter_fingerprint(self) -> str:
        """Identifies the filter (and its delete-excluded switch): a change means a full re-read."""
        f = self.entity.filter
        return hashlib.sha256(f.SerializeToString(deterministic=True)).hexdigest()[:16] if f.conditions else "none"

    def source_columns(self) -> list[str]:
        """Every source column the transform reads (mapped, filtered or replaced)."""
        cols = {self.entity.source_key, *(f.source for f in self.entity.fields),
                *(c.field for c in self.entity.filter.conditions), *self.replacements}
        return sorted(cols)

    def apply(self, record: Record, full: bool = False) -> Transformed:
        """``full``: the record came from a full read. It changes nothing here: whether the
        destination record is new (so create-only fields are written) is decided by the sink."""
        e = self.entity
        if record.deleted:
            return Transformed(Action.DELETE if e.apply_deletes else Action.SKIP, record.key)
        values = dict(record.values)
        for fname, table in self.replacements.items():
            raw = values.get(fname)
            if raw is not None and str(raw) in table:
                values[fname] = table[str(raw)]
        if not self.passes_filter(values):
            return Transformed(Action.DELETE if e.filter.delete_excluded else Action.SKIP, record.key)
        out: dict[str, Any] = {e.destination_key: record.key}
        truncated: list[str] = []
        create_only: set[str] = set()
        for m in e.fields:
            if m.HasField("apply_updates") and not m.apply_updates:
                create_only.add(m.destination)
            value = values.get(m.source)
            if not e.technical_picklist_values and f"{m.source}{FORMATTED}" in values:
                value = values[f"{m.source}{FORMATTED}"]
            value = convert(value)
            limit = self.lengths.get(m.destination)
            if isinstance(value, str) and limit is not None and len(value) > limit:
                value = value[:limit]
                truncated.append(m.destination)
            if m.destination != e.destination_key:
                out[m.destination] = value
        return Transformed(Action.UPSERT, record.key, out, tuple(truncated), frozenset(create_only))
