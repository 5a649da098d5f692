"""Validate a WorkflowSpec; every violation names its field path."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from urllib.parse import urlparse

from syncplane.errors import FieldViolation, InvalidArgument
from syncplane.proto.enums import enum_short_name
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.validation import rules
from syncplane.validation.endpoints import endpoint_problem
from syncplane.validation.names import is_dns1123_label

D365 = pb.CONNECTOR_KIND_DYNAMICS365
ACS = pb.CONNECTOR_KIND_CAMPAIGN_STANDARD
_SECTIONS = {
    pb.WORKFLOW_TYPE_INGRESS: "ingress",
    pb.WORKFLOW_TYPE_EGRESS: "egress",
    pb.WORKFLOW_TYPE_OPT_IN_OUT: "opt_in_out",
}
_VALUELESS_OPERATORS = {pb.FILTER_OPERATOR_IS_NULL, pb.FILTER_OPERATOR_IS_NOT_NULL}


def apply_defaults(spec: pb.WorkflowSpec) -> None:
    """Fill the fields a user may leave out, in place."""
    if spec.desired_state == pb.DESIRED_STATE_UNSPECIFIED:
        spec.desired_state = pb.DESIRED_STATE_STOPPED
    if spec.batch_size == 0:
        spec.batch_size = rules.DEFAULT_BATCH_SIZE
    if not spec.HasField("poll_interval"):
        spec.poll_interval.seconds = rules.DEFAULT_POLL_SECONDS
    if spec.workers == 0:
        spec.workers = 1
    for entity in spec.ingress.entities:
        if entity.filter.conditions and entity.filter.combinator == pb.FILTER_COMBINATOR_UNSPECIFIED:
            entity.filter.combinator = pb.FILTER_COMBINATOR_AND


def validate_labels(labels: dict[str, str]) -> None:
    out: list[FieldViolation] = []
    for key, value in labels.items():
        if not rules.LABEL_KEY.fullmatch(key):
            out.append(FieldViolation(f"labels[{key}]", "is not a valid label key"))
        if len(value) > 63 or not rules.LABEL_VALUE.fullmatch(value):
            out.append(FieldViolation(f"labels[{key}]", "value must be at most 63 alphanumerics, '-', '_' or '.'"))
    if out:
        raise InvalidArgument(out)


def validate_spec(spec: pb.WorkflowSpec, path: str = "spec") -> None:
    """Raise InvalidArgument listing every violation, or return None."""
    violations = list(_spec(spec, path))
    if violations:
        raise InvalidArgument(violations)


def _spec(spec: pb.WorkflowSpec, p: str) -> Iterable[FieldViolation]:
    if spec.type not in _SECTIONS:
        yield FieldViolation(f"{p}.type", "is required: INGRESS, EGRESS or OPT_IN_OUT")
    if spec.desired_state not in (pb.DESIRED_STATE_STOPPED, pb.DESIRED_STATE_RUNNING):
        yield FieldViolation(f"{p}.desired_state", "must be RUNNING or STOPPED")
    if not 1 <= spec.batch_size <= rules.MAX_BATCH_SIZE:
        yield FieldViolation(f"{p}.batch_size", f"must be between 1 and {rules.MAX_BATCH_SIZE}")
    poll = spec.poll_interval.seconds + spec.poll_interval.nanos / 1e9
    if not _valid_duration(spec.poll_interval.seconds, spec.poll_interval.nanos):
        yield FieldViolation(f"{p}.poll_interval", "is not a valid duration: nanos must be between -999,999,999 "
                                                   "and 999,999,999 and have the sign of seconds")
    elif not rules.MIN_POLL_SECONDS <= poll <= rules.MAX_POLL_SECONDS:
        yield FieldViolation(f"{p}.poll_interval",
                             f"must be between {rules.MIN_POLL_SECONDS}s and {rules.MAX_POLL_SECONDS}s")
    if not 1 <= spec.workers <= rules.MAX_WORKERS:
        yield FieldViolation(f"{p}.workers", f"must be between 1 and {rules.MAX_WORKERS}")
    if spec.restart_nonce < 0:
        yield FieldViolation(f"{p}.restart_nonce", "must not be negative")
    yield from _connections(spec, p)
    for wtype, section in _SECTIONS.items():
        if wtype != spec.type and spec.HasField(section):  # type: ignore[arg-type]
            yield FieldViolation(f"{p}.{section}", f"must not be set on a {_type(spec.type)} workflow")
    if spec.type == pb.WORKFLOW_TYPE_INGRESS:
        yield from _ingress(spec.ingress, f"{p}.ingress")
    elif spec.type == pb.WORKFLOW_TYPE_EGRESS:
        yield from _egress(spec.egress, f"{p}.egress")
    elif spec.type == pb.WORKFLOW_TYPE_OPT_IN_OUT:
        yield from _opt_in_out(spec.opt_in_out, f"{p}.opt_in_out")


def _valid_duration(seconds: int, nanos: int) -> bool:
    """google.protobuf.Duration's own rule (duration.proto): what its JSON form (and the CRD) can hold."""
    return abs(nanos) <= 999_999_999 and not (seconds > 0 > nanos or seconds < 0 < nanos)


