"""The worker heartbeat: one structure, rendered as /status JSON (embedded) or a Lease
annotation (Kubernetes), observed by the metric instruments of :mod:`syncplane.metrics`
(/metrics, OTLP), and read back by both drivers through :meth:`WorkerReport.from_json`
(the embedded supervisor and the operator's ``observe``).

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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

#: Where a record read can end up (besides the backlog).
Outcome = Literal["written", "deleted", "filtered", "dead_lettered", "held", "failed"]
#: Seconds of history behind records_per_second.
RATE_WINDOW = 10.0


@dataclass
class Counters:
    """Records (a count each) by where they ended since the worker started."""

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
    asked: it falls to 0 when nothing moves (not the last batch's rate kept forever).

    Counts are kept per whole second of the clock, so the window holds at most
    ``RATE_WINDOW + 2`` buckets however many records are written (one sample per record made
    every report, i.e. every ``/status`` poll and heartbeat, copy thousands of them)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[list[int]] = deque()  # [second, records written in it], oldest first
        self._since = clock()

    def add(self, n: int) -> None:
        """``n`` records were written now."""
        if n > 0:
            second = int(self._clock())
            if self._samples and self._samples[-1][0] == second:
                self._samples[-1][1] += n
            else:
                self._samples.append([second, n])

    def per_second(self) -> float:
        """Records per second over the window (or the worker's life when shorter, at least 1 s)."""
        now = self._clock()
        while self._samples and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        # Over the window, or over the time since the worker began when that is shorter (≥ 1 s).
        span = max(1.0, min(RATE_WINDOW, now - self._since))
        return sum(n for _, n in self._samples) / span


@dataclass
class WorkerReport:
    """One worker's state for the control plane: which workflow, index and spec generation it
    runs, its phase, backlog (records), counters, failing links and fatal error."""

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

    def __post_init__(self) -> None:
        # Not a field: neither in to_json() nor compared (a callable per heartbeat of this process).
        self._phase_listeners: list[Callable[[], None]] = []

    def set_phase(self, phase: str, ready: bool) -> None:
        """Set ``phase`` and ``ready`` together and, when either changed, call each listener
        (:meth:`on_phase_change`) once: a heartbeat then carries the change at once, not at its next
        period (a worker that became ready waited up to the Lease's renew interval, 2 s, before the
        operator could see it). A repeat of the current phase and readiness calls none (no Lease write)."""
        if (self.phase, self.ready) == (phase, ready):
            return
        self.phase, self.ready = phase, ready
        for listener in list(self._phase_listeners):
            listener()

    def on_phase_change(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` (no arguments) after each :meth:`set_phase` that changed the phase or
        readiness, in the thread that calls it: the worker's event loop, so a listener may set an
        :class:`asyncio.Event`. Returns the function that removes the listener again."""
        self._phase_listeners.append(listener)
        return lambda: self._phase_listeners.remove(listener)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data: every field but the rate window, ``counters`` a dict."""
        self.records_per_second = self.rate.per_second()
        data = asdict(self)
        data.pop("rate", None)
        return data

    @classmethod
    def from_json(cls, data: object) -> WorkerReport:
        """A report read back from another process: ``to_json()``'s shape, from /status or a Lease.

        Never raises: a field that is missing or of another type (an old worker, a Lease edited by
        hand) takes its default, so a malformed report reads as not ready and not fatal.
        """
        d = data if isinstance(data, Mapping) else {}
        report = cls(workflow=_str(d.get("workflow")), index=_int(d.get("index")),
                     generation=_int(d.get("generation")), pid=_int(d.get("pid")), started_at=0.0)
        raw_counters = d.get("counters")
        raw_counters = raw_counters if isinstance(raw_counters, Mapping) else {}
        report.counters = Counters(**{f.name: _int(raw_counters.get(f.name)) for f in fields(Counters)})
        report.ready = d.get("ready") is True
        report.phase = _str(d.get("phase")) or report.phase
        for name in ("backlog", "truncated", "resyncs", "held", "stale_deleted"):
            setattr(report, name, _int(d.get(name)))
        report.dead_letters = _int(d.get("dead_letters"), -1)
        report.dead_letter_store = _str(d.get("dead_letter_store"))
        report.records_per_second = _float(d.get("records_per_second")) or 0.0
        report.started_at = _float(d.get("started_at")) or 0.0
        report.waiting_since = _float(d.get("waiting_since"))
        report.tables, report.stale = _counts(d.get("tables")), _counts(d.get("stale"))
        report.last_error, report.fatal = _error(d.get("last_error")), _error(d.get("fatal"))
        links = d.get("links")
        report.links = {str(k): v for k, v in links.items()} if isinstance(links, Mapping) else {}
        return report

    @property
    def draining(self) -> bool:
        """Whether the worker was stopping on purpose (SIGTERM, an orphan timeout) when it reported."""
        return self.phase == "DRAINING"

    def ready_at(self, generation: int) -> bool:
        """Whether this worker runs ``generation`` of the spec and says it is ready."""
        return self.ready and self.generation == generation

    def fatal_at(self, generation: int) -> tuple[str, str] | None:
        """``(reason, message)`` of what retrying cannot fix, when this worker runs ``generation``
        (an older generation's worker is being replaced: its failure is not the workflow's)."""
        return self.failure() if self.generation == generation else None

    def failure(self) -> tuple[str, str] | None:
        """``(reason, message)`` of the fatal error this worker reported, whatever its generation."""
        if self.fatal is None:
            return None
        return self.fatal.get("reason") or "WORKER_FATAL", self.fatal.get("message") or ""

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


# -- tolerant readers for from_json ------------------------------------------------------------
def _int(value: object, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _counts(value: object) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}


def _error(value: object) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        return None
    return {str(k): v for k, v in value.items() if isinstance(v, str)}
