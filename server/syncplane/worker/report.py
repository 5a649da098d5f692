"""The worker heartbeat: one structure, rendered as /status JSON and observed by the metric
instruments of :mod:`syncplane.metrics` (/metrics, OTLP).

It is also the one place where a worker accounts for the records it reads: every record
read ends in exactly one of the counters (or is still in the backlog), so that
``read = written + deleted + filtered + dead_lettered + held + failed + backlog``
holds at any moment (:meth:`WorkerReport.unaccounted` is 0). Re-sending held records
and dead letters is counted apart, in ``resent``: they were counted when first read.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Where a record read can end up (besides the backlog).
Outcome = Literal["written", "deleted", "filtered", "dead_lettered", "held", "failed"]
#: Seconds of history behind records_per_second.
RATE_WINDOW = 10.0


@dataclass
class Counters:
    read: int = 0
    written: int = 0          # upserts acknowledged
    failed: int = 0           # read by a pass that failed before writing them: read again next pass
    dead_lettered: int = 0
    filtered: int = 0         # needing no write (filter, event type off, nothing changed)
    held: int = 0             # held until what they point at exists
    deleted: int = 0          # deletes acknowledged
    resent: int = 0           # held records and dead letters re-sent and acknowledged


class Throughput:
    """Records written per second over the last :data:`RATE_WINDOW` seconds, at the moment it is
    asked: it falls to 0 when nothing moves (not the last batch's rate kept forever)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()
        self._since = clock()

    def add(self, n: int) -> None:
        if n > 0:
            self._samples.append((self._clock(), n))

    def per_second(self) -> float:
        now = self._clock()
        while self._samples and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        # Over the window, or over the time since the worker began when that is shorter (≥ 1 s).
        span = max(1.0, min(RATE_WINDOW, now - self._since))
        return sum(n for _, n in self._samples) / span


@dataclass
class WorkerReport:
    workflow: str
    index: int
    generation: int
    pid: int = field(default_factory=os.getpid)
    ready: bool = False
    phase: str = "STARTING"          # STARTING, RUNNING, DRAINING, FATAL
    backlog: int = 0
    counters: Counters = field(default_factory=Counters)
    records_per_second: float = 0.0
    truncated: int = 0               # values cut to the destination's field length
    resyncs: int = 0                 # full reads forced by an expired delta token
    held: int = 0                    # records waiting for what they point at (e.g. a contact)
    tables: dict[str, int] = field(default_factory=dict)  # rows per source table (last full read)
    # Records the integration wrote that the source no longer has, found at the end of a full read:
    # deleted (where the mapping applies deletes), or left in place and counted per stream.
    stale_deleted: int = 0
    stale: dict[str, int] = field(default_factory=dict)
    # Rows of this workflow in the dead-letter store (-1: not counted yet), and which store: the
    # workers sharing one store report the same rows.
    dead_letters: int = -1
    dead_letter_store: str = ""
    last_error: dict[str, str] | None = None
    fatal: dict[str, str] | None = None
    started_at: float = field(default_factory=time.time)
    # How each link fares: "source", "destination", "state_store" → a LinkHealth (connectors.http)
    # or a dict with its fields: failing_since (epoch s or None), error, status, throttled.
    links: dict[str, Any] = field(default_factory=dict)
    # Since when (epoch seconds) records have waited in the backlog with none leaving it; None: empty.
    waiting_since: float | None = None
    rate: Throughput = field(default_factory=Throughput, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        self.records_per_second = self.rate.per_second()
        data = asdict(self)
        data.pop("rate", None)
        return data

    # -- accounting ------------------------------------------------------------------------
    def read(self, n: int) -> None:
        """``n`` records read from the source (they enter the backlog: see :meth:`set_backlog`)."""
        self.counters.read += n

    def done(self, outcome: Outcome, n: int) -> None:
        """``n`` records read have left the backlog for ``outcome``."""
        if n <= 0:
            return
        setattr(self.counters, outcome, getattr(self.counters, outcome) + n)
        if outcome in ("written", "deleted"):
            self.rate.add(n)
        if outcome != "failed" and self.backlog > 0:
            self.waiting_since = time.time()  # records move: not a stall

    def resent(self, n: int) -> None:
        """``n`` held records or dead letters re-sent and acknowledged."""
        self.counters.resent += n
        self.rate.add(n)

    def set_backlog(self, n: int) -> None:
        """Records read and not yet written (queued + in flight)."""
        if n <= 0:
            self.waiting_since = None
        elif self.backlog <= 0 or self.waiting_since is None:
            self.waiting_since = time.time()
        self.backlog = max(0, n)

    def unaccounted(self) -> int:
        """Records read that no counter and no backlog accounts for: 0 unless a bug lost them."""
        c = self.counters
        return c.read - (c.written + c.deleted + c.filtered + c.dead_lettered + c.held + c.failed + self.backlog)
