"""The operator's reconcile queue (wakers.ReconcileQueue): one pool of workers for every Workflow.

The guarantees the per-Workflow daemon gave, kept: a Workflow's reconciles never overlap, the newest
body is the one reconciled, a reconcile waits for its own status write to come back, and a Workflow
at rest has no timer (nothing runs for it until an event). No cluster: a fake reconcile records calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import kopf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncplane.model.kube import merged, reflects
from syncplane_operator.wakers import ReconcileQueue
from tests.backends import eventually

STOPPED = {"spec": {"desiredState": "STOPPED"}, "status": {"phase": "STOPPED"}}


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition()`` every millisecond until true (fails after ``timeout`` seconds)."""
    async def check() -> bool:
        return condition()
    await eventually(check, "the queue's condition", timeout, 0.001)


class Recorder:
    """A reconcile that records each call, may yield in between, and writes what ``writes`` says."""

    def __init__(self, yields: int = 3, writes: Mapping[str, Any] | None = None) -> None:
        self.calls: list[tuple[Hashable, Mapping[str, Any]]] = []
        self.running: set[Hashable] = set()
        self.overlaps = 0
        self.yields = yields
        self.writes = writes
        self.fail: BaseException | None = None

    async def __call__(self, key: Hashable, body: Mapping[str, Any]) -> Mapping[str, Any] | None:
        if key in self.running:
            self.overlaps += 1
        self.running.add(key)
        try:
            self.calls.append((key, body))
            for _ in range(self.yields):
                await asyncio.sleep(0)
            if self.fail is not None:
                raise self.fail
            return self.writes
        finally:
            self.running.discard(key)


@asynccontextmanager
async def running_queue(reconcile: Recorder, resync: float, **options: Any) -> AsyncIterator[ReconcileQueue]:
    """A started ReconcileQueue over ``reconcile`` (resync in seconds; ``options`` as the queue takes
    them), stopped on the way out."""
    queue = ReconcileQueue(reconcile, resync=resync, **options)
    queue.start()
    try:
        yield queue
    finally:
        await queue.stop()


def stopped(n: int) -> dict[str, Any]:
    return {**STOPPED, "metadata": {"resourceVersion": str(n)}}


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["update", "wake", "pause"]), st.integers(0, 3)), max_size=40),
       workers=st.integers(1, 4))
def test_reconciles_of_one_workflow_never_overlap_and_the_newest_body_is_reconciled_last(ops, workers):
    async def scenario() -> None:
        rec = Recorder()
        newest: dict[int, dict[str, Any]] = {}
        async with running_queue(rec, resync=3600, workers=workers) as queue:
            for n, (op, key) in enumerate(ops):
                if op == "update":
                    newest[key] = stopped(n)
                    queue.update(key, newest[key])
                elif op == "wake":
                    queue.wake(key)   # of a key never updated: nothing to do
                else:
                    await asyncio.sleep(0)
            await until(lambda: not queue._queued and not queue._running)
        assert rec.overlaps == 0
        for key, body in newest.items():
            assert [b for k, b in rec.calls if k == key][-1] is body
        assert {k for k, _ in rec.calls} == set(newest)

    asyncio.run(scenario())


async def test_after_a_status_write_the_next_reconcile_waits_for_the_watch_to_show_it() -> None:
    rec = Recorder(writes={"phase": "STOPPED", "observedGeneration": 2})
    async with running_queue(rec, resync=3600) as queue:
        queue.update("wf", {"spec": {}, "status": {}})
        await until(lambda: len(rec.calls) == 1 and not queue._running)
        # an event from before the write (another field changed): no reconcile on a stale body
        queue.update("wf", {"spec": {}, "status": {}, "metadata": {"labels": {"a": "b"}}})
        queue.wake("wf")
        await until(lambda: not queue._queued and not queue._running)
        assert len(rec.calls) == 1
        # the write comes back: reconciled again
        rec.writes = None
        queue.update("wf", {"spec": {}, "status": {"phase": "STOPPED", "observedGeneration": 2}})
        await until(lambda: len(rec.calls) == 2)


async def test_the_resync_ends_the_wait_for_a_write_the_watch_never_shows() -> None:
    rec = Recorder(writes={"phase": "STOPPED"})
    async with running_queue(rec, resync=0.05) as queue:
        queue.update("wf", {"spec": {}, "status": {}})
        await until(lambda: len(rec.calls) >= 2)   # no event: the resync reconciles again
        # from the body with the write the API server accepted, not the one before it (which decided
        # the same transition again: a second Event)
        assert rec.calls[0][1]["status"] == {} and rec.calls[1][1]["status"] == {"phase": "STOPPED"}


