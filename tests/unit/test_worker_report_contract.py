"""The worker report is one contract read the same way by both drivers: what a worker writes
(`WorkerReport.to_json`) is what the supervisor and the operator read back (`WorkerReport.from_json`,
`ready_at`, `fatal_at`, `draining`), never a key that no worker writes."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.contract.report import Counters, WorkerReport
from syncplane.worker.platform.kubernetes import lease_body
from syncplane_operator.observe import STALE_AFTER_SECONDS, observe

NOW = datetime(2026, 1, 1, tzinfo=UTC)
FATAL = {"reason": "BAD_CREDENTIALS", "message": "401 from the token endpoint"}


def stale_lease(phase: str, generation: int = 3, fatal: dict[str, str] | None = None) -> dict:
    report = WorkerReport(workflow="wf", index=0, generation=generation, ready=phase == "RUNNING", phase=phase)
    report.fatal = fatal
    return lease_body("wf-pod", "wf", report, NOW - timedelta(seconds=STALE_AFTER_SECONDS + 60))


@pytest.mark.parametrize(("phase", "generation", "fatal", "failure"), [
    ("STARTING", 3, None, "HEARTBEAT_STALE"),
    ("RUNNING", 3, None, "HEARTBEAT_STALE"),
    # A worker that was draining when it last reported stopped on purpose: its silence is no failure.
    ("DRAINING", 3, None, None),
    ("FATAL", 3, FATAL, "BAD_CREDENTIALS"),
    # An older generation's worker is being replaced: neither its silence nor its fatal error counts.
    ("RUNNING", 2, None, None),
    ("FATAL", 2, FATAL, None),
])
def test_a_stale_heartbeat_is_read_by_what_the_worker_last_reported(
        phase: str, generation: int, fatal: dict[str, str] | None, failure: str | None) -> None:
    observed = observe({"status": {"replicas": 1, "availableReplicas": 1}}, [{}],
                       [stale_lease(phase, generation, fatal)], 3, NOW)
    assert (observed.failure.reason if observed.failure else None) == failure
    assert observed.ready == 0


reports = st.builds(
    WorkerReport, workflow=st.text(max_size=8), index=st.integers(0, 50), generation=st.integers(0, 10**6),
    pid=st.integers(1, 2**22), ready=st.booleans(),
    phase=st.sampled_from(["STARTING", "RUNNING", "DRAINING", "FATAL"]), backlog=st.integers(0, 10**7),
    counters=st.builds(Counters, *(st.integers(0, 10**9) for _ in fields(Counters))),
    truncated=st.integers(0, 10**6), resyncs=st.integers(0, 100), held=st.integers(0, 10**6),
    tables=st.dictionaries(st.text(max_size=8), st.integers(0, 10**7), max_size=3),
    stale_deleted=st.integers(0, 10**6), stale=st.dictionaries(st.text(max_size=8), st.integers(0, 10**6), max_size=3),
    dead_letters=st.integers(-1, 10**6), dead_letter_store=st.text(max_size=8),
    last_error=st.none() | st.fixed_dictionaries({"reason": st.text(max_size=8), "message": st.text(max_size=20)}),
    fatal=st.none() | st.fixed_dictionaries({"reason": st.text(max_size=8), "message": st.text(max_size=20)}),
    started_at=st.floats(0, 2e9), waiting_since=st.none() | st.floats(0, 2e9),
    links=st.dictionaries(st.sampled_from(["source", "destination", "state_store"]),
                          st.fixed_dictionaries({"failing_since": st.none() | st.floats(0, 2e9),
                                                 "error": st.text(max_size=10)}), max_size=3))


@settings(deadline=None)
@given(reports, st.integers(0, 10**6))
def test_a_report_reads_back_as_written(report: WorkerReport, generation: int) -> None:
    written = json.loads(json.dumps(report.to_json()))   # as it crosses HTTP or a Lease annotation
    read = WorkerReport.from_json(written)
    assert read.to_json() | {"records_per_second": 0.0} == written | {"records_per_second": 0.0}
    assert read.ready_at(generation) == (report.ready and report.generation == generation)
    expected = (report.fatal["reason"], report.fatal["message"]) if report.fatal else None
    assert read.fatal_at(generation) == (expected if report.generation == generation else None)
    assert read.draining == (report.phase == "DRAINING")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)
keys = st.sampled_from([f.name for f in fields(WorkerReport)] + ["reason", "message", "read", "x"])


@settings(deadline=None)
@given(st.dictionaries(keys, json_values, max_size=8) | json_values)
def test_any_json_reads_as_a_report_without_raising(data: object) -> None:
    """A report is read from another process (a Lease annotation anyone with RBAC could edit):
    whatever its shape, it reads as a report, never ready or fatal by accident of a type."""
    read = WorkerReport.from_json(data)
    assert isinstance(read.generation, int) and isinstance(read.ready, bool)
    if not (isinstance(data, dict) and data.get("ready") is True):
        assert not read.ready_at(read.generation)
    fatal = read.fatal_at(read.generation)
    assert fatal is None or all(isinstance(s, str) for s in fatal)


# (phase, ready) set in turn on a new report (STARTING, not ready), and how many of them changed it.
PHASE_SEQUENCES = [
    pytest.param([("RUNNING", True)], 1, id="ready"),
    pytest.param([("RUNNING", True), ("RUNNING", True)], 1, id="ready, repeated"),
    pytest.param([("STARTING", False)], 0, id="the phase it has already"),
    pytest.param([("RUNNING", True), ("RUNNING", False)], 2, id="readiness alone changes"),
    pytest.param([("RUNNING", True), ("DRAINING", False), ("DRAINING", False)], 2, id="draining, repeated"),
    pytest.param([("FATAL", False), ("FATAL", False), ("DRAINING", False)], 2, id="fatal twice, then draining"),
]


@pytest.mark.parametrize(("sequence", "changes"), PHASE_SEQUENCES)
def test_phase_listeners_fire_once_per_change_not_on_a_repeat(sequence: list[tuple[str, bool]],
                                                              changes: int) -> None:
    report = WorkerReport(workflow="wf", index=0, generation=1)
    seen: list[tuple[str, bool]] = []
    report.on_phase_change(lambda: seen.append((report.phase, report.ready)))
    for phase, ready in sequence:
        report.set_phase(phase, ready=ready)
    assert len(seen) == changes
    before = [("STARTING", False), *sequence[:-1]]
    assert seen == [now for was, now in zip(before, sequence, strict=True) if now != was]  # each saw the new values
    assert (report.phase, report.ready) == sequence[-1]