def _type(t: int) -> str:
    return enum_short_name(pb.WorkflowType.DESCRIPTOR, t)


def _kind(k: int) -> str:
    return enum_short_name(pb.ConnectorKind.DESCRIPTOR, k)


def _connections(spec: pb.WorkflowSpec, p: str) -> Iterable[FieldViolation]:
    expected: dict[int, tuple[int, int]] = {
        pb.WORKFLOW_TYPE_INGRESS: (D365, ACS),
        pb.WORKFLOW_TYPE_EGRESS: (ACS, D365),
    }
    if spec.type == pb.WORKFLOW_TYPE_OPT_IN_OUT:
        d = spec.opt_in_out.direction
        expected[spec.type] = (ACS, D365) if d == pb.OPT_IN_OUT_DIRECTION_MARKETING_TO_CRM else (D365, ACS)
    want = expected.get(spec.type)
    for i, (field, conn) in enumerate((("source", spec.source), ("destination", spec.destination))):
        fp = f"{p}.{field}"
        if not spec.HasField(field):  # type: ignore[arg-type]
            yield FieldViolation(fp, "is required")
            continue
        if conn.kind == pb.CONNECTOR_KIND_UNSPECIFIED:
            yield FieldViolation(f"{fp}.kind", "is required: DYNAMICS365 or CAMPAIGN_STANDARD")
        elif want and conn.kind != want[i]:
            yield FieldViolation(f"{fp}.kind", f"must be {_kind(want[i])} for a {_type(spec.type)} workflow")
        problem = endpoint_problem(conn.endpoint, conn.allow_cleartext)
        if problem:
            yield FieldViolation(f"{fp}.endpoint", problem)
        else:
            yield from _secret_query(conn.endpoint, f"{fp}.endpoint")
        if not is_dns1123_label(conn.credentials.name):
            yield FieldViolation(f"{fp}.credentials.name", "is required and must be a DNS-1123 label")
        limit = max_concurrency_limit(conn.kind)
        if not 0 <= conn.max_concurrency <= limit:
            yield FieldViolation(f"{fp}.max_concurrency", f"must be between 1 and {limit} for {_kind(conn.kind)} "
                                 "(0 or unset: the default)")


def max_concurrency(conn: pb.Connection) -> int:
    """The requests in flight a worker may have to ``conn`` at most: its ``max_concurrency``, or
    when unset (0) the default of its kind (rules: 52 for Campaign Standard, 16 for Dataverse)."""
    if conn.max_concurrency:
        return conn.max_concurrency
    return rules.DEFAULT_MAX_CONCURRENCY if conn.kind == D365 else rules.DEFAULT_MAX_CONCURRENCY_CAMPAIGN


def max_concurrency_limit(kind: int) -> int:
    """The most requests in flight a connection of ``kind`` may ask for (see rules)."""
    return rules.MAX_CONCURRENCY_DYNAMICS365 if kind == D365 else rules.MAX_CONCURRENCY_CAMPAIGN


def _secret_query(endpoint: str, fp: str) -> Iterable[FieldViolation]:
    """No credential in a URL: a query parameter whose name looks like a secret, or a fragment."""
    found = rules.SECRET_QUERY.search(endpoint)
    if found:
        yield FieldViolation(fp, f"must not carry credentials: query parameter {found.group(1)!r} looks like a "
                                 "secret; use credentials.name")
    if urlparse(endpoint).fragment:
        yield FieldViolation(fp, "must not have a fragment (#...)")


def _ingress(ingress: pb.IngressSpec, p: str) -> Iterable[FieldViolation]:
    if not ingress.entities:
        yield FieldViolation(f"{p}.entities", "needs at least one entity mapping")
    custom = [e for e in ingress.entities if e.destination_resource != rules.PROFILE_RESOURCE]
    if len(custom) > rules.MAX_CUSTOM_ENTITIES:
        yield FieldViolation(f"{p}.entities",
                             f"has {len(custom)} custom entities; at most {rules.MAX_CUSTOM_ENTITIES} are allowed")
    tables = Counter(e.source_table for e in ingress.entities)
    for i, entity in enumerate(ingress.entities):
        ep = f"{p}.entities[{i}]"
        if tables[entity.source_table] > 1 and entity.source_table:
            yield FieldViolation(f"{ep}.source_table",
                                 f"{entity.source_table!r} is mapped more than once; one mapping per source table")
        yield from _entity(entity, ep)
    replay = ingress.replay
    if replay.source_table or replay.request_id:
        if replay.source_table not in tables:
            yield FieldViolation(f"{p}.replay.source_table",
                                 f"{replay.source_table!r} is not one of the mapped source tables")
        if not replay.request_id:
            yield FieldViolation(f"{p}.replay.request_id", "is required to ask for a replay")
        elif len(replay.request_id) > 63:
            yield FieldViolation(f"{p}.replay.request_id", "must be at most 63 characters")


