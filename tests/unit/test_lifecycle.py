"""Every phase transition of the reconcile core and the user requests."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from syncplane.errors import Aborted, FailedPrecondition
from syncplane.lifecycle import (
    Observed,
    WorkerFailure,
    check_preconditions,
    check_replay,
    effective_phase,
    reconcile,
    request_restart,
    request_start,
    request_stop,
)
from syncplane.proto.v1 import workflow_pb2 as pb
from tests.factories import workflow

NOW = datetime(2026, 11, 28, tzinfo=UTC)
RUN, STOP = pb.DESIRED_STATE_RUNNING, pb.DESIRED_STATE_STOPPED


def wf_in(phase, desired, *, nonce: int = 0, applied_nonce: int = 0) -> pb.Workflow:
    wf = workflow()
    wf.status.phase = phase
    wf.spec.desired_state = desired
    wf.spec.restart_nonce = nonce
    wf.status.applied_restart_nonce = applied_nonce
    return wf


def applied_of(wf: pb.Workflow) -> pb.WorkflowSpec:
    spec = pb.WorkflowSpec()
    spec.CopyFrom(wf.spec)
    return spec


# (phase, desired, restart pending, observed) -> (next phase, target workers, started)
CASES = [
    (pb.PHASE_STOPPED, STOP, False, Observed(), pb.PHASE_STOPPED, 0, False),
    (pb.PHASE_STOPPED, STOP, False, Observed(live=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_STOPPED, RUN, False, Observed(), pb.PHASE_STARTING, 1, True),
    (pb.PHASE_STOPPED, RUN, False, Observed(live=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_STARTING, RUN, False, Observed(live=1), pb.PHASE_STARTING, 1, False),
    (pb.PHASE_STARTING, RUN, False, Observed(live=1, ready=1), pb.PHASE_RUNNING, 1, False),
    (pb.PHASE_STARTING, RUN, False, Observed(failure=WorkerFailure("CRASH_LOOP", "x")), pb.PHASE_ERROR, 0, False),
    (pb.PHASE_STARTING, STOP, False, Observed(live=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_STARTING, RUN, True, Observed(live=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_RUNNING, RUN, False, Observed(live=1, ready=1), pb.PHASE_RUNNING, 1, False),
    (pb.PHASE_RUNNING, RUN, False, Observed(live=0, degraded="restarting"), pb.PHASE_RUNNING, 1, False),
    (pb.PHASE_RUNNING, RUN, False, Observed(live=1, failure=WorkerFailure("BAD_CREDENTIALS", "401")),
     pb.PHASE_ERROR, 0, False),
    (pb.PHASE_RUNNING, STOP, False, Observed(live=1, ready=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_RUNNING, STOP, False, Observed(), pb.PHASE_STOPPED, 0, False),
    (pb.PHASE_RUNNING, RUN, True, Observed(live=1, ready=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_STOPPING, STOP, False, Observed(live=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_STOPPING, STOP, False, Observed(), pb.PHASE_STOPPED, 0, False),
    (pb.PHASE_STOPPING, RUN, True, Observed(live=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_STOPPING, RUN, True, Observed(), pb.PHASE_STARTING, 1, True),
    (pb.PHASE_ERROR, RUN, False, Observed(live=1), pb.PHASE_ERROR, 0, False),
    (pb.PHASE_ERROR, RUN, False, Observed(), pb.PHASE_ERROR, 0, False),
    (pb.PHASE_ERROR, RUN, True, Observed(), pb.PHASE_STARTING, 1, True),
    (pb.PHASE_ERROR, RUN, True, Observed(live=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_ERROR, STOP, False, Observed(live=1), pb.PHASE_STOPPING, 0, False),
    (pb.PHASE_ERROR, STOP, False, Observed(), pb.PHASE_STOPPED, 0, False),
]


@pytest.mark.parametrize(("phase", "desired", "pending", "observed", "nxt", "target", "started"), CASES)
def test_reconcile_transition(phase, desired, pending, observed, nxt, target, started):
    wf = wf_in(phase, desired, nonce=1 if pending else 0)
    applied = None if phase == pb.PHASE_STOPPED else applied_of(wf)
    out = reconcile(wf, applied, observed, NOW)
    assert (out.status.phase, out.target_workers, out.started) == (nxt, target, started)
    if started:
        assert out.status.applied_generation == wf.generation
        assert out.status.applied_restart_nonce == wf.spec.restart_nonce
        assert not out.status.HasField("last_error")


def test_every_phase_and_desired_state_is_covered():
    covered = {(c[0], c[1]) for c in CASES}
    phases = [pb.PHASE_STOPPED, pb.PHASE_STARTING, pb.PHASE_RUNNING, pb.PHASE_STOPPING, pb.PHASE_ERROR]
    assert covered == {(p, d) for p in phases for d in (RUN, STOP)}


def test_error_keeps_reason_and_sets_degraded():
    wf = wf_in(pb.PHASE_RUNNING, RUN)
    out = reconcile(wf, applied_of(wf), Observed(failure=WorkerFailure("CRASH_LOOP", "worker 0 died")), NOW)
    assert out.status.last_error.reason == "CRASH_LOOP"
    degraded = {c.type: c for c in out.status.conditions}["Degraded"]
    assert (degraded.status, degraded.reason) == ("True", "CRASH_LOOP")


def test_phase_time_changes_only_on_transition():
    wf = wf_in(pb.PHASE_RUNNING, RUN)
    wf.status.phase_time.FromDatetime(NOW)
    later = NOW.replace(hour=5)
    out = reconcile(wf, applied_of(wf), Observed(live=1, ready=1), later)
    assert out.status.phase_time.ToDatetime(tzinfo=UTC) == NOW


@pytest.mark.parametrize(("phase", "desired", "allowed"), [
    (pb.PHASE_STOPPED, STOP, True), (pb.PHASE_ERROR, RUN, True), (pb.PHASE_ERROR, STOP, False),
    (pb.PHASE_STOPPED, RUN, False), (pb.PHASE_STARTING, RUN, False), (pb.PHASE_RUNNING, RUN, False),
    (pb.PHASE_STOPPING, STOP, False), (pb.PHASE_RUNNING, STOP, False),
])
def test_start(phase, desired, allowed):
    wf = wf_in(phase, desired)
    if not allowed:
        with pytest.raises(FailedPrecondition) as exc:
            request_start(wf)
        assert exc.value.phase in exc.value.message
        return
    spec = request_start(wf)
    assert spec.desired_state == RUN
    nwf = pb.Workflow()
    nwf.CopyFrom(wf)
    nwf.spec.CopyFrom(spec)
    assert effective_phase(nwf) == pb.PHASE_STARTING


@pytest.mark.parametrize(("phase", "desired", "allowed"), [
    (pb.PHASE_RUNNING, RUN, True), (pb.PHASE_STARTING, RUN, True), (pb.PHASE_ERROR, RUN, True),
    (pb.PHASE_STOPPED, RUN, True),  # a start not yet picked up can be taken back
    (pb.PHASE_STOPPED, STOP, False), (pb.PHASE_STOPPING, STOP, False), (pb.PHASE_RUNNING, STOP, False),
])
def test_stop(phase, desired, allowed):
    wf = wf_in(phase, desired)
    if allowed:
        assert request_stop(wf).desired_state == STOP
    else:
        with pytest.raises(FailedPrecondition, match="cannot stop"):
            request_stop(wf)


def test_restart_bumps_nonce_and_is_refused_when_stopped():
    wf = wf_in(pb.PHASE_RUNNING, RUN, nonce=3, applied_nonce=3)
    assert request_restart(wf).restart_nonce == 4
    with pytest.raises(FailedPrecondition, match="STOPPED"):
        request_restart(wf_in(pb.PHASE_STOPPED, STOP))


def test_double_click_start_is_refused():
    wf = wf_in(pb.PHASE_STOPPED, STOP)
    wf.spec.CopyFrom(request_start(wf))
    with pytest.raises(FailedPrecondition, match="STARTING"):
        request_start(wf)


def test_preconditions():
    wf = wf_in(pb.PHASE_RUNNING, RUN)
    with pytest.raises(Aborted):
        check_preconditions(wf, "999", 0)
    with pytest.raises(FailedPrecondition, match="expected phase STOPPED"):
        check_preconditions(wf, "", pb.PHASE_STOPPED)
    check_preconditions(wf, wf.etag, pb.PHASE_RUNNING)


def _with_replay(request_id: str) -> pb.WorkflowSpec:
    s = pb.WorkflowSpec()
    s.CopyFrom(workflow().spec)
    s.ingress.replay.source_table = "contact"
    s.ingress.replay.request_id = request_id
    return s


@pytest.mark.parametrize(("backlog", "rows", "refused"), [
    (0, 0, False), (1_999_999, 1_999_999, False), (2_000_000, 0, True), (0, 2_000_000, True)])
def test_replay_is_refused_at_two_million_backlog_or_table_rows(backlog, rows, refused):
    wf = workflow()
    wf.status.backlog = backlog
    wf.status.tables.add(source_table="contact", rows=rows)
    wf.status.tables.add(source_table="other", rows=5_000_000)  # another table's size does not matter
    if refused:
        with pytest.raises(FailedPrecondition) as err:
            check_replay(wf, _with_replay("r1"))
        assert err.value.reason == "REPLAY_REFUSED" and "2,000,000" in str(err.value)
    else:
        check_replay(wf, _with_replay("r1"))


def test_an_unchanged_replay_request_is_not_checked_again():
    wf = workflow()
    wf.spec.CopyFrom(_with_replay("r1"))
    wf.status.backlog = 3_000_000
    check_replay(wf, _with_replay("r1"))  # an edit of something else must not be refused
