"""The embedded store's bounds: what would otherwise grow without limit while it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncplane.errors import Unavailable
from syncplane.store.sqlite import WATCH_QUEUE, SqliteStore
from tests.factories import workflow


async def test_a_slow_watcher_is_dropped_with_a_revision_to_resume_from(tmp_path: Path) -> None:
    """A watcher that stops reading while changes keep coming holds at most WATCH_QUEUE of them;
    past that it ends with WATCH_FELL_BEHIND and a revision; watching again from it yields every
    later change, none lost, none repeated."""
    store = SqliteStore(tmp_path / "syncplane.db")
    try:
        names = [f"wf-{i}" for i in range(WATCH_QUEUE + 50)]
        await store.create(workflow(name="wf-zero"))
        since = store.revision()
        first = await store.create(workflow(name="wf-first"))
        slow = store.watch(start_revision=since)
        got = [(await anext(slow)).workflow.name]        # subscribed, then stops reading
        names = [(await store.create(workflow(name=name))).name for name in names]
        with pytest.raises(Unavailable) as exc:
            async for change in slow:
                got.append(change.workflow.name)
        assert exc.value.reason == "WATCH_FELL_BEHIND"
        assert len(got) <= WATCH_QUEUE + 1
        resume = int(exc.value.metadata["resume_revision"])
        async for change in store.watch(start_revision=resume):
            got.append(change.workflow.name)
            if change.workflow.name == names[-1]:
                break
        assert got == [first.name, *names]
    finally:
        store.close()
