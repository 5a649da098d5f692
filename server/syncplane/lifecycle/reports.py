"""Worker heartbeat reports (the /status JSON, or a Lease annotation) summed into what
the control plane shows: backlog, counters, table sizes, and what is going wrong
(a failing link, records waiting). Pure; the embedded supervisor and the operator
both use it.

A report's ``links`` say how each link a worker uses fares, keyed by ``source``,
``destination`` and ``state_store``: ``{"failing_since": epoch seconds or null,
"error": str, "status": HTTP status or null, "throttled": bool, "concurrency": int,
"max_concurrency": int}`` (the last two: requests in flight allowed now, and at most). Its
``waiting_since`` (epoch seconds or null) is since when records have waited in
its backlog with none written."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from syncplane.lifecycle.reconcile import Trouble
from syncplane.proto.v1 import workflow_pb2 as pb

#: The counters a worker reports, summed as they are (all but records_per_second).
COUNTER_NAMES = ("read", "written", "failed", "dead_lettered", "filtered", "held", "deleted", "resent")
#: A report's link name → the reason prefix of its trouble.
LINKS = {"source": "SOURCE", "destination": "DESTINATION", "state_store": "STATE_STORE"}


@dataclass(frozen=True)
class Totals:
    """The workers' reports summed: backlog (records), counters, table sizes and what goes wrong."""

    backlog: int = 0
    counters: pb.Counters = field(default_factory=pb.Counters)
    tables: dict[str, int] = field(default_factory=dict)
    stale: dict[str, int] = field(default_factory=dict)  # per source table: left at the destination, deletes off
    dead_letters: int | None = None  # None: no worker has counted them yet
    trouble: Trouble | None = None   # the failing link that has failed longest, over all workers
    waiting_since: float | None = None  # the oldest wait of any worker's backlog (epoch seconds)
    # "source" / "destination" → (requests in flight allowed now, at most), summed over the workers.
    concurrency: dict[str, tuple[int, int]] = field(default_factory=dict)


def _int(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _float(value: Any) -> float:
    try:
        return float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _since(value: Any) -> float | None:
    t = _float(value)
    return t if t > 0 else None


def troubles(report: Mapping[str, Any]) -> list[Trouble]:
    """The failing links of one report, e.g. ``SOURCE_UNAVAILABLE`` (5xx, refused connections,
    timeouts) or ``DESTINATION_THROTTLED`` (HTTP 429), oldest first."""
    links = report.get("links")
    found = []
    for name, prefix in LINKS.items():
        link = links.get(name) if isinstance(links, Mapping) else None
        if not isinstance(link, Mapping) or (since := _since(link.get("failing_since"))) is None:
            continue
        kind = "THROTTLED" if link.get("throttled") else "UNAVAILABLE"
        found.append(Trouble(f"{prefix}_{kind}", str(link.get("error") or "")[:500], since))
    return sorted(found, key=lambda t: t.since)


def totals(reports: Iterable[Mapping[str, Any]]) -> Totals:
    """Sum the reports of a workflow's workers (the JSON of `syncplane.contract.report.WorkerReport`;
    an empty mapping for a worker not heard from). Dead letters are counted once per store."""
    counters = pb.Counters()
    backlog = 0
    tables: dict[str, int] = {}
    stale: dict[str, int] = {}
    letters: dict[str, int] = {}  # per dead-letter store: workers sharing one count the same rows
    trouble: Trouble | None = None
    waiting: float | None = None
    concurrency: dict[str, tuple[int, int]] = {}
    for i, r in enumerate(reports):
        backlog += _int(r.get("backlog"))
        c = r.get("counters")
        c = c if isinstance(c, Mapping) else {}
        for name in COUNTER_NAMES:
            setattr(counters, name, getattr(counters, name) + _int(c.get(name)))
        counters.records_per_second += _float(r.get("records_per_second"))
        for failing in troubles(r)[:1]:
            if trouble is None or failing.since < trouble.since:
                trouble = failing
        if _int(r.get("backlog")) > 0 and (w := _since(r.get("waiting_since"))) is not None:
            waiting = w if waiting is None else min(waiting, w)
        links = r.get("links")
        for name in ("source", "destination"):
            link = links.get(name) if isinstance(links, Mapping) else None
            if isinstance(link, Mapping) and _int(link.get("max_concurrency")) > 0:
                limit, most = concurrency.get(name, (0, 0))
                concurrency[name] = (limit + _int(link.get("concurrency")), most + _int(link.get("max_concurrency")))
        for name, per_table in (("tables", tables), ("stale", stale)):
            t = r.get(name)
            if isinstance(t, Mapping):  # a table is one worker's: several reporting it agree
                for table, n in t.items():
                    per_table[str(table)] = max(per_table.get(str(table), 0), _int(n))
        n = r.get("dead_letters")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            store = str(r.get("dead_letter_store") or f"worker {i}")
            letters[store] = max(letters.get(store, 0), n)
    return Totals(backlog, counters, tables, stale, sum(letters.values()) if letters else None, trouble, waiting,
                  concurrency)
