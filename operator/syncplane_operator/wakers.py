"""What wakes a Workflow's reconcile: a watch event of the Workflow or of its children, a due
time (an automatic restart), or the slow resync; and the work queue that runs those reconciles.

One queue and a fixed pool of reconcile workers for all Workflows, as client-go's workqueue does for
Go controllers, instead of a kopf daemon (an asyncio task and its live body) per Workflow: a Workflow
at rest costs its last body and nothing else. (kopf has no work queue of its own: its daemons and
timers are per object; this is the ~100 lines it lacks.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from syncplane.model.kube import merged, reflects

log = logging.getLogger("syncplane.operator")

#: reconcile(key, body) -> the status merge patch it wrote (None: it wrote none)
Reconcile = Callable[[Hashable, Mapping[str, Any]], Awaitable[Mapping[str, Any] | None]]


@dataclass
class _Key:
    body: Mapping[str, Any]
    written: Mapping[str, Any] | None = None   # our last status patch, until a watch event shows it
    status: Mapping[str, Any] | None = None    # the status as our writes (all accepted) left it
    due: bool = False                          # a timer (resync, due restart, retry) fired
    woken: bool = False                        # a child's event came since the last reconcile began
    decided: Mapping[str, Any] | None = None   # what the last reconcile decided from (:func:`inputs`)
    failures: int = 0                          # reconciles that raised in a row (the retry's backoff)
    timer: asyncio.TimerHandle | None = None


class ReconcileQueue:
    """Reconciles of Workflows by key ((namespace, name)), ``workers`` at a time.

    - ``update(key, body)`` (each watch event of the Workflow) keeps its newest body and queues it;
      ``wake(key)`` (an event of one of its children) queues it; ``forget(key)`` when it is gone.
    - A key is never reconciled by two workers at once; queued again while reconciling, it is
      reconciled once more afterwards (never twice in the queue).
    - After a status write, the key's next reconcile waits for a watch event that shows the write
      (or anything later), so no reconcile decides from a body older than its own last write, nor posts
      a transition's Event twice; the resync ends that wait if the event never comes.
    - A key not at rest (:func:`at_rest`) is reconciled again after :func:`next_wake` seconds though no
      event came. A reconcile that raises is retried (``kopf.TemporaryError``: after its delay; any
      other error: after 1, 2, 4 … seconds, capped at the resync); ``kopf.PermanentError``: on the
      next event only.
    """

    def __init__(self, reconcile: Reconcile, resync: float, workers: int = 8) -> None:
        self._reconcile = reconcile
        self._resync = resync
        self._workers = workers
        self._keys: dict[Hashable, _Key] = {}
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._running: set[Hashable] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the workers in the running loop, unless started; ``stop()`` ends them."""
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile worker {i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for state in self._keys.values():
            if state.timer is not None:
                state.timer.cancel()

    def __len__(self) -> int:
        return len(self._keys)

    def update(self, key: Hashable, body: Mapping[str, Any]) -> None:
        state = self._keys.get(key)
        if state is None:
            self._keys[key] = _Key(body)
        else:
            state.body = body
        self._add(key)

    def wake(self, key: Hashable) -> None:
        if (state := self._keys.get(key)) is not None:
            state.woken = True
            self._add(key)

    def forget(self, key: Hashable) -> None:
        state = self._keys.pop(key, None)
        if state is not None and state.timer is not None:
            state.timer.cancel()

    def _add(self, key: Hashable) -> None:
        if key in self._queued:
            return
        self._queued.add(key)
        if key not in self._running:   # else: queued again when its reconcile ends
            self._queue.put_nowait(key)

    def _due(self, key: Hashable) -> None:
        if (state := self._keys.get(key)) is not None:
            state.due, state.timer = True, None
            self._add(key)

    def _schedule(self, key: Hashable, state: _Key, delay: float | None) -> None:
        if state.timer is not None:
            state.timer.cancel()
        state.timer = None if delay is None else asyncio.get_running_loop().call_later(delay, self._due, key)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            self._running.add(key)
            try:
                await self._process(key)
            finally:
                self._running.discard(key)
                if key in self._queued:
                    self._queue.put_nowait(key)

    async def _process(self, key: Hashable) -> None:
        state = self._keys.get(key)
        if state is None:
            return
        delay: float | None
        status = state.body.get("status") or {}
        if state.written is not None and reflects(status, state.written) and not (state.due or state.woken) \
                and at_rest(state.body) and inputs(state.body) == state.decided:
            # The watch event of our own write, which left the Workflow at rest, and nothing else since: the
            # same inputs decide the same, so no reconcile (a cold start over 1,000 new Workflows reconciled
            # each twice, the second time to write nothing).
            state.written = None
        elif state.written is None or reflects(status, state.written) or state.due:
            state.due = state.woken = False
            body = state.body
            decided = inputs(body)
            if state.status is not None and not reflects(status, state.status):
                # A body older than our writes, which the API server accepted: the resync (or a due time)
                # came before the watch showed the last one, or the watch handed an older body on after a
                # newer (seen on a loaded API server at 1,000 Workflows). Decide from the body with those
                # writes: from the one before them, the same transition was decided again, its Event
                # posted twice.
                body = {**body, "status": merged(status, state.status)}
            # Until the reconcile returns nothing is decided: should it raise, the echo of an earlier
            # write seen next (a relist after a watch reconnect, likeliest while the API server fails
            # reconciles) must not pass for the echo of this one and cancel the retry scheduled below.
            state.decided = None
            try:
                state.written = await self._reconcile(key, body)
                if state.written:
                    state.status = merged(body.get("status") or {}, state.written)
            except kopf.PermanentError as exc:
                log.error("reconcile of %s failed permanently (retried on its next change): %s", key, exc)
                self._schedule(key, state, None)
                return
            except kopf.TemporaryError as exc:
                log.warning("reconcile of %s will be retried in %.0f s: %s", key, exc.delay or 1, exc)
                self._schedule(key, state, min(self._resync, float(exc.delay or 1)))
                return
            except Exception:
                state.failures += 1
                delay = min(self._resync, 2.0 ** (state.failures - 1))
                log.exception("reconcile of %s failed; retried in %.0f s", key, delay)
                self._schedule(key, state, delay)
                return
            state.failures = 0
            state.decided = decided
        # At rest, and our last write seen (or none made): only an event can bring work.
        body = state.body
        delay = None if state.written is None and at_rest(body) else next_wake(body.get("status") or {},
                                                                               self._resync)
        self._schedule(key, state, delay)


def inputs(body: Mapping[str, Any]) -> dict[str, Any]:
    """What a reconcile decides from in a Workflow's body, but its status: spec and metadata without
    ``resourceVersion`` (which our own status write changes) or ``managedFields``."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k not in ("resourceVersion", "managedFields")}
    return {**{k: v for k, v in body.items() if k != "status"}, "metadata": metadata}


def next_wake(status: Mapping[str, Any], resync: float, now: datetime | None = None) -> float:
    """Seconds until this Workflow must be reconciled though no event came: the resync, or sooner
    when an automatic restart is due (``status.autoRestart.nextRestartTime``)."""
    due = ((status.get("autoRestart") or {}).get("nextRestartTime")) if isinstance(status, Mapping) else None
    if not due:
        return resync
    try:
        when = datetime.fromisoformat(str(due).replace("Z", "+00:00"))
    except ValueError:
        return resync
    delay = (when - (now or datetime.now(UTC))).total_seconds()
    return min(resync, max(0.0, delay) + 0.1)


def at_rest(body: Mapping[str, Any]) -> bool:
    """A Workflow desired STOPPED and STOPPED, not being deleted, with no automatic restart due: it has no
    workers, so no heartbeat can go stale, and only a watch event (an edit, a start, a child changing) can
    give its reconcile anything to do. It then waits for events alone: with 1,000 idle Workflows the
    resync was the operator's whole idle cost."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    if not isinstance(spec, Mapping) or not isinstance(status, Mapping):
        return False
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return False   # being deleted: its drain is watched (the resync, should an event be missed)
    return ((spec.get("desiredState") or "STOPPED") == "STOPPED" and status.get("phase") == "STOPPED"
            and not (status.get("autoRestart") or {}).get("nextRestartTime"))
