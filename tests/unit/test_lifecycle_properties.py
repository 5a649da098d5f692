"""Random action sequences against the reconcile core, with a simulated driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.errors import FailedPrecondition
from syncplane.lifecycle import (
    Observed,
    WorkerFailure,
    reconcile,
    request_restart,
    request_start,
    request_stop,
)
from syncplane.proto.v1 import workflow_pb2 as pb
from tests.factories import workflow

NOW = datetime(2026, 11, 28, tzinfo=UTC)
ACTIONS = st.sampled_from(["start", "stop", "restart", "edit", "ready", "exit", "fail", "tick"])


@dataclass
class Sim:
    wf: pb.Workflow = field(default_factory=workflow)
    applied: pb.WorkflowSpec | None = None
    live: int = 0
    ready: int = 0
    stopping: int = 0            # live workers asked to drain
    failure: WorkerFailure | None = None

    def user(self, fn) -> None:
        try:
            spec = fn(self.wf)
        except FailedPrecondition:
            return
        self.wf.spec.CopyFrom(spec)
        self.wf.generation += 1

    def step(self) -> None:
        desired_before = self.wf.spec.desired_state
        out = reconcile(self.wf, self.applied,
                        Observed(live=self.live, ready=self.ready, failure=self.failure), NOW)
        phase = out.status.phase
        # Invariants of a single decision.
        assert out.status.observed_generation == self.wf.generation
        assert out.status.applied_generation <= self.wf.generation
        if out.started:
            assert not out.status.drift.detected, "drift right after a start"
            self.applied = out.apply
            self.failure = None
        if phase == pb.PHASE_STOPPED:
            assert self.live == 0, "a STOPPED workflow has live workers"
        if phase in (pb.PHASE_STOPPED, pb.PHASE_STOPPING, pb.PHASE_ERROR):
            assert out.target_workers == 0
        if phase == pb.PHASE_RUNNING:
            assert self.ready >= out.target_workers > 0
        if phase == pb.PHASE_ERROR:
            assert out.status.last_error.reason
        assert self.wf.spec.desired_state == desired_before
        self.wf.status.CopyFrom(out.status)
        # The simulated driver converges toward the decision.
        if out.target_workers == 0:
            self.stopping = self.live
            self.ready = 0
        elif self.live < out.target_workers:
            self.live = out.target_workers


@settings(max_examples=300, deadline=None)
@given(st.lists(ACTIONS, max_size=40))
def test_random_action_sequences_keep_invariants(actions):
    sim = Sim()
    for action in actions:
        if action == "start":
            sim.user(request_start)
        elif action == "stop":
            sim.user(request_stop)
        elif action == "restart":
            sim.user(request_restart)
        elif action == "edit":
            sim.wf.spec.batch_size = sim.wf.spec.batch_size % 1000 + 1
            sim.wf.generation += 1
        elif action == "ready" and sim.live and not sim.stopping:
            sim.ready = sim.live
        elif action == "exit" and sim.stopping:
            sim.live = sim.stopping = sim.ready = 0
        elif action == "fail" and sim.live and not sim.stopping:
            sim.failure = WorkerFailure("CRASH_LOOP", "simulated")
        sim.step()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["start", "stop"]), max_size=20))
def test_toggling_desired_state_alone_is_never_drift(toggles):
    sim = Sim()
    for t in toggles:
        sim.user(request_start if t == "start" else request_stop)
        sim.step()
        if sim.live and not sim.stopping:
            sim.ready = sim.live
        sim.step()
        assert not sim.wf.status.drift.detected
