"""Counters add up: read = written + deleted + filtered + dead_lettered + held + failed + backlog.

A property over random pages and random destination answers (acknowledged, rejected, held,
a transient failure mid-pass, a stop), checked at every write while the pass runs and after
each pass; held records and dead letters re-sent later count apart (``resent``). The real
worker processes are checked the same way in tests/integration/test_status.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.connectors.base import Page, Record, Rejected, WriteResult
from syncplane.connectors.http import RetryableError
from syncplane.contract.report import WorkerReport
from syncplane.state.records import HoldPolicy
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.transform import Action, Transformed
from syncplane.worker.pipeline import Pipeline, Stream

# A record's value says what happens to it: its action, and the destination's answer.
ACTIONS = st.sampled_from(["upsert", "delete", "skip"])
ANSWERS = st.sampled_from(["ok", "ok", "ok", "400", "404"])
RECORD = st.tuples(ACTIONS, ANSWERS)
PAGES = st.lists(st.lists(RECORD, max_size=7), max_size=5)


class ByValue:
    def apply(self, record: Record, full: bool) -> Transformed:
        action = {"upsert": Action.UPSERT, "delete": Action.DELETE, "skip": Action.SKIP}[record.values["action"]]
        return Transformed(action, record.key, {"answer": record.values["answer"]})

    def source_columns(self) -> list[str]:
        return ["action", "answer"]

    def filter_fingerprint(self) -> str:
        return ""


class Source:
    def __init__(self, pages: list[list[tuple[str, str]]], duplicate: bool) -> None:
        self.content = pages
        self.duplicate = duplicate

    async def pages_of(self) -> AsyncIterator[Page]:
        for i, page in enumerate(self.content):
            records = [Record(f"k{i}-{j}", {"action": a, "answer": ans}) for j, (a, ans) in enumerate(page)]
            if self.duplicate and records:  # two changes of one key in a page: the sink writes the last
                records.append(Record(records[0].key, dict(records[0].values)))
            yield Page(records, cursor=f"c{i}")

    def pages(self, table: str, columns: Sequence[str], cursor: str | None) -> AsyncIterator[Page]:
        return self.pages_of()

    async def aclose(self) -> None:
        pass


class Sink:
    """Answers by the record's value; fails transiently at write number ``fail_at`` (if any)
    or sets ``stop`` there; checks the accounting each time it is called."""

    def __init__(self, report: WorkerReport, fail_at: int | None, stop_at: int | None, stop: asyncio.Event) -> None:
        self.report, self.fail_at, self.stop_at, self.stop = report, fail_at, stop_at, stop
        self.calls = 0
        self.release = False  # later passes: the parents exist, held records go through

    async def write(self, resource: str, key_field: str, records: Sequence[Record], *,
                    full_load: bool = False) -> WriteResult:
        assert self.report.unaccounted() == 0, vars(self.report.counters)
        self.calls += 1
        if self.calls == self.fail_at:
            raise RetryableError("503 storm", 503)
        if self.calls == self.stop_at:
            self.stop.set()
        latest = {r.key: r for r in records}
        written, rejected = [], []
        for key, rec in latest.items():
            answer = rec.values.get("answer", "ok")
            if answer == "400" and not rec.deleted:
                rejected.append(Rejected(key, 400, "bad value"))
            elif answer == "404" and not rec.deleted and not self.release:
                rejected.append(Rejected(key, 404, "contact does not exist yet"))
            else:
                written.append(key)
        return WriteResult(written, rejected)

    async def aclose(self) -> None:
        pass


async def run(pages: list[list[tuple[str, str]]], duplicate: bool, batch: int, fail_at: int | None,
              stop_at: int | None, tmp: Path) -> None:
    report = WorkerReport("wf", 0, 1)
    stop = asyncio.Event()
    state = SqliteWorkerState(tmp / "state.db")
    held = SqliteWorkerState(tmp / "held.db")
    sink = Sink(report, fail_at, stop_at, stop)
    pipeline = Pipeline("wf", Stream("s", "t", "r", "key", ByValue()), Source(pages, duplicate), sink, report,
                        batch, checkpoints=state, letters=state, held=held, hold=HoldPolicy())
    try:
        for _ in range(3):  # a pass that may fail or stop, then passes that re-send held records
            try:
                await pipeline.run_once(stop)
            except RetryableError:
                pass
            assert report.unaccounted() == 0, (vars(report.counters), report.backlog)
            if stop.is_set():
                return
            sink.release = True
        assert report.backlog == 0
    finally:
        state.close()
        held.close()


@settings(max_examples=80, deadline=None)
@given(pages=PAGES, duplicate=st.booleans(), batch=st.integers(1, 4),
       fail_at=st.none() | st.integers(1, 6), stop_at=st.none() | st.integers(1, 6))
def test_every_record_read_is_accounted_for(tmp_path_factory, pages, duplicate, batch, fail_at, stop_at):
    asyncio.run(run(pages, duplicate, batch, fail_at, stop_at, tmp_path_factory.mktemp("counters")))
