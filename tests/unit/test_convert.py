import pytest

from syncplane.errors import InvalidArgument
from syncplane.model.convert import from_resource, spec_from_dict, spec_to_dict, to_resource
from syncplane.proto.v1 import workflow_pb2 as pb
from tests.factories import workflow


def test_round_trip_uses_short_enums_and_camel_case():
    wf = workflow("opt_in_out")
    resource = to_resource(wf)
    assert resource["spec"]["type"] == "OPT_IN_OUT"
    assert resource["spec"]["optInOut"]["direction"] == "BIDIRECTIONAL"
    assert resource["status"]["phase"] == "STOPPED"
    workflow_id, back = from_resource(resource)
    assert workflow_id == "wf" and back.spec == wf.spec


def test_snake_case_and_full_enum_names_are_accepted():
    spec = spec_from_dict({"type": "WORKFLOW_TYPE_EGRESS", "batch_size": 5})
    assert spec.type == pb.WORKFLOW_TYPE_EGRESS and spec.batch_size == 5
    assert spec_to_dict(spec) == {"type": "EGRESS", "batchSize": 5}


def test_unknown_enum_and_field_name_the_path():
    with pytest.raises(InvalidArgument) as exc:
        spec_from_dict({"type": "SIDEWAYS"})
    assert exc.value.violations[0].field == "spec.type"
    with pytest.raises(InvalidArgument) as exc:
        spec_from_dict({"ingress": {"entities": [{"colour": "x"}]}})
    assert exc.value.violations[0].field == "spec.ingress.entities[0].colour"


def test_int64_fields_are_integers_in_resources():
    wf = workflow()
    wf.spec.restart_nonce = 7
    wf.status.backlog = 12
    resource = to_resource(wf)
    assert resource["spec"]["restartNonce"] == 7 and resource["status"]["backlog"] == 12
    assert from_resource(resource)[1].spec.restart_nonce == 7
