from __future__ import annotations

import pytest

from syncplane.errors import InvalidArgument
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.validation import validate_labels, validate_spec
from syncplane.validation.names import parse_name
from syncplane.validation.spec import max_concurrency, max_concurrency_limit
from tests.factories import PLAIN_QUERY_NAMES, SECRET_QUERY_NAMES, spec, with_query


def violations(s: pb.WorkflowSpec) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as exc:
        validate_spec(s)
    return {v.field: v.description for v in exc.value.violations}


@pytest.mark.parametrize("kind", ["ingress", "egress", "opt_in_out"])
def test_defaults_are_valid(kind):
    validate_spec(spec(kind))


@pytest.mark.parametrize("name", ["Bad", "-x", "x-", "a" * 64, "a_b", ""])
def test_names_must_be_dns1123_labels(name):
    with pytest.raises(InvalidArgument) as exc:
        parse_name(name, "workflow_id")
    assert exc.value.violations[0].field == "workflow_id"


def test_scalar_bounds():
    s = spec()
    s.batch_size, s.workers = 1001, 0
    s.poll_interval.seconds = 0
    s.type = pb.WORKFLOW_TYPE_UNSPECIFIED
    got = violations(s)
    assert {"spec.batch_size", "spec.workers", "spec.poll_interval", "spec.type"} <= got.keys()


def test_connection_rules():
    s = spec()
    s.source.kind = pb.CONNECTOR_KIND_CAMPAIGN_STANDARD
    s.destination.endpoint = "ftp://x"
    s.destination.credentials.name = ""
    got = violations(s)
    assert "must be DYNAMICS365" in got["spec.source.kind"]
    assert "spec.destination.endpoint" in got
    assert "spec.destination.credentials.name" in got


def test_endpoint_must_not_carry_credentials():
    s = spec()
    s.source.endpoint = "https://user:secret@org.crm.dynamics.com/"
    got = violations(s)
    assert "secret" not in got["spec.source.endpoint"]


def test_one_mapping_per_source_table():
    s = spec()
    s.ingress.entities.add().CopyFrom(s.ingress.entities[0])
    s.ingress.entities[1].destination_resource = "other"
    assert "one mapping per source table" in violations(s)["spec.ingress.entities[1].source_table"]


def test_two_sources_to_one_destination():
    s = spec()
    s.ingress.entities[0].fields.add(source="nickname", destination="firstName")
    got = violations(s)
    assert "more than one source field" in got["spec.ingress.entities[0].fields[4].destination"]


def test_custom_entity_and_column_limits():
    s = spec()
    for i in range(21):
        e = s.ingress.entities.add(source_table=f"t{i}", destination_resource=f"cus{i}", source_key="id",
                                   destination_key="crmId")
        e.fields.add(source="id", destination="crmId")
    for i in range(50):
        s.ingress.entities[1].fields.add(source=f"c{i}", destination=f"d{i}")
    got = violations(s)
    assert "at most 20" in got["spec.ingress.entities"]
    assert "at most 50" in got["spec.ingress.entities[1].fields"]


def test_filters():
    s = spec()
    e = s.ingress.entities[0]
    e.filter.conditions.add(field="statecode")
    e.filter.conditions.add(field="emailaddress1", operator=pb.FILTER_OPERATOR_IS_NULL, value="x")
    got = violations(s)
    assert "spec.ingress.entities[0].filter.conditions[0].operator" in got
    assert "spec.ingress.entities[0].filter.conditions[1].value" in got


def test_section_must_match_type():
    s = spec()
    s.egress.send = True
    assert "spec.egress" in violations(s)


def test_egress_needs_an_event():
    s = spec("egress")
    s.egress.Clear()
    s.egress.SetInParent()
    assert "at least one event" in violations(s)["spec.egress"]


def test_opt_in_out_rules():
    s = spec("opt_in_out")
    s.opt_in_out.field_pairs.add(campaign_field="blackListEmail", crm_field="donotemail")
    s.opt_in_out.field_pairs.add(campaign_field="favouriteColour", crm_field="email")
    got = violations(s)
    assert "paired more than once" in got["spec.opt_in_out.field_pairs[2].campaign_field"]
    assert "must be one of" in got["spec.opt_in_out.field_pairs[3].campaign_field"]
    assert "donot" in got["spec.opt_in_out.field_pairs[3].crm_field"]
    s2 = spec("opt_in_out")
    s2.opt_in_out.direction = pb.OPT_IN_OUT_DIRECTION_UNSPECIFIED
    assert "spec.opt_in_out.direction" in violations(s2)


