"""Handles on worker OS processes: ones we spawned, and ones we adopted after
a control-plane restart (not our children, so watched through psutil)."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from syncplane.contract.names import KEEP_SPEC_SNAPSHOTS, stale_snapshots, state_file

log = logging.getLogger(__name__)


@dataclass
class WorkerProcess:
    workflow: str           # workflow id
    index: int
    generation: int
    pid: int
    popen: subprocess.Popen[bytes] | None = None
    port: int | None = None
    started: float = 0.0
    stopping_since: float | None = None
    killed: bool = False
    report: dict[str, object] = field(default_factory=dict)

    def exit_code(self) -> int | None:
        """None while running; the exit status (or -1 if unknown) once gone."""
        if self.popen is not None:
            return self.popen.poll()
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return -1
            return None
        except psutil.NoSuchProcess:
            return -1

    def signal(self, sig: signal.Signals) -> None:
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass


def spawn(workflow: str, index: int, generation: int, spec_file: Path, state_dir: Path, log_dir: Path,
          orphan_timeout: float, now: float, *, secrets_dir: Path, state_db: Path,
          memory_limit: int | None = None) -> WorkerProcess:
    """Start a worker process; ``memory_limit`` (bytes) caps its data segment (RLIMIT_DATA)."""
    state_file(state_dir, workflow, index).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "syncplane", "worker", "--workflow", workflow, "--index", str(index),
           "--generation", str(generation), "--spec-file", str(spec_file), "--state-dir", str(state_dir),
           "--orphan-timeout", str(orphan_timeout), "--secrets-dir", str(secrets_dir), "--state-db", str(state_db)]
    if memory_limit is not None:
        cmd += ["--memory-limit", str(memory_limit)]
    log_dir.mkdir(parents=True, exist_ok=True)
    # The worker logs to <wf>.<i>.log itself, rotated; what escapes its logging (a traceback
    # before it is set up, an interpreter crash) goes to <wf>.<i>.out, restarted with each worker.
    cmd += ["--log-file", str(log_dir / f"{workflow}.{index}.log")]
    with open(log_dir / f"{workflow}.{index}.out", "wb") as out:
        # A session of its own: a Ctrl-C at the terminal reaches the supervisor,
        # which drains workers deliberately, not every process at once.
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    log.info("started worker %s/%d generation %d pid %d", workflow, index, generation, popen.pid)
    return WorkerProcess(workflow, index, generation, popen.pid, popen=popen, started=now)


def read_port(proc: WorkerProcess, state_dir: Path) -> int | None:
    try:
        data = json.loads(state_file(state_dir, proc.workflow, proc.index).read_text())
    except (OSError, ValueError):
        return None
    return int(data["port"]) if data.get("pid") == proc.pid else None


def adopt_all(state_dir: Path, now: float) -> list[WorkerProcess]:
    """Workers left running by a previous control plane, verified by pid and command line."""
    adopted = []
    for path in sorted(state_dir.glob("*.worker.json")):
        try:
            data = json.loads(path.read_text())
            pid = int(data["pid"])
            cmdline = psutil.Process(pid).cmdline()
        except (OSError, ValueError, KeyError, psutil.Error):
            path.unlink(missing_ok=True)
            continue
        if "worker" not in cmdline or data["workflow"] not in cmdline:
            path.unlink(missing_ok=True)
            continue
        adopted.append(WorkerProcess(data["workflow"], int(data["index"]), int(data["generation"]), pid,
                                     port=int(data["port"]), started=now))
        log.info("adopted worker %s/%s pid %d", data["workflow"], data["index"], pid)
    return adopted


def spec_file(spec_dir: Path, workflow: str, generation: int) -> Path:
    """Where the supervisor writes a generation's applied spec for its workers to read at start."""
    return spec_dir / f"{workflow}.g{generation}.json"


def prune_spec_files(spec_dir: Path, workflow: str, in_use: Iterable[int],
                     keep: int = KEEP_SPEC_SNAPSHOTS) -> list[Path]:
    """Delete the workflow's spec files but those of ``in_use`` generations and the ``keep``
    newest (the rule of :func:`syncplane.contract.names.stale_snapshots`). Returns those
    deleted; other workflows' files are never touched."""
    pattern = re.compile(rf"{re.escape(workflow)}\.g(\d+)\.json")
    files = {int(m.group(1)): p for p in spec_dir.glob(f"{glob.escape(workflow)}.g*.json")
             if (m := pattern.fullmatch(p.name))}
    gone = [files[g] for g in stale_snapshots({g: g for g in files}, in_use, keep)]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone
