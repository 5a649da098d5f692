"""On Kubernetes the last verify summary is an annotation the store shows as status.lastVerify,
and never part of the operator's status writes (pure conversions)."""

from __future__ import annotations

from syncplane.contract.names import LAST_VERIFY_ANNOTATION
from syncplane.model.kube import last_verify_annotation, status_patch, workflow_from_body
from syncplane.proto.v1 import workflow_pb2 as pb


def result() -> pb.VerifyResult:
    r = pb.VerifyResult(counts=pb.VerifyCounts(compared=20_000, missing=3, extra=2, different=4, in_flight=1),
                        requests=17)
    r.verify_time.FromSeconds(1_800_000_000)
    return r


def body(annotations: dict[str, str]) -> dict[str, object]:
    return {"metadata": {"name": "wf", "generation": 2, "annotations": annotations},
            "spec": {"type": "INGRESS"}, "status": {"phase": "RUNNING"}}


def test_the_annotation_reads_back_as_status_last_verify() -> None:
    wf = workflow_from_body(body({LAST_VERIFY_ANNOTATION: last_verify_annotation(result())}))
    assert wf.status.last_verify == result() and wf.status.phase == pb.PHASE_RUNNING
    plain = workflow_from_body(body({}))
    assert not plain.status.HasField("last_verify")
    assert wf.etag == plain.etag, "the annotation is not something users wrote: the etag stays"


def test_an_unreadable_annotation_reads_as_never_verified() -> None:
    wf = workflow_from_body(body({LAST_VERIFY_ANNOTATION: "{not json"}))
    assert not wf.status.HasField("last_verify")


def test_the_operator_never_writes_last_verify() -> None:
    status = pb.WorkflowStatus(phase=pb.PHASE_RUNNING, last_verify=result())
    assert "lastVerify" not in status_patch({"phase": "RUNNING"}, status)
    assert status_patch({"phase": "RUNNING", "backlog": 0, "drift": {"detected": False}}, status) == {}