def test_marketing_to_crm_reverses_connections():
    s = spec("opt_in_out")
    s.opt_in_out.direction = pb.OPT_IN_OUT_DIRECTION_MARKETING_TO_CRM
    assert "spec.source.kind" in violations(s)
    s.source.kind, s.destination.kind = s.destination.kind, s.source.kind
    validate_spec(s)


def test_labels():
    with pytest.raises(InvalidArgument) as exc:
        validate_labels({"ok": "fine", "bad key!": "x", "k": "v" * 70})
    assert {v.field for v in exc.value.violations} == {"labels[bad key!]", "labels[k]"}


def test_replay_names_a_mapped_table_and_a_request_id():
    s = spec("ingress")
    s.ingress.replay.source_table = "account"
    with pytest.raises(InvalidArgument) as err:
        validate_spec(s)
    fields = {v.field for v in err.value.violations}
    assert fields == {"spec.ingress.replay.source_table", "spec.ingress.replay.request_id"}
    s.ingress.replay.source_table = "contact"
    s.ingress.replay.request_id = "r1"
    validate_spec(s)


@pytest.mark.parametrize(("seconds", "nanos"), [(2, -1), (-2, 1), (1, 1_000_000_000), (5, -999_999_999)])
def test_poll_interval_must_be_a_valid_duration(seconds, nanos):
    """Found by the API fuzzer: 2 s - 1 ns is within the bounds but no valid Duration (its JSON form,
    which the supervisor and the CRD use, refuses it)."""
    s = spec()
    s.poll_interval.seconds, s.poll_interval.nanos = seconds, nanos
    assert "spec.poll_interval" in violations(s)


@pytest.mark.parametrize("name", SECRET_QUERY_NAMES)
@pytest.mark.parametrize("side", ["source", "destination"])
def test_endpoint_query_must_not_carry_a_secret(name, side):
    s = spec()
    conn = getattr(s, side)
    conn.endpoint = with_query(conn.endpoint, name)
    got = violations(s)
    assert list(got) == [f"spec.{side}.endpoint"], got
    assert "looks like a secret" in got[f"spec.{side}.endpoint"]
    assert "s3cr3t-value" not in got[f"spec.{side}.endpoint"]


@pytest.mark.parametrize("name", PLAIN_QUERY_NAMES)
def test_endpoint_query_without_secrets_is_valid(name):
    s = spec()
    s.source.endpoint = with_query(s.source.endpoint, name)
    validate_spec(s)


def test_endpoint_must_not_have_a_fragment():
    s = spec()
    s.source.endpoint += "#access_token=abc"
    assert "spec.source.endpoint" in violations(s)


# Dataverse allows 52 concurrent requests per user ("Service protection API limits"); Campaign
# publishes no limit (256 bounds one worker). Each side, each kind, below, at and above its bound.
@pytest.mark.parametrize(("kind", "side", "value", "ok"), [
    ("ingress", "source", 52, True), ("ingress", "source", 53, False),
    ("ingress", "destination", 256, True), ("ingress", "destination", 257, False),
    ("egress", "destination", 52, True), ("egress", "destination", 53, False),
    ("egress", "source", 256, True), ("ingress", "source", -1, False), ("ingress", "destination", 0, True),
])
def test_max_concurrency_is_bounded_by_the_vendor_limit(kind, side, value, ok):
    s = spec(kind)
    getattr(s, side).max_concurrency = value
    if ok:
        validate_spec(s)
        return
    got = violations(s)
    assert set(got) == {f"spec.{side}.max_concurrency"}
    assert ("52 for DYNAMICS365" if getattr(s, side).kind == pb.CONNECTOR_KIND_DYNAMICS365
            else "256 for CAMPAIGN_STANDARD") in got[f"spec.{side}.max_concurrency"]


@pytest.mark.parametrize(("kind", "set_to", "expected"), [
    (pb.CONNECTOR_KIND_CAMPAIGN_STANDARD, 0, 52),   # unset: Campaign's measured default
    (pb.CONNECTOR_KIND_DYNAMICS365, 0, 16),         # unset: a third of Dataverse's per-user limit
    (pb.CONNECTOR_KIND_CAMPAIGN_STANDARD, 8, 8),    # set: as set
    (pb.CONNECTOR_KIND_DYNAMICS365, 52, 52),
])
def test_an_unset_max_concurrency_means_its_kinds_default(kind: pb.ConnectorKind.ValueType, set_to: int,
                                                          expected: int) -> None:
    conn = pb.Connection(kind=kind, max_concurrency=set_to)
    assert max_concurrency(conn) == expected
    assert max_concurrency(conn) <= max_concurrency_limit(kind)
