"""Adaptive concurrency for a connector's requests: AIMD (additive increase, multiplicative
decrease), as TCP congestion control does for packets in flight.

:class:`AimdLimit` is the pure decision: it is told each request's outcome and latency and keeps
the number of requests that may be in flight, between 1 and the configured maximum (the spec's
``maxConcurrency``; it never goes above it). :class:`AdaptiveLimiter` holds requests to that
number. Our own code rather than a library: the Python concurrency-limit packages on PyPI are
thread-based or unmaintained, and the rule fits in a page.

The rule, per *window* (as many completed requests as the limit, at least ``MIN_WINDOW``: about
one round trip of every slot):

- a 429, or a 5xx / timeout / refused connection (each a sign of a loaded service) halves the
  limit (at most once per window: the requests already in flight when the first one failed were
  sent under the old limit and say nothing new);
- latency rising (the window's mean above ``LATENCY_RISE`` times the long-run mean, a moving
  average over windows, and more than ``LATENCY_SLACK_S`` above it, so loopback jitter is not a
  signal) cuts it by ``LATENCY_CUT``; a window mixes the client's requests (schema reads, pages,
  writes), so what is compared is how the mix fares, not one request;
- a window with neither adds one.

The ``Retry-After`` gate is separate and unchanged: it holds every request of a client until the
instant the service named, whatever the limit.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

#: A window's mean latency above this many times the baseline is "rising".
LATENCY_RISE = 2.0
#: ... and above the baseline by more than this (seconds): a rise on loopback (0.3 ms to 1 ms) is noise.
LATENCY_SLACK_S = 0.010
#: The factor a latency rise cuts the limit by; an error halves it.
LATENCY_CUT = 0.9
ERROR_CUT = 0.5
#: The weight of a window in the long-run mean: a service whose latency rose for good becomes the
#: new normal after some tens of windows instead of capping the limit for ever.
BASELINE_WEIGHT = 0.05
#: Completed requests a window holds at least: fewer say too little about latency.
MIN_WINDOW = 8


@dataclass
class AimdLimit:
    """The AIMD decision for one client's requests. Pure: no clock, no I/O.

    ``maximum``: the most requests in flight ever allowed (≥ 1). ``initial``: where the limit
    starts (default: the maximum; a service that cannot take it answers 429 and the limit falls).
    """

    maximum: int
    initial: int | None = None
    limit: float = field(init=False)
    epoch: int = field(init=False, default=0)  # bumped at each cut: which requests were sent before it
    _window_done: int = field(init=False, default=0)
    _window_latency: float = field(init=False, default=0.0)
    _baseline: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.maximum < 1:
            raise ValueError("maximum must be at least 1")
        start = self.maximum if self.initial is None else self.initial
        self.limit = float(min(self.maximum, max(1, start)))

    @property
    def current(self) -> int:
        """Requests that may be in flight now: 1 ≤ current ≤ maximum."""
        return max(1, min(self.maximum, int(self.limit)))

    def failed(self, epoch: int) -> None:
        """A request sent at ``epoch`` was throttled (429) or failed as an overloaded service does
        (5xx, timeout, refused connection): halve, unless a cut came after that request left."""
        if epoch == self.epoch:
            self._cut(ERROR_CUT)

    def succeeded(self, latency_s: float) -> None:
        """A request answered (any status but those of :meth:`failed`) after ``latency_s`` seconds."""
        self._window_done += 1
        self._window_latency += latency_s
        if self._window_done < max(MIN_WINDOW, self.current):
            return
        mean = self._window_latency / self._window_done
        baseline = mean if self._baseline is None else self._baseline
        self._baseline = baseline + BASELINE_WEIGHT * (mean - baseline)
        self._window_done, self._window_latency = 0, 0.0
        if mean > LATENCY_RISE * baseline and mean - baseline > LATENCY_SLACK_S:
            self._cut(LATENCY_CUT)
        elif self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + 1.0)

    def _cut(self, factor: float) -> None:
        self.limit = max(1.0, self.limit * factor)
        self.epoch += 1
        self._window_done, self._window_latency = 0, 0.0


class AdaptiveLimiter:
    """Holds requests to :attr:`AimdLimit.current` in flight (an asyncio semaphore whose size moves).

    ``async with limiter.slot() as epoch:`` waits for a free slot; report the outcome with
    :meth:`AimdLimit.failed` / :meth:`AimdLimit.succeeded` on :attr:`aimd`. ``adaptive=False``
    keeps the limit at the maximum (a fixed cap)."""

    def __init__(self, maximum: int, *, adaptive: bool = True) -> None:
        self.aimd = AimdLimit(maximum)
        self.adaptive = adaptive
        self.in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def maximum(self) -> int:
        """The most requests in flight ever allowed."""
        return self.aimd.maximum

    @property
    def current(self) -> int:
        """The requests in flight allowed now (the maximum when not adaptive)."""
        return self.aimd.current if self.adaptive else self.aimd.maximum

    def failed(self, epoch: int) -> None:
        """A request sent in ``epoch`` (from :meth:`acquire`) was throttled or failed: halve the limit."""
        if self.adaptive:
            self.aimd.failed(epoch)

    def succeeded(self, latency_s: float) -> None:
        """A request was answered in ``latency_s`` seconds: may raise the limit by one."""
        if self.adaptive:
            self.aimd.succeeded(latency_s)
            self._wake()

    async def acquire(self) -> int:
        """Wait for a slot (first come, first served); returns the epoch the request goes out
        in (for :meth:`failed`). Pair with :meth:`release`."""
        if self.in_flight < self.current and not self._waiters:
            self.in_flight += 1
            return self.aimd.epoch
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # _wake hands the slot over: in_flight already counts it
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled: give it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        return self.aimd.epoch

    def release(self) -> None:
        """Give back the slot of :meth:`acquire`, waking the next waiter."""
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self.in_flight < self.current and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_flight += 1
                waiter.set_result(None)
