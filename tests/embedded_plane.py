"""The embedded control plane in-process, shared by the tiers that run it (integration, security, the
backends of tests/backends.py): :func:`serve` builds it, :class:`ControlPlane` is what a test gets, FAST and
CRASH_TOLERANT are its supervisor's configs."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil

from syncplane.api.server import ServerSecurity, create_server
from syncplane.credentials import write_local_secret
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.runtime.embedded import embedded_dead_letters, embedded_verifier
from syncplane.runtime.processes import read_port
from syncplane.runtime.supervisor import Supervisor, SupervisorConfig
from syncplane.service import WorkflowService
from syncplane.store.sqlite import SqliteStore
from tests.backends import ConnectedPlane
from tests.factories import UNREACHABLE_SECRETS

FAST = SupervisorConfig(tick=0.1, stop_timeout=5.0, backoff_base=0.05, backoff_cap=0.5, crash_limit=3,
                        crash_window=60.0, orphan_timeout=30.0, poll_timeout=1.0)
# Crash tests kill the worker on purpose: allow many restarts, quickly. A stop drains its in-flight batch
# against a sandbox that shares the test's event loop: give it a generous grace on a loaded machine.
CRASH_TOLERANT = SupervisorConfig(tick=0.1, stop_timeout=60.0, backoff_base=0.05, backoff_cap=0.5, crash_limit=50,
                                  crash_window=600.0, orphan_timeout=30.0, poll_timeout=1.0)


def write_unreachable_secrets(data_dir: Path) -> None:
    """Secret files for the default specs' references, with token URLs nothing listens on:
    workers hold valid-looking credentials and start; their connectors retry (transient)."""
    for name, data in UNREACHABLE_SECRETS.items():
        write_local_secret(data_dir / "secrets", name, data)


def worker_processes(data_dir: Path) -> list[psutil.Process]:
    """Worker processes belonging to one data directory, from the process table."""
    marker = str(data_dir / "run" / "workers")
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if "worker" in cmd and marker in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@dataclass
class ControlPlane(ConnectedPlane):
    store: SqliteStore
    supervisor: Supervisor
    data_dir: Path

    async def worker_count(self, workflow_id: str) -> int:
        """Live worker processes of a workflow (the process table)."""
        return sum(1 for p in worker_processes(self.data_dir) if _workflow_of(p) == workflow_id)

    async def worker_reports(self, workflow_id: str) -> list[dict[str, Any]]:
        """Each worker's own report: GET /status on its loopback port."""
        reports = []
        async with httpx.AsyncClient() as http:
            for proc in list(self.supervisor.groups[workflow_id].procs.values()):
                port = read_port(proc, self.supervisor.state_dir)
                assert port is not None, f"worker {proc.pid} has no port"
                reports.append((await http.get(f"http://127.0.0.1:{port}/status")).json())
        return reports

    def worker_logs(self) -> list[Path]:
        """The supervisor's worker logs: `<wf>.<i>.log` (rotated) and `.out` (what escaped logging)."""
        logs = self.data_dir / "run" / "logs"
        return sorted([*logs.glob("*.log*"), *logs.glob("*.out")])


def _workflow_of(proc: psutil.Process) -> str:
    cmd = proc.info["cmdline"] or []
    return str(cmd[cmd.index("--workflow") + 1]) if "--workflow" in cmd[:-1] else ""


async def serve(tmp_path: Path, security: ServerSecurity | None = None,
                config: SupervisorConfig = FAST) -> AsyncIterator[ControlPlane]:
    """The embedded control plane in-process on ``tmp_path``: the gRPC server on a free loopback port
    (``security``: its token and TLS, none by default), SQLite on disk, the local supervisor (``config``)
    running workers as real OS processes, and a channel to it; yielded once. At the end every worker is
    stopped, and one left behind fails the test (AssertionError) after being killed."""
    write_unreachable_secrets(tmp_path)
    store = SqliteStore(tmp_path / "syncplane.db")
    supervisor = Supervisor(store, tmp_path / "run", config)
    service = WorkflowService(store, on_change=supervisor.wake)
    server, port, _ = await create_server(service, "127.0.0.1:0", security,
                                          dead_letters=embedded_dead_letters(store, supervisor),
                                          verifier=embedded_verifier(store, supervisor))
    supervisor.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield ControlPlane(svc_grpc.WorkflowServiceStub(channel), channel, port, store, supervisor, tmp_path)
    finally:
        await channel.close()
        await server.stop(grace=1)
        await supervisor.close(stop_workers=True)
        store.close()
        leftovers = worker_processes(tmp_path)
        for proc in leftovers:
            os.kill(proc.pid, signal.SIGKILL)
        assert not leftovers, f"worker processes left behind: {[p.pid for p in leftovers]}"
