"""One source record in, one destination action out. Pure: no I/O.

Order: deletes, then the filter (on the source values as read, by the column's type: see
compare.py), then value replacements (matched by type too), then mapping, the conversion of
each value from its Dataverse attribute type to its Campaign field type (conversion.py) and
truncation to the destination's lengths (each truncation is counted).

The types come from both sides' schemas at start (:meth:`EntityTransform.bind`): every cell the
mapping uses is checked then, so a conversion the table does not allow, or a spec value that
is not of its column's type, fails the start instead of dead-lettering every record. A
transform not bound (no schemas known) passes values on as read.

It implements the pipeline's transform contract (:mod:`syncplane.transform`: ``Action``,
``Transformed``), which lives outside ingress so that the pipeline and egress never import it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime
from typing import Any

from syncplane.connectors.base import Record
from syncplane.connectors.schema import Schema
from syncplane.ingress.compare import SpecValue, matches, parse_spec_value
from syncplane.ingress.conversion import (
    CHOICE_TYPES,
    CONVERSION_NOT_SUPPORTED,
    LOOKUP_TYPES,
    Converter,
    NotConvertible,
    SourceType,
    converter,
    infer,
    replacement_value,
    source_type,
)
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.transform import Action, Transformed

FORMATTED_VALUE = "OData.Community.Display.V1.FormattedValue"
LOOKUP_LOGICAL_NAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
FORMATTED = f"@{FORMATTED_VALUE}"
# Campaign field lengths (DOMAIN.md); a custom resource declares its own.
PROFILE_LENGTHS = {"email": 128, "firstName": 30, "lastName": 50, "externalId": 100}


class MappingNotSupported(Exception):
    """Start-time problems of a mapping's types: ``problems`` are (spec field path, message)."""

    reason = CONVERSION_NOT_SUPPORTED

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


def mapping_problems(entity: pb.EntityMapping, index: int, source: Schema,
                     destination: Schema) -> list[tuple[str, str]]:
    """The start-time problems of one mapping's types (conversion table, spec values): a list
    of (spec field path, message), empty when it may start. Pure: both schemas as read."""
    try:
        EntityTransform(entity, index=index).bind(source, destination)
    except MappingNotSupported as exc:
        return exc.problems
    return []


