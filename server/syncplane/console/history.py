"""Recent backlog and records/s per workflow, for the workflow page's chart.

A bounded ring per workflow, filled from the watch stream: at most one sample per
`interval` seconds and `window` seconds of them (by default 10 s and one hour: 360 samples,
a few KiB per workflow). Kept in memory only (no new database): a restarted server starts
a fresh hour, and the browser adds what the stream brings while the page is open.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    time: float               # seconds since the epoch (the store's status time)
    backlog: int              # records
    records_per_second: float


class SampleRing:
    def __init__(self, window: float = 3600.0, interval: float = 10.0) -> None:
        self.window, self.interval = window, interval
        self._rings: dict[str, deque[Sample]] = {}

    def add(self, workflow_id: str, sample: Sample) -> bool:
        """Keep the sample unless the last kept one is less than `interval` seconds older;
        returns whether it was kept. Samples older than `window` seconds fall out."""
        ring = self._rings.setdefault(workflow_id, deque(maxlen=max(1, int(self.window / self.interval) + 1)))
        if ring and sample.time - ring[-1].time < self.interval:
            return False
        ring.append(sample)
        while ring and sample.time - ring[0].time > self.window:
            ring.popleft()
        return True

    def samples(self, workflow_id: str) -> list[Sample]:
        return list(self._rings.get(workflow_id, ()))

    def forget(self, workflow_id: str) -> None:
        self._rings.pop(workflow_id, None)