def _ident(value: str, pattern: re.Pattern[str], fp: str, what: str) -> Iterable[FieldViolation]:
    if not value:
        yield FieldViolation(fp, "is required")
    elif not pattern.fullmatch(value):
        yield FieldViolation(fp, f"{value!r} is not a valid {what} name")


def _entity(e: pb.EntityMapping, p: str) -> Iterable[FieldViolation]:
    yield from _ident(e.source_table, rules.CRM_IDENTIFIER, f"{p}.source_table", "Dynamics 365 table")
    yield from _ident(e.destination_resource, rules.CAMPAIGN_IDENTIFIER, f"{p}.destination_resource",
                      "Campaign resource")
    yield from _ident(e.source_key, rules.CRM_IDENTIFIER, f"{p}.source_key", "Dynamics 365 column")
    yield from _ident(e.destination_key, rules.CAMPAIGN_IDENTIFIER, f"{p}.destination_key", "Campaign field")
    if not e.fields:
        yield FieldViolation(f"{p}.fields", "needs at least one field mapping")
    if len(e.fields) > rules.MAX_COLUMNS_PER_ENTITY:
        yield FieldViolation(f"{p}.fields",
                             f"has {len(e.fields)} columns; at most {rules.MAX_COLUMNS_PER_ENTITY} are allowed")
    destinations = Counter(f.destination for f in e.fields)
    for i, f in enumerate(e.fields):
        fp = f"{p}.fields[{i}]"
        yield from _ident(f.source, rules.CRM_IDENTIFIER, f"{fp}.source", "Dynamics 365 column")
        yield from _ident(f.destination, rules.CAMPAIGN_IDENTIFIER, f"{fp}.destination", "Campaign field")
        if f.destination and destinations[f.destination] > 1:
            yield FieldViolation(f"{fp}.destination",
                                 f"{f.destination!r} is the destination of more than one source field")
        if f.destination == e.destination_key and f.source != e.source_key:
            yield FieldViolation(f"{fp}.destination",
                                 f"{f.destination!r} is the destination key; only {e.source_key!r} may map to it")
    for i, r in enumerate(e.replacements):
        yield from _ident(r.field, rules.CRM_IDENTIFIER, f"{p}.replacements[{i}].field", "Dynamics 365 column")
    for i, c in enumerate(e.filter.conditions):
        cp = f"{p}.filter.conditions[{i}]"
        yield from _ident(c.field, rules.CRM_IDENTIFIER, f"{cp}.field", "Dynamics 365 column")
        if c.operator == pb.FILTER_OPERATOR_UNSPECIFIED:
            yield FieldViolation(f"{cp}.operator", "is required")
        elif c.operator in _VALUELESS_OPERATORS and c.value:
            yield FieldViolation(f"{cp}.value", "must be empty for IS_NULL and IS_NOT_NULL")
    if e.filter.delete_excluded and not e.filter.conditions:
        yield FieldViolation(f"{p}.filter.delete_excluded", "needs at least one filter condition")


def _egress(egress: pb.EgressSpec, p: str) -> Iterable[FieldViolation]:
    if not (egress.send or egress.open or egress.click or egress.bounce):
        yield FieldViolation(p, "switch on at least one event type: send, open, click or bounce")


def _opt_in_out(o: pb.OptInOutSpec, p: str) -> Iterable[FieldViolation]:
    if o.direction == pb.OPT_IN_OUT_DIRECTION_UNSPECIFIED:
        yield FieldViolation(f"{p}.direction",
                             "is required: DISABLED, CRM_TO_MARKETING, MARKETING_TO_CRM or BIDIRECTIONAL")
    if o.direction != pb.OPT_IN_OUT_DIRECTION_DISABLED and not o.field_pairs:
        yield FieldViolation(f"{p}.field_pairs", "needs at least one field pair unless the direction is DISABLED")
    campaign = Counter(fp.campaign_field for fp in o.field_pairs)
    crm = Counter(fp.crm_field for fp in o.field_pairs)
    for i, pair in enumerate(o.field_pairs):
        fp = f"{p}.field_pairs[{i}]"
        if pair.campaign_field not in rules.CAMPAIGN_OPT_OUT_FIELDS:
            yield FieldViolation(f"{fp}.campaign_field",
                                 f"must be one of {', '.join(sorted(rules.CAMPAIGN_OPT_OUT_FIELDS))}")
        elif campaign[pair.campaign_field] > 1:
            yield FieldViolation(f"{fp}.campaign_field", f"{pair.campaign_field!r} is paired more than once")
        if not rules.CRM_OPT_OUT_FIELD.fullmatch(pair.crm_field):
            yield FieldViolation(f"{fp}.crm_field", "must be a Dynamics 365 donot* boolean, e.g. donotbulkemail")
        elif crm[pair.crm_field] > 1:
            yield FieldViolation(f"{fp}.crm_field", f"{pair.crm_field!r} is paired more than once")
