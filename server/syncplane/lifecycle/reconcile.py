"""The reconcile decision: one pure function, two drivers.

Given a workflow (spec + status), the spec snapshot its workers were started
with, and what the driver observed about those workers, decide the next
status, whether to snapshot the current spec (a start), and how many workers
should run. The embedded supervisor and the kopf operator both call it.

Two status rules live here so that both backends show the same thing:

- **Degraded while RUNNING**: a transient failure (a vendor API or the state
  store failing, :class:`Trouble`) that has lasted ``Policy.degraded_after``
  seconds, or a backlog with nothing written for as long (``STALLED``), sets
  ``status.degradation`` and ``Degraded=True``; the phase stays RUNNING, as
  retrying goes on. Both clear when records flow again.
- **Automatic restart from ERROR**: an error whose cause lies outside the spec
  (:data:`RESTARTABLE_REASONS`: a missing Secret, rejected credentials, a
  missing privilege) is retried with the same applied spec after
  a capped exponential backoff (``status.auto_restart``, as Strimzi does for
  connectors). An error caused by the spec (a bad mapping, a schema change, a
  crash loop) stays until the user restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from syncplane.lifecycle.drift import changed_fields, spec_hash
from syncplane.lifecycle.transitions import current_phase, restart_pending
from syncplane.proto.v1 import workflow_pb2 as pb

RUNNING = pb.DESIRED_STATE_RUNNING

#: ERROR reasons whose cause is outside the spec: fixing it (creating the Secret, granting
#: access, the endpoint coming back) needs no edit, so the workflow restarts by itself.
RESTARTABLE_REASONS = frozenset({
    "BAD_CREDENTIALS",       # a referenced Secret is missing or unreadable, or the token endpoint refused it
    "UNAUTHORIZED",          # the API refused the token
    "FORBIDDEN",             # the client lacks a privilege
})
STALLED = "STALLED"


@dataclass(frozen=True)
class Policy:
    """The drivers' tunables of the status rules, in seconds."""

    degraded_after: float = 60.0         # a transient failure or a stall lasting this long is Degraded
    restart_backoff: float = 5.0         # first automatic restart from ERROR after this long ...
    restart_backoff_cap: float = 300.0   # ... doubling each time, up to this

    def restart_delay(self, restarts: int) -> float:
        """Seconds before automatic restart number ``restarts + 1``."""
        return float(min(self.restart_backoff_cap, self.restart_backoff * 2.0 ** min(max(0, restarts), 32)))


DEFAULT_POLICY = Policy()