async def test_a_body_older_than_a_write_already_seen_is_decided_with_that_write() -> None:
    rec = Recorder(writes={"phase": "STOPPED"})
    async with running_queue(rec, resync=3600) as queue:
        queue.update("wf", {"spec": {}, "status": {}})
        await until(lambda: len(rec.calls) == 1 and not queue._running)
        rec.writes = None
        queue.update("wf", {"spec": {}, "status": {"phase": "STOPPED"}})   # the write comes back
        await until(lambda: not queue._queued and not queue._running)
        # then the watch hands on a body from before the write (a relist, a lagging cache)
        queue.update("wf", {"spec": {"x": 1}, "status": {}})
        await until(lambda: len(rec.calls) == 2)
        assert rec.calls[1][1] == {"spec": {"x": 1}, "status": {"phase": "STOPPED"}}


async def test_the_watch_event_of_a_write_that_left_the_workflow_at_rest_is_not_reconciled_again() -> None:
    """The second reconcile of each new Workflow in a cold start: same spec and metadata, the status it
    wrote, no child's event: it would decide the same and write nothing."""
    rec = Recorder(writes={"phase": "STOPPED", "observedGeneration": 1})
    meta: dict[str, Any] = {"name": "wf", "generation": 1, "resourceVersion": "1"}
    body: dict[str, Any] = {"metadata": meta, "spec": {"desiredState": "STOPPED"}}
    echo: dict[str, Any] = {**body, "metadata": {**body["metadata"], "resourceVersion": "2"},
            "status": {"phase": "STOPPED", "observedGeneration": 1}}
    async with running_queue(rec, resync=3600) as queue:
        queue.update("wf", body)
        await until(lambda: len(rec.calls) == 1 and not queue._running)
        queue.update("wf", echo)
        await until(lambda: not queue._queued and not queue._running)
        assert len(rec.calls) == 1 and queue._keys["wf"].timer is None   # at rest: nothing more runs for it
        # what follows is reconciled as ever: a label (no new generation) ...
        queue.update("wf", {**echo, "metadata": {**echo["metadata"], "labels": {"team": "a"}}})
        await until(lambda: len(rec.calls) == 2)


@pytest.mark.parametrize("between", ["wake", "label", "annotation", "spec", "finalizer", "deletion", "running"])
async def test_the_watch_event_of_a_write_is_reconciled_when_anything_else_came_with_it_or_before(between) -> None:
    """Only the echo of our own write of a Workflow at rest, with nothing else since, is skipped: a child's
    event, or a change of what the reconcile reads (metadata that is no status, the spec), is reconciled."""
    rec = Recorder(writes={"phase": "STOPPED"})
    meta: dict[str, Any] = {"name": "wf", "generation": 1, "resourceVersion": "1"}
    body: dict[str, Any] = {"metadata": meta, "spec": {"desiredState": "STOPPED"}}
    echo: dict[str, Any] = {"metadata": {**meta, "resourceVersion": "2"}, "spec": body["spec"],
                            "status": {"phase": "STOPPED"}}
    changed: dict[str, dict[str, Any]] = {
        "label": {"labels": {"a": "b"}}, "annotation": {"annotations": {"verify.syncplane.io/request": "x"}},
               "finalizer": {"finalizers": ["f"]}, "deletion": {"deletionTimestamp": "2026-11-30T00:00:00Z"}}
    if between in changed:
        echo["metadata"] = {**echo["metadata"], **changed[between]}
    elif between == "spec":
        echo = {**echo, "metadata": {**echo["metadata"], "generation": 2}, "spec": {"desiredState": "STOPPED", "x": 1}}
    elif between == "running":
        echo = {**echo, "spec": {"desiredState": "RUNNING"}}
    async with running_queue(rec, resync=3600) as queue:
        queue.update("wf", body)
        await until(lambda: len(rec.calls) == 1 and not queue._running)
        if between == "wake":
            queue.wake("wf")   # a child's event while the write is on its way back
            await until(lambda: not queue._queued and not queue._running)
            assert len(rec.calls) == 1
        queue.update("wf", echo)
        await until(lambda: len(rec.calls) == 2)
        assert rec.calls[1][1]["metadata"] == echo["metadata"]


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["update", "echo", "wake", "pause"]), st.integers(0, 2)),
                    max_size=30))
