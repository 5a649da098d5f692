"""`syncplane verify` on Kubernetes, the pure parts: the request the server writes on the Workflow,
the outcome the Job writes to `<workflow>-verify`, and the Job the operator builds (verify/kube.py,
operator builders)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncplane.contract import names as L
from syncplane.errors import FailedPrecondition, SyncplaneError, Unavailable
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.verify.kube import (
    ERROR_KEY,
    REQUEST_KEY,
    RESULT_KEY,
    VerifyRequest,
    job_name,
    outcome_data,
    parse_outcome,
)
from syncplane_operator.builders import WorkerImage, build_verify_job, build_worker_deployment

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=8)


@given(st.integers(min_value=0, max_value=1000), st.booleans())
def test_a_request_reads_back_as_written(samples: int, repair: bool) -> None:
    request = VerifyRequest.new(samples, repair)
    assert VerifyRequest.parse(request.annotation()) == request
    assert VerifyRequest.new(samples, repair).id != request.id, "each call is a request of its own"


@given(st.one_of(json_values.map(json.dumps), st.text(), st.none(), st.integers()))
def test_anything_else_is_no_request(raw: object) -> None:
    """Hand edits, other tools' JSON, garbage: never a Job (nor an exception in the operator)."""
    parsed = VerifyRequest.parse(raw)
    if parsed is not None:   # only a well-formed request parses, whatever else the JSON holds
        doc = json.loads(str(raw))
        assert (doc["id"].lower(), doc["samples"], doc["repair"]) == (parsed.id, parsed.samples, parsed.repair)


@pytest.mark.parametrize("doc", [
    {"id": "", "samples": 1, "repair": False},               # no id
    {"id": "a/b", "samples": 1, "repair": False},            # not a name part
    {"id": "x" * 33, "samples": 1, "repair": False},         # too long
    {"id": "ab12", "samples": -1, "repair": False},          # negative sample size
    {"id": "ab12", "samples": True, "repair": False},        # a bool is not a count
    {"id": "ab12", "samples": 1, "repair": "yes"},           # repair must be a bool
    {"id": "ab12", "samples": 1},                            # a field missing
])
def test_malformed_requests_are_refused(doc: dict[str, object]) -> None:
    assert VerifyRequest.parse(json.dumps(doc)) is None


def response() -> svc.VerifyWorkflowResponse:
    return svc.VerifyWorkflowResponse(
        result=pb.VerifyResult(counts=pb.VerifyCounts(compared=10, missing=1, extra=2, different=3), requests=7),
        streams=[svc.VerifyStream(stream="contact", source="contacts", destination="profile",
                                  missing_keys=["k1"], extra_keys=["k2", "k3"], queued=6)])


def test_an_outcome_is_read_only_by_its_own_request() -> None:
    data = outcome_data("abc123", response=response())
    assert data[REQUEST_KEY] == "abc123" and ERROR_KEY not in data
    outcome = parse_outcome(data, "abc123")
    assert outcome is not None and outcome.response == response()
    assert parse_outcome(data, "other") is None, "an older request's result is not this one's"
    assert parse_outcome(None, "abc123") is None and parse_outcome({}, "abc123") is None


@pytest.mark.parametrize("error, code, exc_type, reason", [
    (FailedPrecondition("the Secret d365 is missing", "STOPPED", "BAD_CREDENTIALS"), "FAILED_PRECONDITION",
     FailedPrecondition, "BAD_CREDENTIALS"),
    (Unavailable("a side stayed unavailable: 503"), "UNAVAILABLE", Unavailable, "UNAVAILABLE"),
    (SyncplaneError("the verify Job failed: KeyError"), "INTERNAL", FailedPrecondition, "ERROR"),
])
def test_an_error_outcome_raises_what_the_job_answered(error: SyncplaneError, code: str,
                                                       exc_type: type[SyncplaneError], reason: str) -> None:
    data = outcome_data("r1", error=error)
    assert RESULT_KEY not in data and json.loads(data[ERROR_KEY])["code"] == code
    outcome = parse_outcome(data, "r1")
    assert outcome is not None and outcome.response is None
    with pytest.raises(exc_type) as raised:
        outcome.raise_error("STOPPED")
    assert str(raised.value) == str(error) and raised.value.reason == reason


@pytest.mark.parametrize("data", [{REQUEST_KEY: "r1", RESULT_KEY: "{not json"}, {REQUEST_KEY: "r1"},
                                  {REQUEST_KEY: "r1", ERROR_KEY: "[]"}])
def test_a_damaged_outcome_is_a_failed_verify_not_a_crash(data: dict[str, str]) -> None:
    outcome = parse_outcome(data, "r1")
    assert outcome is not None and outcome.response is None and outcome.reason == "VERIFY_FAILED"


@given(st.from_regex(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True),
       st.from_regex(r"[0-9a-f]{16}", fullmatch=True))
def test_job_names_fit_a_label_value(workflow: str, rid: str) -> None:
    name = job_name(workflow, rid)
    assert len(name) <= 63 and name.endswith(f"-verify-{rid[:8]}")


def test_the_verify_job_runs_as_the_workers_do() -> None:
    """Same identity, Secrets, spec mount and lock-down as the worker pods; not a worker (no heartbeat,
    not indexed as one), never retried, cleaned up after its TTL, and no secret value anywhere."""
    request = VerifyRequest("0123456789abcdef", 5, True)
    image = WorkerImage(image="registry.example/syncplane:1")
    job = build_verify_job("contacts", "ns", request, "f" * 16, True, image, uid="uid-1", secrets=["d365", "acs"],
                           generation=3)
    deployment = build_worker_deployment("contacts", "ns", "f" * 16, 3, 1, image, uid="uid-1",
                                         secrets=["d365", "acs"])
    pod, worker_pod = job["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]
    for key in ("serviceAccountName", "securityContext", "volumes"):
        assert pod[key] == worker_pod[key], key
    container, worker = pod["containers"][0], worker_pod["containers"][0]
    assert container["volumeMounts"] == worker["volumeMounts"]
    assert container["securityContext"] == worker["securityContext"] and container["image"] == worker["image"]
    assert "readinessProbe" not in container and "ports" not in container
    args = container["args"]
    assert args[0] == "verify-job" and "--running" in args and args[args.index("--workflow-uid") + 1] == "uid-1"
    assert VerifyRequest.parse(args[args.index("--request") + 1]) == request
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["ttlSecondsAfterFinished"] > 0 and job["spec"]["activeDeadlineSeconds"] > 0
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels[L.WORKFLOW_LABEL] == "contacts" and labels[L.COMPONENT_LABEL] == "verify"
    assert job["metadata"]["name"] == job_name("contacts", request.id)
    stopped = build_verify_job("contacts", "ns", request, "f" * 16, False, image, generation=4)
    assert "--running" not in stopped["spec"]["template"]["spec"]["containers"][0]["args"]
