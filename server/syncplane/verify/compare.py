"""Comparing a workflow's two sides, PURE (no I/O): what the destination should hold (the
source's records through the workflow's own transform) against what it holds.

A record is compared by a digest of its mapped fields only: the fields the transform
writes, each normalised by its destination type (a datetime as an instant, a number as a
number), so two spellings of one value are one value. A key on the source side only is
*missing*, on the destination side only *extra*, on both with another digest *different*.
A difference is *in flight* when the workers cannot have written it yet: the workflow is
still in its first load, or the record changed at or after the stream's last committed
checkpoint (compared in whole seconds, the precision of Dataverse's ``modifiedon``). The
checkpoint is read before either side, so a record changed while the comparison runs is in
flight too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: Destination field types (Campaign ``resourceType`` types, Dataverse ``AttributeType``s)
#: whose values are instants, numbers or GUIDs.
_INSTANTS = frozenset({"datetime", "DateTime"})
_NUMBERS = frozenset({"int", "double", "Integer", "BigInt", "Decimal", "Double", "Money", "State", "Status",
                      "Picklist"})
_GUIDS = frozenset({"Lookup", "Uniqueidentifier"})


@dataclass(frozen=True)
class Row:
    """One side's record: its mapped values and when that side last changed it (epoch seconds)."""

    values: Mapping[str, Any]
    modified: float | None = None


@dataclass
class Difference:
    """The outcome of one stream's comparison; key lists are sorted."""

    compared: int = 0
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    foreign: int = 0
    held: int = 0          # children expected absent: their parent is not at the destination

    @property
    def keys(self) -> list[str]:
        """Every differing key: missing, extra, then different."""
        return [*self.missing, *self.extra, *self.different]


def instant(value: Any) -> float | None:
    """An ISO 8601 or Campaign (``2024-05-01 12:34:56.789Z``) timestamp as epoch seconds."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def normalise(value: Any, kind: str | None) -> Any:
    """One canonical form per value of a destination field type (None: compared as is)."""
    if value is None:
        return None
    if kind in _INSTANTS:
        moment = instant(value)
        return round(moment, 3) if moment is not None else value
    if kind == "date" and isinstance(value, str):
        return value[:10]
    if kind in _NUMBERS and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    if kind in _GUIDS and isinstance(value, str):
        return value.lower()
    return value


def digest(values: Mapping[str, Any], types: Mapping[str, str] | None = None) -> str:
    """The digest of mapped values (field order does not matter), 128 bits as hex."""
    types = types or {}
    canonical = {k: normalise(v, types.get(k)) for k, v in values.items()}
    raw = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


def compare(expected: Mapping[str, Row], actual: Mapping[str, Row], *, ignored: Collection[str] = (),
            types: Mapping[str, str] | None = None) -> Difference:
    """``expected``: key → what the destination should hold; ``actual``: key → what it holds
    (the integration's records only). ``ignored``: source keys the transform skips (e.g. a
    filter that excludes without deleting), neither expected nor extra. Only the fields the
    transform writes are compared: an actual record's other fields are not the workflow's."""
    out = Difference()
    skip = set(ignored) - expected.keys()
    for key, want in expected.items():
        have = actual.get(key)
        if have is None:
            out.missing.append(key)
        elif digest(want.values, types) != digest({f: have.values.get(f) for f in want.values}, types):
            out.different.append(key)
    out.extra = [k for k in actual if k not in expected and k not in skip]
    out.compared = len(expected) + len(out.extra)
    out.missing.sort()
    out.extra.sort()
    out.different.sort()
    return out


def waiting_for_parent(expected: Mapping[str, Row], links: Mapping[str, str],
                       parents: Mapping[str, Collection[str]]) -> set[str]:
    """The expected keys whose link names a parent that is not at the destination: the workers
    hold such a child until its parent is there (DOMAIN.md, linked tables), so it is expected
    absent, not missing; present, it is extra.

    Args:
        links: the child resource's link fields → the resource each points at.
        parents: resource → the integration keys (lowercase) of its records at the destination
            (expected there, or left there by a filter that does not delete). A resource not in
            it is not compared: its links are not judged.
    """
    out = set()
    for key, row in expected.items():
        for name, target in links.items():
            there, value = parents.get(target), row.values.get(name)
            if there is not None and value is not None and str(value).lower() not in there:
                out.add(key)
    return out


def in_flight(diff: Difference, read: Sequence[Mapping[str, Row]], *, running: bool, loading: bool,
              committed: float | None) -> set[str]:
    """The differing keys the workers have not had the chance to write yet (see the module doc).

    Args:
        read: the sides whose changes the workers read (the source; both sides for opt-in/out):
            a change made on a side the workers only write is a real difference.
        loading: the stream has no checkpoint past its first full read.
        committed: when the stream's last checkpoint was committed (epoch seconds).

    A stopped workflow has nothing in flight."""
    if not running:
        return set()
    if loading or committed is None:
        return set(diff.keys)
    since = math.floor(committed)
    out = set()
    for key in diff.keys:
        stamps = [r.modified for side in read if (r := side.get(key)) is not None and r.modified is not None]
        if any(math.floor(s) >= since for s in stamps):
            out.add(key)
    return out


def lookup_binds(values: Mapping[str, Any]) -> dict[str, Any]:
    """Dataverse ``<navigation>_<table>@odata.bind: "/<set>(<id>)"`` (what a write sends, see
    egress.transform) as the lookup column a read returns, ``<navigation>: <id>``."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name.endswith("@odata.bind"):
            column = name[: -len("@odata.bind")].rsplit("_", 1)[0]
            text = str(value) if value is not None else ""
            out[column] = text[text.find("(") + 1: text.rfind(")")] if "(" in text else None
        else:
            out[name] = value
    return out
