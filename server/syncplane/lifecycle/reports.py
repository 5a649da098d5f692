"""Worker heartbeat reports (the /status JSON, or a Lease annotation) summed into what
the control plane shows: backlog, counters and table sizes. Pure; the embedded
supervisor and the operator both use it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from syncplane.api.v1 import workflow_pb2 as pb


@dataclass(frozen=True)
class Totals:
    backlog: int = 0
    counters: pb.Counters = field(default_factory=pb.Counters)
    tables: dict[str, int] = field(default_factory=dict)
    dead_letters: int | None = None  # None: no worker has counted them yet


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


def totals(reports: Iterable[Mapping[str, Any]]) -> Totals:
    counters = pb.Counters()
    backlog = 0
    tables: dict[str, int] = {}
    letters: dict[str, int] = {}  # per dead-letter store: workers sharing one count the same rows
    for i, r in enumerate(reports):
        backlog += _int(r.get("backlog"))
        c = r.get("counters")
        c = c if isinstance(c, Mapping) else {}
        counters.read += _int(c.get("read"))
        counters.written += _int(c.get("written"))
        counters.failed += _int(c.get("failed"))
        counters.dead_lettered += _int(c.get("dead_lettered"))
        counters.records_per_second += _float(r.get("records_per_second"))
        t = r.get("tables")
        if isinstance(t, Mapping):
            for table, rows in t.items():
                tables[str(table)] = max(tables.get(str(table), 0), _int(rows))
        n = r.get("dead_letters")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            store = str(r.get("dead_letter_store") or f"worker {i}")
            letters[store] = max(letters.get(store, 0), n)
    return Totals(backlog, counters, tables, sum(letters.values()) if letters else None)
