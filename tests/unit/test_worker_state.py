"""The workers' state database: deleted workflows are forgotten in every table, the rest kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from syncplane.connectors.base import Record
from syncplane.state.sqlite import STATE_TABLES, SqliteWorkerState, forget_workflows
from tests.sqlite_lock import waits_for_the_lock_without_stalling


def fill(path: Path, workflow: str) -> None:
    state, held, memory = SqliteWorkerState(path), SqliteWorkerState(path), SqliteWorkerState(path)
    try:
        state.commit(workflow, "contact", "delta x")
        state.dead_letter(workflow, "contact", "k1", {"email": "a@example.com"}, 400, "bad")
        state.queue_repairs(workflow, "contact", [Record("k2", {"email": "b@example.com"})])
        held.hold(workflow, "event", "e1", {"id": "e1"}, 404, "no contact yet")
        memory.remember(workflow, "crm", {"k1": {"donotemail": True}})
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


# Every call a worker makes on its SQLite file (checkpoints, dead letters, repairs, held records,
# echo memory): none may hold up the event loop while another connection has the write lock.
# (Reads never wait for a writer in WAL mode.)
LOCKED_CALLS = [
    ("commit a checkpoint", lambda s: s["state"].acommit("wf", "contact", "delta y")),
    ("store a dead letter", lambda s: s["state"].adead_letter("wf", "contact", "k9", {"a": 1}, 400, "bad")),
    ("settle a retry", lambda s: s["state"].asettle_retry("wf", "contact", ["k1"], [], [])),
    ("queue a repair", lambda s: s["state"].aqueue_repairs("wf", "contact", [Record("k3", {"a": 1})])),
    ("hold a record", lambda s: s["held"].ahold("wf", "event", "e2", {"id": "e2"}, 404, "no contact yet")),
    ("release a record", lambda s: s["held"].arelease("wf", "event", "e1")),
    ("store the echo memory", lambda s: s["memory"].aremember("wf", "crm", {"k2": {"donotemail": False}})),
]


@pytest.mark.parametrize(("what", "call"), LOCKED_CALLS, ids=[w for w, _ in LOCKED_CALLS])
async def test_a_held_write_lock_never_stalls_status(tmp_path: Path, what: str, call: Any) -> None:
    """Another connection holds the write lock: the call
    waits for it, but the worker's /status on the same event loop answers within the supervisor's
    poll timeout meanwhile; once the lock goes the call completes."""
    path = tmp_path / "worker-state.db"
    fill(path, "wf")
    stores: dict[str, Any] = {"state": SqliteWorkerState(path), "held": SqliteWorkerState(path),
                              "memory": SqliteWorkerState(path)}
    try:
        await waits_for_the_lock_without_stalling(path, lambda: call(stores), what)
    finally:
        for store in stores.values():
            store.close()


def test_worker_logs_rotate(tmp_path: Path) -> None:
    """A worker logging far past the size bound keeps at most (1 + backups) files of about that size."""
    import subprocess
    import sys

    log = tmp_path / "logs" / "wf.0.log"
    code = ("import logging, sys; from pathlib import Path\n"
            "from syncplane.worker.main import configure_logging\n"
            "configure_logging(Path(sys.argv[1]), max_bytes=4096, backups=2)\n"
            "for i in range(2000): logging.getLogger('syncplane.worker').info('line %d of the worker', i)\n")
    subprocess.run([sys.executable, "-c", code, str(log)], check=True, timeout=120)
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["wf.0.log", "wf.0.log.1", "wf.0.log.2"]
    assert all((log.parent / f).stat().st_size <= 4096 for f in files)
    assert "line 1999 of the worker" in log.read_text()
