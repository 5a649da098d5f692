"""issue 17: on Kubernetes a Workflow's status names spec fields in the resource's spelling
(`spec.batchSize`); gRPC keeps AIP's snake_case (`spec.batch_size`) on both backends."""

from __future__ import annotations

import pytest

from syncplane.model.kube import proto_path, resource_path, status_patch, workflow_from_body
from syncplane.proto.v1 import workflow_pb2 as pb

PATHS = [
    ("spec.batch_size", "spec.batchSize"),
    ("spec.poll_interval", "spec.pollInterval"),
    ("spec.workers", "spec.workers"),
    ("spec.ingress.entities[0].source_table", "spec.ingress.entities[0].sourceTable"),
    ("spec.ingress.entities[2].fields[1].apply_updates", "spec.ingress.entities[2].fields[1].applyUpdates"),
    ("spec.opt_in_out.field_pairs[0].crm_field", "spec.optInOut.fieldPairs[0].crmField"),
    ("spec.source.allow_cleartext", "spec.source.allowCleartext"),
]


@pytest.mark.parametrize(("proto", "resource"), PATHS)
def test_drift_paths_are_spelled_as_the_resource_on_kubernetes_and_as_the_proto_over_grpc(proto, resource):
    assert resource_path(proto) == resource and proto_path(resource) == proto
    status = pb.WorkflowStatus(phase=pb.PHASE_RUNNING, drift=pb.Drift(detected=True, changed_fields=[proto]))
    status.conditions.add(type="SpecDrift", status="True", reason="EditedWhileRunning",
                          message=f"edited fields apply at the next start: {proto}")
    written = status_patch({}, status)
    assert written["drift"]["changedFields"] == [resource]
    assert written["conditions"][0]["message"] == f"edited fields apply at the next start: {resource}"
    read = workflow_from_body({"metadata": {"name": "w"}, "spec": {}, "status": written}).status
    assert list(read.drift.changed_fields) == [proto]
    assert read.conditions[0].message == f"edited fields apply at the next start: {proto}"
    assert status_patch(written, status) == {}, "a status already written is a no-op"


def test_the_printer_columns_read_0_and_false_not_blanks():
    written = status_patch({}, pb.WorkflowStatus(phase=pb.PHASE_STOPPED))
    assert written["backlog"] == 0 and written["drift"] == {"detected": False}
    assert status_patch(written, pb.WorkflowStatus(phase=pb.PHASE_STOPPED)) == {}, "and that is a no-op after"
    read = workflow_from_body({"metadata": {"name": "w"}, "spec": {}, "status": written}).status
    assert read.backlog == 0 and not read.drift.detected
