"""User-requested transitions: Start, Stop, Restart.

The API only changes the spec (`desired_state`, `restart_nonce`); the
reconcile loop moves the phase. To refuse a double click before the
reconciler has run, a request is checked against the *effective* phase: the
phase the workflow is already heading into.
"""

from __future__ import annotations

from collections.abc import Container

from syncplane.errors import Aborted, FailedPrecondition
from syncplane.proto.enums import phase_name
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.validation.rules import MAX_REPLAY_ROWS

RUNNING, STOPPED = pb.DESIRED_STATE_RUNNING, pb.DESIRED_STATE_STOPPED

START_FROM = frozenset({pb.PHASE_STOPPED, pb.PHASE_ERROR})
STOP_FROM = frozenset({pb.PHASE_STARTING, pb.PHASE_RUNNING, pb.PHASE_ERROR})
RESTART_FROM = frozenset({pb.PHASE_STARTING, pb.PHASE_RUNNING, pb.PHASE_ERROR})


def current_phase(wf: pb.Workflow) -> int:
    """The phase the status shows; STOPPED for a workflow never reconciled."""
    return wf.status.phase or pb.PHASE_STOPPED


def restart_pending(wf: pb.Workflow) -> bool:
    """Whether a Restart was asked (``spec.restart_nonce``) that no reconcile has applied yet."""
    return wf.spec.restart_nonce != wf.status.applied_restart_nonce


def effective_phase(wf: pb.Workflow) -> int:
    """The phase the workflow is already heading into: what a Start/Stop/Restart is checked against,
    so a request made twice before the next reconcile is refused the second time."""
    phase = current_phase(wf)
    if wf.spec.desired_state == RUNNING:
        if phase == pb.PHASE_STOPPED or (phase == pb.PHASE_ERROR and restart_pending(wf)):
            return pb.PHASE_STARTING
        if phase in (pb.PHASE_STARTING, pb.PHASE_RUNNING) and restart_pending(wf):
            return pb.PHASE_STOPPING
    elif phase in (pb.PHASE_STARTING, pb.PHASE_RUNNING, pb.PHASE_ERROR):
        return pb.PHASE_STOPPING
    return phase


def check_preconditions(wf: pb.Workflow, etag: str, expected_phase: int) -> None:
    """Check a conditional call (AIP-154 etag, and our ``expected_phase``; empty/0: not checked).

    Raises `Aborted` for a stale etag and `FailedPrecondition` (PHASE_MISMATCH) when the
    effective phase is not the expected one.
    """
    if etag and etag != wf.etag:
        raise Aborted(f"etag {etag!r} does not match the current {wf.etag!r}; re-read and retry",
                      {"etag": wf.etag})
    if expected_phase and expected_phase != effective_phase(wf):
        raise FailedPrecondition(
            f"expected phase {phase_name(expected_phase)} but the workflow is "
            f"{phase_name(effective_phase(wf))}", phase_name(effective_phase(wf)), "PHASE_MISMATCH")


def _spec_to_change(action: str, wf: pb.Workflow, allowed: Container[int]) -> pb.WorkflowSpec:
    """A copy of ``wf``'s spec for ``action`` to change; `FailedPrecondition` (TRANSITION_NOT_ALLOWED)
    when the effective phase is not one of ``allowed``."""
    if effective_phase(wf) not in allowed:
        phase = phase_name(effective_phase(wf))
        raise FailedPrecondition(f"cannot {action} workflow {wf.name}: it is {phase}", phase,
                                 "TRANSITION_NOT_ALLOWED")
    spec = pb.WorkflowSpec()
    spec.CopyFrom(wf.spec)
    return spec


def _new_run(spec: pb.WorkflowSpec, wf: pb.Workflow) -> None:
    """Ask for a new run of ``wf``: a ``restart_nonce`` past both the spec's and the applied one."""
    spec.restart_nonce = max(spec.restart_nonce, wf.status.applied_restart_nonce) + 1


def request_start(wf: pb.Workflow) -> pb.WorkflowSpec:
    """The spec after a Start. From ERROR with RUNNING desired, a start is a restart."""
    spec = _spec_to_change("start", wf, START_FROM)
    if spec.desired_state == RUNNING:
        _new_run(spec, wf)
    spec.desired_state = RUNNING
    return spec


def request_stop(wf: pb.Workflow) -> pb.WorkflowSpec:
    """The spec after a Stop; `FailedPrecondition` (TRANSITION_NOT_ALLOWED) unless starting, running or in error."""
    spec = _spec_to_change("stop", wf, STOP_FROM)
    spec.desired_state = STOPPED
    return spec


def request_restart(wf: pb.Workflow) -> pb.WorkflowSpec:
    """The spec after a Restart (a new ``restart_nonce``); `FailedPrecondition` unless starting, running or in error."""
    spec = _spec_to_change("restart", wf, RESTART_FROM)
    spec.desired_state = RUNNING
    _new_run(spec, wf)
    return spec


def check_replay(current: pb.Workflow, spec: pb.WorkflowSpec) -> None:
    """A new replay request is refused while the backlog, or the table to replay, holds
    2,000,000 records or more (DOMAIN.md). Table sizes come from the workers' last full read."""
    asked = spec.ingress.replay
    if not asked.request_id or asked.request_id == current.spec.ingress.replay.request_id:
        return
    status = current.status
    rows = next((t.rows for t in status.tables if t.source_table == asked.source_table), 0)
    if status.backlog >= MAX_REPLAY_ROWS or rows >= MAX_REPLAY_ROWS:
        what = (f"the backlog is {status.backlog:,} records" if status.backlog >= MAX_REPLAY_ROWS
                else f"table {asked.source_table!r} holds {rows:,} records")
        raise FailedPrecondition(f"replay refused: {what} (the limit is {MAX_REPLAY_ROWS:,})",
                                 phase_name(effective_phase(current)), "REPLAY_REFUSED")
