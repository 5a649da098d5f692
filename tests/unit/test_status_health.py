"""A status that never hides a stall: the pure rules both backends share.

Degraded while RUNNING (a failing link past the threshold, a stalled backlog), the live
records/s figure, and the automatic restart of an ERROR whose cause is outside the spec.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.connectors.http import LinkHealth
from syncplane.contract.report import RATE_WINDOW, Throughput, WorkerReport
from syncplane.lifecycle import Observed, Policy, Trouble, WorkerFailure, reconcile, restartable
from syncplane.lifecycle.reports import totals, troubles
from syncplane.proto.v1 import workflow_pb2 as pb
from tests.factories import workflow

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
POLICY = Policy(degraded_after=60.0, restart_backoff=5.0, restart_backoff_cap=300.0)


def running() -> tuple[pb.Workflow, pb.WorkflowSpec]:
    wf = workflow()
    wf.spec.desired_state = pb.DESIRED_STATE_RUNNING
    wf.status.phase = pb.PHASE_RUNNING
    applied = pb.WorkflowSpec()
    applied.CopyFrom(wf.spec)
    return wf, applied


def condition(status: pb.WorkflowStatus, ctype: str) -> pb.Condition:
    return next(c for c in status.conditions if c.type == ctype)


def link(failing_for: float | None, status: int | None = 503, error: str = "GET /contacts: HTTP 503") -> dict:
    if failing_for is None:
        return {"failing_since": None, "error": "", "status": None, "throttled": False}
    return {"failing_since": NOW.timestamp() - failing_for, "error": error, "status": status,
            "throttled": status == 429}


# (link name, HTTP status of the failure or None for no answer) -> reason
LINK_CASES = [
    ("source", 503, "SOURCE_UNAVAILABLE"),
    ("source", None, "SOURCE_UNAVAILABLE"),       # connection refused, timeout
    ("source", 429, "SOURCE_THROTTLED"),
    ("destination", 503, "DESTINATION_UNAVAILABLE"),
    ("destination", 500, "DESTINATION_UNAVAILABLE"),
    ("destination", 429, "DESTINATION_THROTTLED"),
    ("state_store", None, "STATE_STORE_UNAVAILABLE"),
]


@pytest.mark.parametrize(("name", "http_status", "reason"), LINK_CASES)
def test_a_failing_link_past_the_threshold_is_degraded_and_stays_running(name, http_status, reason):
    wf, applied = running()
    report = {"backlog": 0, "links": {name: link(61.0, http_status)}}
    summed = totals([report])
    out = reconcile(wf, applied, Observed(live=1, ready=1, trouble=summed.trouble), NOW, POLICY)
    assert out.status.phase == pb.PHASE_RUNNING and out.target_workers == 1
    degraded = condition(out.status, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", reason)
    assert out.status.degradation.reason == reason
    assert out.status.degradation.message
    assert out.status.degradation.time.ToDatetime(tzinfo=UTC) == NOW - timedelta(seconds=61)
    # Records flow again: the link's next answer clears it, and so does the status.
    wf.status.CopyFrom(out.status)
    healthy = totals([{"links": {name: link(None)}}])
    out = reconcile(wf, applied, Observed(live=1, ready=1, trouble=healthy.trouble), NOW, POLICY)
    assert condition(out.status, "Degraded").status == "False"
    assert not out.status.HasField("degradation")


@pytest.mark.parametrize(("name", "http_status", "reason"), LINK_CASES)
def test_a_failure_shorter_than_the_threshold_is_not_degraded(name, http_status, reason):
    wf, applied = running()
    summed = totals([{"links": {name: link(59.0, http_status)}}])
    out = reconcile(wf, applied, Observed(live=1, ready=1, trouble=summed.trouble), NOW, POLICY)
    assert condition(out.status, "Degraded").status == "False"


@pytest.mark.parametrize(("backlog", "waited", "stalled"), [
    (10, 61.0, True), (10, 59.0, False), (0, 600.0, False), (1, 3600.0, True)])
def test_a_backlog_with_nothing_written_is_stalled(backlog, waited, stalled):
    wf, applied = running()
    summed = totals([{"backlog": backlog, "waiting_since": NOW.timestamp() - waited}])
    out = reconcile(wf, applied, Observed(live=1, ready=1, backlog=summed.backlog,
                                          waiting_since=summed.waiting_since), NOW, POLICY)
    degraded = condition(out.status, "Degraded")
    assert degraded.status == ("True" if stalled else "False")
    if stalled:
        assert degraded.reason == "STALLED" == out.status.degradation.reason
    assert out.status.phase == pb.PHASE_RUNNING


def test_a_failing_link_names_the_reason_rather_than_stalled():
    wf, applied = running()
    summed = totals([{"backlog": 5, "waiting_since": NOW.timestamp() - 120,
                      "links": {"destination": link(90.0, 429)}}])
    out = reconcile(wf, applied, Observed(live=1, ready=1, backlog=5, trouble=summed.trouble,
                                          waiting_since=summed.waiting_since), NOW, POLICY)
    assert out.status.degradation.reason == "DESTINATION_THROTTLED"


def test_the_oldest_trouble_of_any_worker_wins():
    a = {"links": {"source": link(70.0)}}
    b = {"links": {"destination": link(200.0, 429)}}
    assert totals([a, b]).trouble.reason == "DESTINATION_THROTTLED"  # type: ignore[union-attr]
    assert troubles({"links": "garbage"}) == []


def test_link_health_of_the_transport_feeds_the_report():
    health = LinkHealth()
    health.failed("GET /x: HTTP 503", 503)
    first = health.failing_since
    health.failed("GET /x: ClientConnectorError", None)
    assert health.failing_since == first and health.status is None and not health.throttled
    report = WorkerReport("wf", 0, 1, links={"source": health})
    assert troubles(report.to_json())[0].reason == "SOURCE_UNAVAILABLE"
    health.succeeded()
    assert troubles(report.to_json()) == []


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_records_per_second_is_live_and_falls_to_zero():
    clock = FakeClock()
    rate = Throughput(clock)
    clock.t += 20
    for _ in range(10):
        rate.add(100)
        clock.t += 1
    assert rate.per_second() == pytest.approx(100.0)
    clock.t += RATE_WINDOW + 1
    assert rate.per_second() == 0.0


def test_the_rate_window_stays_small_however_many_records_are_written():
    """Every report (each /status poll, each heartbeat) serialises the window: its size must not
    grow with the records written in it."""
    clock = FakeClock()
    rate = Throughput(clock)
    for i in range(50_000):
        rate.add(1)
        clock.t += 0.0002 * (i % 7)   # many writes per second, at uneven moments
    assert rate.per_second() > 0
    assert len(WorkerReport("wf", 0, 1, rate=rate).to_json()) > 0
    assert len(rate._samples) <= RATE_WINDOW + 2


# -- automatic restarts from ERROR ------------------------------------------------------------

SPEC_REASONS = ["FIELD_NOT_FOUND", "SCHEMA_CHANGED", "CRASH_LOOP", "NOT_FOUND", "INTERNAL"]
OUTSIDE_REASONS = ["BAD_CREDENTIALS", "UNAUTHORIZED", "FORBIDDEN"]
STEPS = st.lists(st.tuples(st.floats(min_value=0.0, max_value=400.0), st.integers(0, 1), st.booleans()),
                 max_size=30)


@settings(max_examples=300, deadline=None)
@given(reason=st.sampled_from(SPEC_REASONS + OUTSIDE_REASONS), steps=STEPS)
def test_only_errors_from_outside_the_spec_restart_by_themselves_with_capped_backoff(reason, steps):
    """Random time steps, live workers and worker failures: a spec error stays ERROR until the
    user restarts; an error from outside restarts with the same applied spec once its backoff
    (doubling, capped) is over and no failed worker is left, and counts its attempts."""
    wf, applied = running()
    wf.status.phase = pb.PHASE_STARTING
    now = NOW
    out = reconcile(wf, applied, Observed(live=1, failure=WorkerFailure(reason, "x")), now, POLICY)
    assert out.status.phase == pb.PHASE_ERROR
    wf.status.CopyFrom(out.status)
    restarts = 0
    for advance, live, fails_again in steps:
        now += timedelta(seconds=advance)
        before = wf.status
        phase = before.phase
        failure = WorkerFailure(reason, "again") if phase == pb.PHASE_STARTING and fails_again else None
        out = reconcile(wf, applied, Observed(live=live, failure=failure), now, POLICY)
        st_ = out.status
        assert out.apply is None, "an automatic restart never applies edits"
        assert st_.applied_generation == before.applied_generation
        if phase == pb.PHASE_ERROR:
            if not restartable(reason):
                assert st_.phase == pb.PHASE_ERROR and not out.restarted
                assert not st_.HasField("auto_restart")
            else:
                due = before.auto_restart.next_restart_time.ToDatetime(tzinfo=UTC)
                assert out.restarted == (now >= due and live == 0)
                if out.restarted:
                    restarts += 1
                    assert st_.phase == pb.PHASE_STARTING and out.target_workers == applied.workers
                    assert st_.auto_restart.count == restarts
                    assert st_.last_error.reason == reason  # still says why it restarted
                else:
                    assert st_.phase == pb.PHASE_ERROR and out.target_workers == 0
        if st_.phase == pb.PHASE_ERROR and restartable(reason):
            due = st_.auto_restart.next_restart_time.ToDatetime(tzinfo=UTC)
            if phase != pb.PHASE_ERROR:  # just failed: scheduled after the backoff of its attempt
                assert due - now == timedelta(seconds=POLICY.restart_delay(st_.auto_restart.count))
            assert due - now <= timedelta(seconds=POLICY.restart_backoff_cap)  # past due: waits for live == 0
            assert "automatic restart" in condition(st_, "Degraded").message
        wf.status.CopyFrom(st_)


def test_restart_backoff_doubles_up_to_the_cap():
    delays = [POLICY.restart_delay(n) for n in range(12)]
    assert delays[:4] == [5.0, 10.0, 20.0, 40.0]
    assert max(delays) == POLICY.restart_backoff_cap == delays[-1]
    assert delays == sorted(delays)


def test_a_restarted_workflow_that_reaches_running_counts_afresh():
    wf, applied = running()
    wf.status.phase = pb.PHASE_STARTING
    wf.status.auto_restart.count = 3
    wf.status.last_error.reason = "BAD_CREDENTIALS"
    out = reconcile(wf, applied, Observed(live=1, ready=1), NOW, POLICY)
    assert out.status.phase == pb.PHASE_RUNNING
    assert not out.status.HasField("auto_restart") and not out.status.last_error.reason


def test_a_stop_or_a_user_restart_clears_automatic_restarts():
    wf, applied = running()
    wf.status.phase = pb.PHASE_ERROR
    wf.status.last_error.reason = "BAD_CREDENTIALS"
    wf.status.auto_restart.count = 2
    wf.spec.desired_state = pb.DESIRED_STATE_STOPPED
    assert not reconcile(wf, applied, Observed(), NOW, POLICY).status.HasField("auto_restart")
    wf.spec.desired_state = pb.DESIRED_STATE_RUNNING
    wf.spec.restart_nonce += 1
    out = reconcile(wf, applied, Observed(), NOW, POLICY)
    assert out.started and not out.status.HasField("auto_restart")


def test_degradation_reason_is_kept_only_while_running():
    wf, applied = running()
    wf.status.phase = pb.PHASE_STARTING
    trouble = Trouble("SOURCE_UNAVAILABLE", "x", NOW.timestamp() - 600)
    out = reconcile(wf, applied, Observed(live=1, trouble=trouble), NOW, POLICY)
    assert not out.status.HasField("degradation")


def test_stale_records_per_table_reach_the_status_and_stay_while_stopped():
    """A full re-read with deletes off leaves records the source no longer has: the workers count
    them per table; the status shows them beside the table's rows, kept while the workflow stops."""
    wf, applied = running()
    summed = totals([{"tables": {"contact": 30}, "stale": {"contact": 2}}, {"stale": {"new_loyaltycard": 1}}])
    assert summed.stale == {"contact": 2, "new_loyaltycard": 1}
    out = reconcile(wf, applied, Observed(live=1, ready=1, tables=summed.tables, stale=summed.stale), NOW, POLICY)
    assert [(t.source_table, t.rows, t.stale) for t in out.status.tables] == [("contact", 30, 2),
                                                                              ("new_loyaltycard", 0, 1)]
    wf.status.CopyFrom(out.status)
    out = reconcile(wf, applied, Observed(live=1, ready=1), NOW, POLICY)  # nothing reported: kept
    assert [(t.source_table, t.rows, t.stale) for t in out.status.tables] == [("contact", 30, 2),
                                                                              ("new_loyaltycard", 0, 1)]
