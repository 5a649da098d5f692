"""The worker heartbeat: one structure, rendered as /status JSON and /metrics."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Counters:
    read: int = 0
    written: int = 0
    failed: int = 0
    dead_lettered: int = 0


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_prometheus(self) -> str:
        labels = f'workflow="{self.workflow}",worker="{self.index}"'
        lines = []

        def metric(name: str, kind: str, help_: str, value: float) -> None:
            lines.extend([f"# HELP syncplane_worker_{name} {help_}", f"# TYPE syncplane_worker_{name} {kind}",
                          f"syncplane_worker_{name}{{{labels}}} {value}"])

        metric("ready", "gauge", "1 when the worker is connected and syncing.", int(self.ready))
        metric("generation", "gauge", "The workflow generation this worker runs.", self.generation)
        metric("backlog", "gauge", "Records read and not yet written.", self.backlog)
        metric("records_read_total", "counter", "Records read from the source.", self.counters.read)
        metric("records_written_total", "counter", "Records acknowledged by the destination.",
               self.counters.written)
        metric("records_failed_total", "counter", "Records that failed to write.", self.counters.failed)
        metric("records_dead_lettered_total", "counter", "Records sent to the dead-letter store.",
               self.counters.dead_lettered)
        metric("records_per_second", "gauge", "Write throughput.", self.records_per_second)
        metric("values_truncated_total", "counter", "Values cut to the destination's length.", self.truncated)
        metric("held_records", "gauge", "Records held until what they point at exists.", self.held)
        if self.dead_letters >= 0:
            metric("dead_letters", "gauge", "Records waiting in the dead-letter store.", self.dead_letters)
        metric("stale_deleted_total", "counter", "Records the source no longer had, deleted after a full read.",
               self.stale_deleted)
        metric("stale_records", "gauge", "Records the source no longer has, left at the destination (deletes off).",
               sum(self.stale.values()))
        metric("resyncs_total", "counter", "Full reads forced by an expired delta token.", self.resyncs)
        return "\n".join(lines) + "\n"
