"""What wakes a Workflow's reconcile: a watch event of the Workflow or of its children, a due
time (an automatic restart), or the slow resync. One Waker per Workflow (its daemon's)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Mapping
from datetime import UTC, datetime
from typing import Any


class Waker:
    """An edge-triggered wake-up: ``wake()`` before or during ``wait()`` ends the wait."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.timed_out = False   # whether the last wait ended by its timeout, not by a wake

    def wake(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None, stopped: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Until woken, ``stopped()`` completes, or ``timeout`` seconds pass (None: no timeout)."""
        waits = [asyncio.ensure_future(self._event.wait())]
        if stopped is not None:
            waits.append(asyncio.ensure_future(stopped()))
        try:
            done, _ = await asyncio.wait(waits, timeout=None if timeout is None else max(0.0, timeout),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self.timed_out = not done
        self._event.clear()


class Wakers:
    """The Waker of each Workflow, by (namespace, name)."""

    def __init__(self) -> None:
        self._by_key: dict[Hashable, Waker] = {}

    def register(self, key: Hashable) -> Waker:
        waker = self._by_key[key] = Waker()
        return waker

    def forget(self, key: Hashable, waker: Waker) -> None:
        if self._by_key.get(key) is waker:
            del self._by_key[key]

    def wake(self, key: Hashable) -> None:
        if (waker := self._by_key.get(key)) is not None:
            waker.wake()


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
    """A Workflow desired STOPPED and STOPPED, with no automatic restart due: it has no workers, so no
    heartbeat can go stale, and only a watch event (an edit, a start, a child changing) can give its
    reconcile anything to do. Its daemon then waits for events alone: with 1,000 idle Workflows the
    resync was the operator's whole idle cost."""
    spec, status = body.get("spec") or {}, body.get("status") or {}
    if not isinstance(spec, Mapping) or not isinstance(status, Mapping):
        return False
    return ((spec.get("desiredState") or "STOPPED") == "STOPPED" and status.get("phase") == "STOPPED"
            and not (status.get("autoRestart") or {}).get("nextRestartTime"))