def test_every_change_and_every_childs_event_is_reconciled_though_echoes_are_not(ops):
    """Whatever the order of the Workflow's changes, the watch events of our writes and its children's
    events: each child's event is followed by a reconcile, and the last reconcile decided from the newest
    spec and metadata (the only reconciles saved are those that would decide from the same)."""
    async def scenario() -> None:
        rec = Recorder(writes={"phase": "STOPPED"})
        spec: dict[str, Any] = {"desiredState": "STOPPED", "x": 0}
        wakes: list[int] = []   # how many reconciles had started at each child's event
        async with running_queue(rec, resync=3600) as queue:
            queue.update("wf", {"metadata": {"resourceVersion": "0"}, "spec": spec})
            for n, (op, value) in enumerate(ops, start=1):
                if op == "update":
                    spec = {"desiredState": "STOPPED", "x": value}
                    queue.update("wf", {"metadata": {"resourceVersion": str(n)}, "spec": spec})
                elif op == "echo":
                    queue.update("wf", {"metadata": {"resourceVersion": str(n)}, "spec": spec,
                                        "status": {"phase": "STOPPED"}})
                elif op == "wake":
                    wakes.append(len(rec.calls))
                    queue.wake("wf")
                else:
                    for _ in range(value + 1):
                        await asyncio.sleep(0)
            # the watch shows our last write at last
            queue.update("wf", {"metadata": {"resourceVersion": "end"}, "spec": spec, "status": {"phase": "STOPPED"}})
            await until(lambda: not queue._queued and not queue._running)
        assert all(len(rec.calls) > started for started in wakes)
        assert rec.calls[-1][1]["spec"] == spec

    asyncio.run(scenario())


async def test_a_workflow_at_rest_has_no_timer_one_that_runs_has_the_resync() -> None:
    rec = Recorder()
    async with running_queue(rec, resync=0.05) as queue:
        queue.update("idle", STOPPED)
        queue.update("busy", {"spec": {"desiredState": "RUNNING"}, "status": {"phase": "RUNNING"}})
        await until(lambda: sum(1 for k, _ in rec.calls if k == "busy") >= 3)   # resync after resync
        assert [k for k, _ in rec.calls].count("idle") == 1
        assert queue._keys["idle"].timer is None
        queue.forget("busy")
        assert len(queue) == 1


async def test_a_failed_reconcile_is_retried_a_permanent_failure_waits_for_the_next_event() -> None:
    rec = Recorder()
    rec.fail = kopf.TemporaryError("not yet", delay=0.01)
    async with running_queue(rec, resync=3600) as queue:
        queue.update("wf", STOPPED)
        await until(lambda: len(rec.calls) >= 3)   # retried after its delay, no event needed
        rec.fail = kopf.PermanentError("never")
        await until(lambda: isinstance(rec.fail, kopf.PermanentError) and queue._keys["wf"].timer is None
                    and not queue._running and not queue._queued)
        calls = len(rec.calls)
        rec.fail = None
        queue.update("wf", stopped(1))
        await until(lambda: len(rec.calls) == calls + 1)


@pytest.mark.parametrize("failure", [RuntimeError("API 500"), kopf.TemporaryError("API 429", delay=0.01)],
                         ids=["error", "temporary"])
async def test_a_failed_reconcile_is_retried_though_the_echo_of_an_earlier_write_comes_again(failure) -> None:
    """The reconcile of a child's event fails; then the watch hands on the echo of the write before it
    again (a relist after a watch reconnect). That is no echo of the failed reconcile: its retry runs."""
    rec = Recorder(writes={"phase": "STOPPED"})
    meta: dict[str, Any] = {"name": "wf", "generation": 1, "resourceVersion": "1"}
    body = {"metadata": meta, "spec": {"desiredState": "STOPPED"}}
    echo = {"metadata": {**meta, "resourceVersion": "2"}, "spec": body["spec"], "status": {"phase": "STOPPED"}}
    async with running_queue(rec, resync=3600) as queue:
        queue.update("wf", body)
        await until(lambda: len(rec.calls) == 1 and not queue._running)
        queue.wake("wf")                      # a child's event before the echo
        rec.fail = failure                    # whose reconcile fails
        queue.update("wf", echo)
        await until(lambda: len(rec.calls) == 2 and not queue._running)
        rec.fail = None
        queue.update("wf", dict(echo))        # the same body again
        await until(lambda: len(rec.calls) == 3)   # the retry (or this event) reconciles it


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=3),
                           lambda inner: st.dictionaries(st.text(max_size=2), inner, max_size=3), max_leaves=8)
json_objects = st.dictionaries(st.text(max_size=2), json_values, max_size=4)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(json_objects, json_objects)
def test_a_status_with_a_merge_patch_applied_reflects_it_and_keeps_what_it_does_not_name(current, patch):
    out = merged(current, patch)
    assert reflects(out, patch)
    assert {k: v for k, v in out.items() if k not in patch} == {k: v for k, v in current.items() if k not in patch}
