"""The workers' state database: deleted workflows are forgotten in every table, the rest kept."""

from __future__ import annotations

from pathlib import Path

from syncplane.connectors.base import Record
from syncplane.optinout.memory import SqliteEchoMemory
from syncplane.worker.checkpoints import STATE_TABLES, SqliteWorkerState, forget_workflows
from syncplane.worker.held import HeldRecords


def fill(path: Path, workflow: str) -> None:
    state, held, memory = SqliteWorkerState(path), HeldRecords(path), SqliteEchoMemory(path)
    try:
        state.commit(workflow, "contact", "delta x")
        state.dead_letter(workflow, "contact", "k1", {"email": "a@example.com"}, 400, "bad")
        state.queue_repairs(workflow, "contact", [Record("k2", {"email": "b@example.com"})])
        held.hold(workflow, "event", "e1", {"id": "e1"}, 404, "no contact yet")
        memory.store(workflow, "crm", {"k1": {"donotemail": True}})
    finally:
        state.close()
        held.close()
        memory.close()


def counts(path: Path, workflow: str) -> dict[str, int]:
    state = SqliteWorkerState(path)
    try:
        return {t: state._db.execute(f"SELECT COUNT(*) FROM {t} WHERE workflow = ?", (workflow,)).fetchone()[0]
                for t in STATE_TABLES}
    finally:
        state.close()


def test_forgets_only_the_workflows_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "worker-state.db"
    assert forget_workflows(path, []) == []   # no database yet: nothing to do, nothing created
    assert not path.exists()
    for wf in ("kept", "gone-1", "gone-2"):
        fill(path, wf)
    assert counts(path, "gone-1") == dict.fromkeys(STATE_TABLES, 1)

    assert forget_workflows(path, ["kept", "never-ran"]) == ["gone-1", "gone-2"]
    assert counts(path, "gone-1") == counts(path, "gone-2") == dict.fromkeys(STATE_TABLES, 0)
    assert counts(path, "kept") == dict.fromkeys(STATE_TABLES, 1)
    assert forget_workflows(path, ["kept"]) == []
