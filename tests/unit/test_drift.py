from datetime import UTC, datetime

from syncplane.lifecycle import Observed, changed_fields, reconcile, spec_hash
from syncplane.proto.v1 import workflow_pb2 as pb
from tests.factories import spec, workflow


def test_lifecycle_fields_are_never_drift():
    a = spec()
    b = spec()
    b.desired_state = pb.DESIRED_STATE_RUNNING
    b.restart_nonce = 42
    assert spec_hash(a) == spec_hash(b)
    assert changed_fields(a, b) == []


def test_changed_field_paths():
    a = spec()
    b = spec()
    b.batch_size = 7
    b.ingress.entities[0].fields[1].destination = "email2"
    b.ingress.entities[0].apply_deletes = False
    assert changed_fields(a, b) == [
        "spec.batch_size",
        "spec.ingress.entities[0].apply_deletes",
        "spec.ingress.entities[0].fields[1].destination",
    ]


def test_appended_list_item_reports_the_list():
    a = spec()
    b = spec()
    b.ingress.entities[0].fields.add(source="mobilephone", destination="mobilePhone")
    assert changed_fields(a, b) == ["spec.ingress.entities[0].fields"]


def test_running_workflow_shows_drift_and_start_clears_it():
    wf = workflow()
    wf.spec.desired_state = pb.DESIRED_STATE_RUNNING
    now = datetime.now(UTC)
    started = reconcile(wf, None, Observed(), now)
    assert started.apply is not None and not started.status.drift.detected
    wf.status.CopyFrom(started.status)
    wf.status.phase = pb.PHASE_RUNNING
    wf.spec.poll_interval.seconds = 60
    out = reconcile(wf, started.apply, Observed(live=1, ready=1), now)
    assert out.status.drift.detected
    assert list(out.status.drift.changed_fields) == ["spec.poll_interval"]
    cond = {c.type: c for c in out.status.conditions}["SpecDrift"]
    assert (cond.status, cond.reason) == ("True", "RestartRequired")
