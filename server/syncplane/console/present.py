"""What the console shows of a workflow: pure functions from the resource to plain dicts.

The same dict renders a row on the server (templates) and updates it in the browser (the
server-sent events carry it), so a row looks the same whichever drew it. Times are ISO 8601
in UTC; the browser shows them in its own time zone.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

from google.protobuf import timestamp_pb2

from syncplane.lifecycle import effective_phase
from syncplane.lifecycle.transitions import START_FROM, STOP_FROM
from syncplane.proto.enums import enum_short_name, phase_name
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.validation.rules import MAX_REPLAY_ROWS

PHASES = ("STOPPED", "STARTING", "RUNNING", "STOPPING", "ERROR")
DRIFT_NOTE = "applies at the next start"


def iso(ts: timestamp_pb2.Timestamp) -> str:
    """``2026-11-29T12:00:00.123Z`` (milliseconds), or "" for an unset timestamp."""
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def workflow_id(wf: pb.Workflow) -> str:
    return wf.name.split("/", 1)[-1]


def condition(wf: pb.Workflow, ctype: str) -> pb.Condition | None:
    return next((c for c in wf.status.conditions if c.type == ctype), None)


def degraded(wf: pb.Workflow) -> str:
    """The Degraded condition's reason (and message) while it is True, else ""."""
    cond = condition(wf, "Degraded")
    if cond is None or cond.status != "True":
        return ""
    return f"{cond.reason}: {cond.message}" if cond.message else cond.reason


def toggle(wf: pb.Workflow) -> dict[str, Any]:
    """The Start/Stop toggle: Stop while RUNNING is desired, Start otherwise; enabled only when
    the lifecycle core allows that transition from the effective phase, which is also the
    expected phase the click sends (so a second click of the same toggle is refused)."""
    phase = effective_phase(wf)
    action = "stop" if wf.spec.desired_state == pb.DESIRED_STATE_RUNNING else "start"
    allowed = START_FROM if action == "start" else STOP_FROM
    return {"action": action, "enabled": phase in allowed, "expectedPhase": phase_name(phase)}


def drift_tooltip(fields: list[str]) -> str:
    return f"Edited: {', '.join(fields)}; {DRIFT_NOTE}" if fields else ""


def row(wf: pb.Workflow) -> dict[str, Any]:
    """One row of the Workflows page (and the head of the workflow page)."""
    s = wf.status
    fields = list(s.drift.changed_fields) if s.drift.detected else []
    return {
        "id": workflow_id(wf), "name": wf.name, "etag": wf.etag, "generation": wf.generation,
        "type": enum_short_name(pb.WorkflowType.DESCRIPTOR, wf.spec.type),
        "phase": phase_name(s.phase or pb.PHASE_STOPPED), "phaseSince": iso(s.phase_time),
        "backlog": s.backlog, "recordsPerSecond": round(s.counters.records_per_second, 1),
        "deadLetters": s.dead_letters, "created": iso(wf.create_time), "degraded": degraded(wf),
        "observedGeneration": s.observed_generation, "appliedGeneration": s.applied_generation,
        "drift": fields, "driftTooltip": drift_tooltip(fields), "toggle": toggle(wf),
    }


def live(wf: pb.Workflow) -> dict[str, Any]:
    """The workflow page's status beyond the row, which its event stream (``/events?name=``) also
    carries so the page updates it live: conditions, last error, workers ready/desired, counters
    (records) and per-table row counts of the last full read."""
    s = wf.status
    return {
        "conditions": [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
                        "since": iso(c.last_transition_time)} for c in s.conditions],
        "lastError": {"reason": s.last_error.reason, "message": s.last_error.message,
                      "time": iso(s.last_error.time)} if s.last_error.reason or s.last_error.message else None,
        "readyWorkers": s.ready_workers, "desiredWorkers": s.desired_workers,
        "counters": {"read": s.counters.read, "written": s.counters.written, "failed": s.counters.failed,
                     "deadLettered": s.counters.dead_lettered},
        "tables": [{"table": t.source_table, "rows": t.rows, "stale": t.stale} for t in s.tables],
    }


def detail(wf: pb.Workflow, diff: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    """The workflow page: the row, its live status (`live`), the spec's source tables, the drift
    diff (path, applied value, edited value), the replay limit and the last verify."""
    return {
        **row(wf), **live(wf),
        "sourceTables": [e.source_table for e in wf.spec.ingress.entities],
        "diff": [{"field": path, "applied": old, "edited": new} for path, old, new in diff],
        "replayLimit": MAX_REPLAY_ROWS,
        "verify": verify(wf),
    }


def verify(wf: pb.Workflow) -> dict[str, Any] | None:
    """The last `syncplane verify` summary (status.last_verify), or None if never run."""
    v = wf.status.last_verify
    if not v.HasField("verify_time"):
        return None
    c = v.counts
    return {"time": iso(v.verify_time), "compared": c.compared, "missing": c.missing, "extra": c.extra,
            "different": c.different, "inFlight": c.in_flight, "foreign": c.foreign,
            "held": c.held, "repairRequested": v.repair_requested}