@dataclass(frozen=True)
class Trouble:
    """A transient failure the workers keep retrying: which link, since when (epoch seconds)."""

    reason: str                   # e.g. SOURCE_UNAVAILABLE, DESTINATION_THROTTLED, STATE_STORE_UNAVAILABLE
    message: str
    since: float


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
    stale: dict[str, int] = field(default_factory=dict)   # per source table: left at the destination
    degraded: str = ""            # e.g. a worker restarting after a crash
    dead_letters: int | None = None  # records in the dead-letter store; None: not counted yet
    trouble: Trouble | None = None   # the longest-lasting transient failure of any worker
    # Since when (epoch seconds) records have waited in a backlog with none written; None: no backlog.
    waiting_since: float | None = None
    # "source" / "destination" → (requests in flight allowed now, at most), summed over the workers.
    concurrency: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What :func:`reconcile` decided: the next status, the spec to snapshot, the workers to run."""

    status: pb.WorkflowStatus
    # The spec to record as applied (a start happened), else None.
    apply: pb.WorkflowSpec | None
    # Workers that should exist; 0 means stop (drain) all of them.
    target_workers: int
    # An automatic restart from ERROR (same applied spec): drivers forget the old failure.
    restarted: bool = False

    @property
    def started(self) -> bool:
        """Whether this reconcile is a start (a spec to record as applied)."""
        return self.apply is not None

    @property
    def fresh(self) -> bool:
        """Workers start anew (a start or an automatic restart): forget past failures and crashes."""
        return self.started or self.restarted


def restartable(reason: str) -> bool:
    """Whether an ERROR with this reason is restarted automatically (its cause is outside the spec)."""
    return reason in RESTARTABLE_REASONS


def reconcile(wf: pb.Workflow, applied: pb.WorkflowSpec | None, observed: Observed,
              now: datetime, policy: Policy = DEFAULT_POLICY) -> Outcome:
    """The next status and the workers to run. ``now`` is aware UTC; ``policy`` holds the
    Degraded threshold and the automatic-restart backoff (seconds)."""
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
        status.ClearField("auto_restart")
        return pb.PHASE_STARTING, apply.workers

    restarted = False
    nxt: pb.Phase.ValueType
    if wf.spec.desired_state != RUNNING:
        nxt, target = (pb.PHASE_STOPPING if observed.live else pb.PHASE_STOPPED), 0
        status.ClearField("auto_restart")
    elif phase == pb.PHASE_ERROR and not restart_pending(wf):
        nxt, target = pb.PHASE_ERROR, 0
        if _restart_due(status, applied, observed, now, policy):
            assert applied is not None
            nxt, target, restarted = pb.PHASE_STARTING, applied.workers, True
            status.auto_restart.count += 1
            status.auto_restart.last_restart_time.FromDatetime(now)
            status.auto_restart.ClearField("next_restart_time")
    elif phase in (pb.PHASE_STOPPED, pb.PHASE_ERROR, pb.PHASE_STOPPING):
        nxt, target = (pb.PHASE_STOPPING, 0) if observed.live else start()
    elif restart_pending(wf):
        nxt, target = pb.PHASE_STOPPING, 0
    elif observed.failure is not None:
        nxt, target = pb.PHASE_ERROR, 0
        status.last_error.reason = observed.failure.reason
        status.last_error.message = observed.failure.message
        status.last_error.time.FromDatetime(now)
        if restartable(observed.failure.reason):
            _schedule_restart(status, now, policy)
    elif observed.ready >= running_workers > 0:
        nxt, target = pb.PHASE_RUNNING, running_workers
        if status.HasField("auto_restart"):  # an automatic restart worked: start counting afresh
            status.ClearField("auto_restart")
            status.ClearField("last_error")
    else:
        nxt, target = pb.Phase.ValueType(phase), running_workers

    if nxt != phase or not status.HasField("phase_time"):
        status.phase_time.FromDatetime(now)
    status.phase = nxt
    _observe(status, observed, target, nxt)
    _drift(status, wf.spec, applied, nxt)
    _degradation(status, observed, nxt, now, policy)
    _conditions(status, observed, nxt, now)
    return Outcome(status=status, apply=apply, target_workers=target, restarted=restarted)


def _schedule_restart(status: pb.WorkflowStatus, now: datetime, policy: Policy) -> None:
    delay = policy.restart_delay(status.auto_restart.count)
    status.auto_restart.next_restart_time.FromDatetime(now + timedelta(seconds=delay))


def _restart_due(status: pb.WorkflowStatus, applied: pb.WorkflowSpec | None, observed: Observed,
                 now: datetime, policy: Policy) -> bool:
    """An ERROR from outside the spec, its backoff over and the failed workers gone."""
    if applied is None or not restartable(status.last_error.reason):
        return False
    if not status.auto_restart.HasField("next_restart_time"):  # e.g. a status written before this rule
        _schedule_restart(status, now, policy)
    due = status.auto_restart.next_restart_time.ToDatetime(tzinfo=now.tzinfo) <= now
    return due and observed.live == 0


def _degradation(status: pb.WorkflowStatus, observed: Observed, phase: int, now: datetime,
                 policy: Policy) -> None:
    """status.degradation: while RUNNING, a transient failure or a stall past the threshold."""
    found: tuple[str, str, float] | None = None
    at = now.timestamp()
    trouble = observed.trouble
    if phase != pb.PHASE_RUNNING:
        pass
    elif trouble is not None and at - trouble.since >= policy.degraded_after:
        found = (trouble.reason, trouble.message, trouble.since)
    elif observed.backlog > 0 and observed.waiting_since is not None \
            and at - observed.waiting_since >= policy.degraded_after:
        waited = datetime.fromtimestamp(observed.waiting_since, tz=now.tzinfo)
        found = (STALLED, f"records wait in the backlog and none has been written since "
                 f"{waited.isoformat(timespec='seconds')}", observed.waiting_since)
    if found is None:
        status.ClearField("degradation")
        return
    reason, message, since = found
    status.degradation.reason, status.degradation.message = reason, message
    status.degradation.time.FromDatetime(datetime.fromtimestamp(since, tz=now.tzinfo))


def _observe(status: pb.WorkflowStatus, observed: Observed, target: int, phase: int) -> None:
    status.desired_workers = target
    status.ready_workers = observed.ready if target else 0
    if observed.live or phase != pb.PHASE_STOPPED:
        status.backlog = observed.backlog
        status.counters.CopyFrom(observed.counters)
    else:
        status.counters.records_per_second = 0.0
    for side, value in (("source", status.source_concurrency), ("destination", status.destination_concurrency)):
        if side in observed.concurrency:
            value.limit, value.max = observed.concurrency[side]
        else:
            status.ClearField(f"{side}_concurrency")  # type: ignore[arg-type]
    if observed.dead_letters is not None:  # kept while stopped: stopping does not clear them
        status.dead_letters = observed.dead_letters
    if observed.tables or observed.stale:  # kept while stopped: a replay request is checked against it
        rows = {t.source_table: t.rows for t in status.tables}
        stale = {t.source_table: t.stale for t in status.tables}
        rows.update(observed.tables)
        stale.update(observed.stale)
        del status.tables[:]
        status.tables.extend(pb.TableRows(source_table=k, rows=rows.get(k, 0), stale=stale.get(k, 0))
                             for k in sorted(rows.keys() | stale.keys()))


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
    if phase == pb.PHASE_ERROR:
        reason, message = status.last_error.reason, status.last_error.message
        if status.auto_restart.HasField("next_restart_time"):
            message += (f" (automatic restart {status.auto_restart.count + 1} at "
                        f"{status.auto_restart.next_restart_time.ToJsonString()})")
    elif status.degradation.reason:
        reason, message = status.degradation.reason, status.degradation.message
    elif observed.degraded:
        reason, message = "WorkerRestarting", observed.degraded
    else:
        reason, message = "AsExpected", ""
    set_condition(status, "Degraded", reason != "AsExpected", reason, message, now)


def phase_label(phase: int) -> str:
    """A phase for a condition's reason: ``PHASE_RUNNING`` -> ``Running``."""
    return pb.Phase.Name(pb.Phase.ValueType(phase)).removeprefix("PHASE_").title()


def set_condition(status: pb.WorkflowStatus, ctype: str, value: bool, reason: str, message: str,
                  now: datetime) -> None:
    """Set condition ``ctype`` of ``status`` in place (Kubernetes semantics): its
    lastTransitionTime moves to ``now`` only when its True/False value changes."""
    text = "True" if value else "False"
    for cond in status.conditions:
        if cond.type == ctype:
            if cond.status != text:
                cond.last_transition_time.FromDatetime(now)
            cond.status, cond.reason, cond.message = text, reason, message
            return
    cond = status.conditions.add(type=ctype, status=text, reason=reason, message=message)
    cond.last_transition_time.FromDatetime(now)