def convert(value: Any) -> Any:
    """An unbound transform's conversion: JSON scalars as read; anything else as a string."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


class EntityTransform:
    def __init__(self, entity: pb.EntityMapping, lengths: dict[str, int] | None = None, index: int = 0) -> None:
        self.entity, self.index = entity, index  # index: its position in spec.ingress.entities
        self.lengths = PROFILE_LENGTHS if lengths is None and entity.destination_resource == "profile" \
            else (lengths or {})
        self.source_types: dict[str, SourceType] = {}     # bound at start: source column → type
        self._converters: dict[int, Converter] = {}        # field mapping index → its cell
        self._links: dict[int, str] = {}                   # field mapping index → table a link points at
        self._labels: set[str] = set()                     # choice columns sent (or compared) as labels
        self._conditions: list[tuple[pb.FilterCondition, SourceType, SpecValue]] = []
        self._replacements: dict[str, list[tuple[SpecValue, str]]] = {}
        self._replaced: dict[tuple[str, int], Any] = {}    # (field, mapping index) → replacement, converted
        self.bound = False
        for r in entity.replacements:
            self._replacements.setdefault(r.field, []).append((SpecValue(r.value), r.replacement))

    # ------------------------------------------------------------------ start
    def bind(self, source: Schema, destination: Schema, link_tables: dict[str, str] | None = None) -> None:
        """Take both sides' types and check every cell the mapping uses (conversion.py) and
        every spec value (compare.py). ``link_tables``: link field → the source table whose
        records its target resource holds (to drop a polymorphic lookup that points elsewhere).
        Raises :class:`MappingNotSupported` listing every problem with its spec path."""
        e, path = self.entity, f"spec.ingress.entities[{self.index}]"
        problems: list[tuple[str, str]] = []

        def typed(name: str) -> SourceType:
            return source_type(source.fields.get(name, "String"), source.behaviours.get(name, ""))

        self.source_types = {name: typed(name) for name in self.source_columns()}
        label = not e.technical_picklist_values
        for j, m in enumerate(e.fields):
            st = self.source_types[m.source]
            dest = destination.fields.get(m.destination, "string")
            if m.destination == e.destination_key:
                continue
            try:
                self._converters[j] = converter(st, dest, label=label and st.type in CHOICE_TYPES)
            except NotConvertible as exc:
                problems.append((f"{path}.fields[{j}]", f"{st.row} {m.source!r} to Campaign {dest} "
                                 f"{m.destination!r}: {exc}"))
                continue
            if label and st.type in CHOICE_TYPES:
                self._labels.add(m.source)
            if dest == "link" and link_tables and m.destination in link_tables:
                self._links[j] = link_tables[m.destination]
            for k, r in enumerate(e.replacements):
                if r.field == m.source:
                    try:
                        self._replaced[(r.field, j)] = replacement_value(dest, r.replacement)
                    except NotConvertible as exc:
                        problems.append((f"{path}.replacements[{k}].replacement", f"for Campaign {dest} "
                                         f"{m.destination!r}: {exc}"))
        def spec_value(at: str, name: str, operator: int, value: str) -> SpecValue | None:
            """The spec value ``value`` compared with column ``name`` by ``operator``; None, with a problem
            at ``at``, when it cannot be."""
            st = self.source_types[name]
            try:
                spec = parse_spec_value(st, operator, value)
            except NotConvertible as exc:
                problems.append((at, f"{name!r} ({st.row}): {exc}"))
                return None
            if spec.label:
                self._labels.add(name)
            return spec

        self._conditions = []
        for j, c in enumerate(e.filter.conditions):
            if (spec := spec_value(f"{path}.filter.conditions[{j}]", c.field, c.operator, c.value)) is not None:
                self._conditions.append((c, self.source_types[c.field], spec))
        self._replacements = {}
        for k, r in enumerate(e.replacements):
            at = f"{path}.replacements[{k}].value"
            if (spec := spec_value(at, r.field, pb.FILTER_OPERATOR_EQUALS, r.value)) is not None:
                self._replacements.setdefault(r.field, []).append((spec, r.replacement))
        if problems:
            raise MappingNotSupported(problems)
        self.bound = True

    def annotations(self) -> list[str]:
        """The annotation terms a read must ask for (Prefer odata.include-annotations): exactly
        what the mapping needs, nothing when it needs none."""
        terms = []
        if self._labels:
            terms.append(FORMATTED_VALUE)
        if self._links:
            terms.append(LOOKUP_LOGICAL_NAME)
        return terms

    def lookups(self) -> frozenset[str]:
        """Source columns that are lookups (read as ``_<name>_value``)."""
        return frozenset(n for n, t in self.source_types.items() if t.type in LOOKUP_TYPES)

    # ------------------------------------------------------------------ filter
    def _source_type(self, name: str, value: Any) -> SourceType:
        return self.source_types.get(name) or infer(value)

    def passes_filter(self, values: dict[str, Any]) -> bool:
        conditions = self.entity.filter.conditions
        if not conditions:
            return True
        if self.bound:
            checks = [(c, st, spec) for c, st, spec in self._conditions]
        else:
            checks = []
            for c in conditions:
                st = self._source_type(c.field, values.get(c.field))
                try:
                    checks.append((c, st, parse_spec_value(st, c.operator, c.value)))
                except NotConvertible:
                    checks.append((c, st, SpecValue(object())))
        results = (matches(st, c.operator, spec, values.get(c.field), values.get(f"{c.field}{FORMATTED}"))
                   for c, st, spec in checks)
        return any(results) if self.entity.filter.combinator == pb.FILTER_COMBINATOR_OR else all(results)

    def filter_fingerprint(self) -> str:
        """Identifies the filter (and its delete-excluded switch): a change means a full re-read."""
        f = self.entity.filter
        return hashlib.sha256(f.SerializeToString(deterministic=True)).hexdigest()[:16] if f.conditions else "none"

    def source_columns(self) -> list[str]:
        """Every source column the transform reads (mapped, filtered or replaced)."""
        cols = {self.entity.source_key, *(f.source for f in self.entity.fields),
                *(c.field for c in self.entity.filter.conditions), *(r.field for r in self.entity.replacements)}
        return sorted(cols)

    # ------------------------------------------------------------------ one record
    def _replacement(self, name: str, values: dict[str, Any]) -> str | None:
        raw = values.get(name)
        if raw is None or name not in self._replacements:
            return None
        st = self._source_type(name, raw)
        for spec, replacement in self._replacements[name]:
            if not self.bound:
                try:
                    spec = parse_spec_value(st, pb.FILTER_OPERATOR_EQUALS, str(spec.value))
                except NotConvertible:
                    continue
            if matches(st, pb.FILTER_OPERATOR_EQUALS, spec, raw, values.get(f"{name}{FORMATTED}")):
                return replacement
        return None

    def apply(self, record: Record, full: bool = False) -> Transformed:
        """``full``: the record came from a full read. It changes nothing here: whether the
        destination record is new (so create-only fields are written) is decided by the sink."""
        e = self.entity
        if record.deleted:
            return Transformed(Action.DELETE if e.apply_deletes else Action.SKIP, record.key)
        values = record.values
        if not self.passes_filter(values):
            return Transformed(Action.DELETE if e.filter.delete_excluded else Action.SKIP, record.key)
        out: dict[str, Any] = {e.destination_key: record.key}
        truncated: list[str] = []
        create_only: set[str] = set()
        for j, m in enumerate(e.fields):
            if m.HasField("apply_updates") and not m.apply_updates:
                create_only.add(m.destination)
            if m.destination == e.destination_key:
                continue
            value = self._value(j, m, values)
            limit = self.lengths.get(m.destination)
            if isinstance(value, str) and limit is not None and len(value) > limit:
                value = value[:limit]
                truncated.append(m.destination)
            out[m.destination] = value
        return Transformed(Action.UPSERT, record.key, out, tuple(truncated), frozenset(create_only))

    def _value(self, j: int, m: pb.FieldMapping, values: dict[str, Any]) -> Any:
        replacement = self._replacement(m.source, values)
        if replacement is not None:
            return self._replaced.get((m.source, j), replacement)
        value = values.get(m.source)
        if not self.bound:
            if not self.entity.technical_picklist_values and f"{m.source}{FORMATTED}" in values \
                    and not isinstance(value, bool):
                value = values[f"{m.source}{FORMATTED}"]
            return convert(value)
        if m.source in self._labels:
            value = values.get(f"{m.source}{FORMATTED}", value if value is None else None)
        if value is None:
            return None
        if j in self._links:
            target = values.get(f"{m.source}@{LOOKUP_LOGICAL_NAME}")
            if target is not None and target != self._links[j]:
                return None  # a polymorphic lookup to another table: no record of the linked resource
        return self._converters[j](value)
