"""The worker's durable state on a real SQLite file shared by processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from syncplane.state.sqlite import SqliteWorkerState


def test_checkpoints_survive_a_new_process(tmp_path: Path):
    path = tmp_path / "state.db"
    state = SqliteWorkerState(path)
    assert state.load("wf", "contact") is None
    state.commit("wf", "contact", "delta-1")
    state.commit("wf", "contact", "delta-2")
    state.close()
    code = ("import sys; from pathlib import Path; from syncplane.state.sqlite import SqliteWorkerState; "
            "print(SqliteWorkerState(Path(sys.argv[1])).load('wf', 'contact'))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "delta-2"


def test_dead_letters_count_attempts_and_keep_first_seen(tmp_path: Path):
    state = SqliteWorkerState(tmp_path / "state.db")
    state.dead_letter("wf", "contact", "c-1", {"email": "x"}, 400, "emailaddress1 is too long")
    first = state.dead_letters("wf")[0]
    state.dead_letter("wf", "contact", "c-1", {"email": "y"}, 400, "still too long")
    (again,) = state.dead_letters("wf")
    assert again["attempts"] == 2 and again["first_seen"] == first["first_seen"]
    assert again["last_seen"] >= first["last_seen"] and again["error"] == "still too long"
    assert again["payload"] == '{"email": "y"}'
