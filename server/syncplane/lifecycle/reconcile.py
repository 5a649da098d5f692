"""The reconcile decision: one pure function, two drivers.

Given a workflow (spec + status), the spec snapshot its workers were started
with, and what the driver observed about those workers, decide the next
status, whether to snapshot the current spec (a start), and how many workers
should run. The embedded supervisor and the kopf operator both call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.lifecycle.drift import changed_fields, spec_hash
from syncplane.lifecycle.transitions import current_phase, restart_pending

RUNNING = pb.DESIRED_STATE_RUNNING


@dataclass(frozen=True)
class WorkerFailure:
    """Something retrying will not fix: a crash loop, a fatal worker error."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """What a driver saw of a workflow's workers."""

    live: int = 0                 # worker processes or pods that exist, draining included
    ready: int = 0                # live workers that report ready at the applied generation
    failure: WorkerFailure | None = None
    backlog: int = 0
    counters: pb.Counters = field(default_factory=pb.Counters)
    tables: dict[str, int] = field(default_factory=dict)  # rows per source table, when known
    degraded: str = ""            # e.g. a worker restarting after a crash
    dead_letters: int | None = None  # records in the dead-letter store; None: not counted yet


@dataclass(frozen=True)
class Outcome:
    status: pb.WorkflowStatus
    # The spec to record as applied (a start happened), else None.
    apply: pb.WorkflowSpec | None
    # Workers that should exist; 0 means stop (drain) all of them.
    target_workers: int

    @property
    def started(self) -> bool:
        return self.apply is not None


def reconcile(wf: pb.Workflow, applied: pb.WorkflowSpec | None, observed: Observed,
              now: datetime) -> Outcome:
    phase = current_phase(wf)
    status = pb.WorkflowStatus()
    status.CopyFrom(wf.status)
    status.observed_generation = wf.generation
    apply: pb.WorkflowSpec | None = None
    running_workers = applied.workers if applied is not None else 0

    def start() -> tuple[pb.Phase.ValueType, int]:
        nonlocal apply, applied
        apply = pb.WorkflowSpec()
        apply.CopyFrom(wf.spec)
        applied = apply
        status.applied_generation = wf.generation
        status.applied_restart_nonce = wf.spec.restart_nonce
        status.applied_spec_hash = spec_hash(apply)
        status.ClearField("last_error")
        return pb.PHASE_STARTING, apply.workers

    nxt: pb.Phase.ValueType
    if wf.spec.desired_state != RUNNING:
        nxt, target = (pb.PHASE_STOPPING if observed.live else pb.PHASE_STOPPED), 0
    elif phase == pb.PHASE_ERROR and not restart_pending(wf):
        nxt, target = pb.PHASE_ERROR, 0
    elif phase in (pb.PHASE_STOPPED, pb.PHASE_ERROR, pb.PHASE_STOPPING):
        nxt, target = (pb.PHASE_STOPPING, 0) if observed.live else start()
    elif restart_pending(wf):
        nxt, target = pb.PHASE_STOPPING, 0
    elif observed.failure is not None:
        nxt, target = pb.PHASE_ERROR, 0
        status.last_error.reason = observed.failure.reason
        status.last_error.message = observed.failure.message
        status.last_error.time.FromDatetime(now)
    elif observed.ready >= running_workers > 0:
        nxt, target = pb.PHASE_RUNNING, running_workers
    else:
        nxt, target = pb.Phase.ValueType(phase), running_workers

    if nxt != phase or not status.HasField("phase_time"):
        status.phase_time.FromDatetime(now)
    status.phase = nxt
    _observe(status, observed, target, nxt)
    _drift(status, wf.spec, applied, nxt)
    _conditions(status, observed, nxt, now)
    return Outcome(status=status, apply=apply, target_workers=target)


def _observe(status: pb.WorkflowStatus, observed: Observed, target: int, phase: int) -> None:
    status.desired_workers = target
    status.ready_workers = observed.ready if target else 0
    if observed.live or phase != pb.PHASE_STOPPED:
        status.backlog = observed.backlog
        status.counters.CopyFrom(observed.counters)
    else:
        status.counters.records_per_second = 0.0
    if observed.dead_letters is not None:  # kept while stopped: stopping does not clear them
        status.dead_letters = observed.dead_letters
    if observed.tables:  # kept while stopped: a replay request is checked against it
        known = {t.source_table: t.rows for t in status.tables}
        known.update(observed.tables)
        del status.tables[:]
        status.tables.extend(pb.TableRows(source_table=k, rows=v) for k, v in sorted(known.items()))


def _drift(status: pb.WorkflowStatus, spec: pb.WorkflowSpec, applied: pb.WorkflowSpec | None,
           phase: int) -> None:
    status.ClearField("drift")
    if applied is None or phase == pb.PHASE_STOPPED or spec_hash(spec) == spec_hash(applied):
        return
    status.drift.detected = True
    status.drift.changed_fields.extend(changed_fields(applied, spec))


def _conditions(status: pb.WorkflowStatus, observed: Observed, phase: int, now: datetime) -> None:
    ready = phase == pb.PHASE_RUNNING
    set_condition(status, "Ready", ready, "WorkersReady" if ready else phase_label(phase),
                  f"{status.ready_workers}/{status.desired_workers} workers ready", now)
    set_condition(status, "SpecDrift", status.drift.detected,
                  "RestartRequired" if status.drift.detected else "UpToDate",
                  ("edited fields apply at the next start: " + ", ".join(status.drift.changed_fields))
                  if status.drift.detected else "the workers run the latest spec", now)
    degraded = phase == pb.PHASE_ERROR or bool(observed.degraded)
    message = status.last_error.message if phase == pb.PHASE_ERROR else observed.degraded
    reason = (status.last_error.reason if phase == pb.PHASE_ERROR else "WorkerRestarting") if degraded \
        else "AsExpected"
    set_condition(status, "Degraded", degraded, reason, message, now)


def phase_label(phase: int) -> str:
    return pb.Phase.Name(pb.Phase.ValueType(phase)).removeprefix("PHASE_").title()


def set_condition(status: pb.WorkflowStatus, ctype: str, value: bool, reason: str, message: str,
                  now: datetime) -> None:
    text = "True" if value else "False"
    for cond in status.conditions:
        if cond.type == ctype:
            if cond.status != text:
                cond.last_transition_time.FromDatetime(now)
            cond.status, cond.reason, cond.message = text, reason, message
            return
    cond = status.conditions.add(type=ctype, status=text, reason=reason, message=message)
    cond.last_transition_time.FromDatetime(now)
