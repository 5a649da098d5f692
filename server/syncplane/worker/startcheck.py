"""Start-time checks: what a spec asks of the vendors' schemas, checked once, when a worker
starts and before it says ready. A problem fails the start itself (STARTING → ERROR with the
problem's reason, e.g. ``FIELD_NOT_FOUND`` naming the table and the field), instead of a
workflow that reaches RUNNING and then stops with ``SCHEMA_CHANGED`` for a field that never
existed. Pure: the worker reads the schemas, these functions judge them.

To add a check, write a function ``(EntityContext) -> Iterable[StartProblem]`` and append it
to :data:`ENTITY_CHECKS`; every ingress stream runs them all, and every problem found is
reported (not only the first).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from syncplane.connectors.schema import Schema
from syncplane.ingress.conversion import CONVERSION_NOT_SUPPORTED
from syncplane.ingress.transform import mapping_problems
from syncplane.proto.v1 import workflow_pb2 as pb

FIELD_NOT_FOUND = "FIELD_NOT_FOUND"
CHANGE_TRACKING_DISABLED = "CHANGE_TRACKING_DISABLED"


@dataclass(frozen=True)
class StartProblem:
    reason: str    # UPPER_SNAKE, becomes the workflow's last_error.reason
    path: str      # the spec field at fault, e.g. spec.ingress.entities[0].fields[2].source
    message: str   # names the table (or resource) and the field


class StartCheckFailed(Exception):
    """One or more start-time problems; ``reason`` is the first one's."""

    def __init__(self, problems: Sequence[StartProblem]) -> None:
        if not problems:
            raise ValueError("a failed start check needs at least one problem")
        self.problems = list(problems)
        self.reason = self.problems[0].reason
        super().__init__("; ".join(f"{p.path}: {p.message}" for p in self.problems))


@dataclass(frozen=True)
class EntityContext:
    """One ingress mapping and both sides' schemas, as read at start."""

    index: int                     # position in spec.ingress.entities
    entity: pb.EntityMapping
    source: Schema                 # the Dynamics 365 table
    destination: Schema            # the Campaign resource

    @property
    def path(self) -> str:
        return f"spec.ingress.entities[{self.index}]"


EntityCheck = Callable[[EntityContext], Iterable[StartProblem]]


def _where(schema: Schema) -> str:
    return f"{schema.side} {schema.name!r}"


def mapped_fields_exist(ctx: EntityContext) -> Iterable[StartProblem]:
    """Every field the mapping names (keys, mapped fields, filter and replacement fields) exists."""
    e, p = ctx.entity, ctx.path
    wanted: list[tuple[str, str, Schema]] = [(f"{p}.source_key", e.source_key, ctx.source),
                                             (f"{p}.destination_key", e.destination_key, ctx.destination)]
    for j, f in enumerate(e.fields):
        wanted += [(f"{p}.fields[{j}].source", f.source, ctx.source),
                   (f"{p}.fields[{j}].destination", f.destination, ctx.destination)]
    wanted += [(f"{p}.filter.conditions[{j}].field", c.field, ctx.source) for j, c in enumerate(e.filter.conditions)]
    wanted += [(f"{p}.replacements[{j}].field", r.field, ctx.source) for j, r in enumerate(e.replacements)]
    for path, name, schema in wanted:
        if name and name not in schema.fields:
            yield StartProblem(FIELD_NOT_FOUND, path, f"{_where(schema)} has no field {name!r}")


def change_tracking_enabled(ctx: EntityContext) -> Iterable[StartProblem]:
    """The source table has change tracking (without it only full reads could see changes)."""
    if not ctx.source.change_tracking:
        yield StartProblem(CHANGE_TRACKING_DISABLED, f"{ctx.path}.source_table",
                           f"{_where(ctx.source)} does not have change tracking enabled")


def conversions_supported(ctx: EntityContext) -> Iterable[StartProblem]:
    """Every mapped field's cell of the conversion table, and every filter and replacement value,
    fit both sides' types (ingress/README.md); checked once the fields exist."""
    if any(True for _ in mapped_fields_exist(ctx)):
        return
    for path, message in mapping_problems(ctx.entity, ctx.index, ctx.source, ctx.destination):
        yield StartProblem(CONVERSION_NOT_SUPPORTED, path, message)


#: The checks every ingress mapping passes at start, in order.
ENTITY_CHECKS: list[EntityCheck] = [mapped_fields_exist, change_tracking_enabled, conversions_supported]


def check_entity(ctx: EntityContext, checks: Iterable[EntityCheck] | None = None) -> list[StartProblem]:
    """Every problem of one mapping (empty: it may start)."""
    return [problem for check in (ENTITY_CHECKS if checks is None else checks) for problem in check(ctx)]


def entity_index(spec: pb.WorkflowSpec, source_table: str) -> int:
    """The position of a table's mapping in spec.ingress.entities (one mapping per table)."""
    for i, e in enumerate(spec.ingress.entities):
        if e.source_table == source_table:
            return i
    raise KeyError(source_table)
