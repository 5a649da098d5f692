"""The schema-change guard: stop before a schema change loses data. Pure comparison.

A mapped field that disappears or changes type on either side, or a source
table that loses change tracking, ends the run with SCHEMA_CHANGED, naming the
table and the field. The worker compares each side's schema, read when it
started, with the current one: before writing each page, and whenever the
destination rejects records (before they would be dead-lettered), so the
checkpoint never moves past records written under a schema that changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Schema:
    """One table's or resource's schema as the guard compares it: field types, lengths, links."""

    side: str                                   # "Dynamics 365 table" | "Campaign resource"
    name: str                                   # table or resource name
    fields: dict[str, str] = field(default_factory=dict)      # field → type
    lengths: dict[str, int] = field(default_factory=dict)     # string field → max length
    change_tracking: bool = True
    key: str | None = None                                     # the unique integration key, if any
    links: dict[str, str] = field(default_factory=dict)       # link field → the resource it points at
    behaviours: dict[str, str] = field(default_factory=dict)  # DateTime field → DateTimeBehavior (Dataverse)


class SchemaChanged(Exception):
    """A mapped field or the change tracking changed since the worker started (fatal)."""

    reason = "SCHEMA_CHANGED"


def problems(current: Schema, mapped: Iterable[str], baseline: Schema | None = None) -> list[str]:
    """What makes the mapping unsafe now: missing or retyped fields, lost change tracking."""
    found = []
    where = f"{current.side} {current.name!r}"
    if not current.change_tracking:
        found.append(f"{where} no longer has change tracking enabled")
    for name in sorted(set(mapped)):
        if name not in current.fields:
            found.append(f"{where}: mapped field {name!r} no longer exists")
        elif baseline is not None and name in baseline.fields and baseline.fields[name] != current.fields[name]:
            found.append(f"{where}: mapped field {name!r} changed type from {baseline.fields[name]} "
                         f"to {current.fields[name]}")
        elif baseline is not None and baseline.behaviours.get(name) != current.behaviours.get(name):
            found.append(f"{where}: mapped field {name!r} changed behaviour from {baseline.behaviours.get(name)} "
                         f"to {current.behaviours.get(name)}")
    return found


def check(current: Schema, mapped: Iterable[str], baseline: Schema | None = None) -> None:
    """Raise `SchemaChanged` naming every one of :func:`problems`; return when there are none."""
    found = problems(current, mapped, baseline)
    if found:
        raise SchemaChanged("; ".join(found))
