"""The lean write path (worker/pipeline.py): a fixed set of writers over a bounded queue, pages
finishing out of order, cursors committed in order as a watermark.

A property over random pages whose keys repeat across pages, written by a sink that answers
each record after a random delay (so records and pages finish out of order): at every commit,
every record of every page up to the committed cursor was acknowledged; no more writes are in
flight than the sink's writers; the destination ends with each key's newest change (two changes
of one key are written in the order read); the last cursor is the last page's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.connectors.base import Page, Record, WriteResult
from syncplane.contract.report import WorkerReport
from syncplane.transform import Action, Transformed
from syncplane.worker.pipeline import Pipeline, Stream

PAGES = st.lists(st.lists(st.integers(0, 9), max_size=8), min_size=1, max_size=8)  # keys k0..k9


class Identity:
    def apply(self, record: Record, full: bool) -> Transformed:
        return Transformed(Action.UPSERT, record.key, dict(record.values))

    def source_columns(self) -> list[str]:
        return ["version"]

    def filter_fingerprint(self) -> str:
        return ""


class Source:
    def __init__(self, pages: list[list[int]]) -> None:
        self.content = pages

    async def pages_of(self) -> AsyncIterator[Page]:
        for i, keys in enumerate(self.content):
            yield Page([Record(f"k{k}", {"version": (i, j)}) for j, k in enumerate(keys)], cursor=str(i))

    def pages(self, table: str, columns: Sequence[str], cursor: str | None) -> AsyncIterator[Page]:
        return self.pages_of()

    async def aclose(self) -> None:
        pass


class Sink:
    """One request per record, answered after a random delay."""

    per_record = True

    def __init__(self, writers: int, seed: int) -> None:
        self.writers = writers
        self.rng = random.Random(seed)
        self.destination: dict[str, tuple[int, int]] = {}
        self.acknowledged: set[tuple[str, tuple[int, int]]] = set()
        self.in_flight = self.peak = 0

    async def write(self, resource: str, key_field: str, records: Sequence[Record], *,
                    full_load: bool = False) -> WriteResult:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.rng.random() / 2000)
            for r in records:  # the sink writes the last change of a key; all are acknowledged
                self.acknowledged.add((r.key, r.values["version"]))
            last = records[-1]
            self.destination[last.key] = last.values["version"]
            return WriteResult(list({r.key for r in records}), [])
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        pass


class Letters:
    location = "memory"

    async def asettle_retry(self, *args: object) -> None:
        pass

    async def adead_letter_count(self, workflow: str) -> int:
        return 0

    async def amarked_for_retry(self, workflow: str, stream: str) -> list[object]:
        return []


class Checkpoints:
    def __init__(self, pages: list[list[int]], sink: Sink) -> None:
        self.pages, self.sink = pages, sink
        self.commits: list[str] = []

    async def aload(self, workflow: str, stream: str) -> str | None:
        return None

    async def acommit(self, workflow: str, stream: str, raw: str) -> None:
        import json
        cursor = json.loads(raw)["cursor"]
        if cursor is not None:
            upto = int(cursor)
            for i in range(upto + 1):  # the watermark: every record of every page up to it is written
                for j, k in enumerate(self.pages[i]):
                    assert (f"k{k}", (i, j)) in self.sink.acknowledged, (cursor, i, j)
        self.commits.append(raw)


@settings(max_examples=60, deadline=None)
@given(pages=PAGES, writers=st.integers(1, 6), seed=st.integers(0, 1000))
def test_cursors_commit_as_a_watermark_and_each_key_ends_at_its_newest_change(pages, writers, seed):
    async def scenario() -> None:
        sink = Sink(writers, seed)
        checkpoints = Checkpoints(pages, sink)
        report = WorkerReport("wf", 0, 1)
        pipeline = Pipeline("wf", Stream("s", "t", "r", "key", Identity()), Source(pages), sink, report, 3,
                            checkpoints=checkpoints, letters=Letters())  # type: ignore[arg-type]
        assert pipeline.writers == writers
        await pipeline.run_once(asyncio.Event())
        newest: dict[str, tuple[int, int]] = {}
        for i, keys in enumerate(pages):
            for j, k in enumerate(keys):
                newest[f"k{k}"] = (i, j)
        assert sink.destination == newest
        assert sink.peak <= writers
        assert checkpoints.commits and f'"cursor": "{len(pages) - 1}"' in checkpoints.commits[-1]
        assert report.unaccounted() == 0 and report.backlog == 0
        assert report.counters.written == sum(len(p) for p in pages)

    asyncio.run(scenario())
