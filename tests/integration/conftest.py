"""The integration tier: the gRPC server in-process on a loopback port, SQLite
on disk, workers as real OS processes.

The `cp` / `authed_cp` fixtures are in tests/backends.py (parametrized over the
backends; here they are the embedded one, built by `_serve`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
import pytest

from syncplane.api.server import ServerSecurity, create_server
from syncplane.credentials import write_local_secret
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.runtime.embedded import embedded_dead_letters, embedded_verifier
from syncplane.runtime.processes import read_port
from syncplane.runtime.supervisor import Supervisor, SupervisorConfig
from syncplane.service import WorkflowService
from syncplane.store.sqlite import SqliteStore
from tests.backends import ConnectedPlane
from tests.factories import UNREACHABLE_SECRETS
from tests.processes import stop_process

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


# Seconds for a `syncplane up` process to listen: a bound, not a speed (on the shared machine, at load 15
# on 2 cores, one took over 30 s).
READY_TIMEOUT = 120.0


async def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a condition of the outside world (the process table) with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def watch_until(stub: svc_grpc.WorkflowServiceStub, name: str, predicate: Callable[[pb.Workflow], bool],
                      start_revision: int, timeout: float = 30.0) -> tuple[pb.Workflow, list[pb.Phase.ValueType]]:
    """Follow WatchWorkflows from a revision until the predicate holds; return the
    workflow and the phases seen on the way (consecutive repeats collapsed)."""
    phases: list[pb.Phase.ValueType] = []

    async def follow() -> pb.Workflow:
        call = stub.WatchWorkflows(svc.WatchWorkflowsRequest(start_revision=start_revision, name=name))
        try:
            async for event in call:
                wf = event.workflow
                if not phases or phases[-1] != wf.status.phase:
                    phases.append(wf.status.phase)
                if predicate(wf):
                    return wf
        finally:
            call.cancel()
        raise AssertionError("watch ended")

    try:
        wf = await asyncio.wait_for(follow(), timeout)
    except TimeoutError as exc:
        raise AssertionError(f"timed out; phases seen: {[pb.Phase.Name(p) for p in phases]}") from exc
    return wf, phases


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


async def _serve(tmp_path: Path, security: ServerSecurity | None = None,
                 config: SupervisorConfig = FAST) -> AsyncIterator[ControlPlane]:
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


@pytest.fixture
async def plane(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """The embedded control plane in-process on ``tmp_path``; its supervisor runs with the config of the
    test's (or module's) ``supervisor`` marker, FAST when it has none."""
    marker = request.node.get_closest_marker("supervisor")
    async for p in _serve(tmp_path, config=marker.args[0] if marker else FAST):
        yield p


class ServerProcess:
    def __init__(self, data_dir: Path, *extra: str, listen: str = "127.0.0.1:0") -> None:
        self.data_dir = data_dir
        write_unreachable_secrets(data_dir)
        self.port_file = data_dir / f"port.{os.getpid()}.{id(self)}"
        self.port_file.unlink(missing_ok=True)
        self.log = open(data_dir / "server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "syncplane", "up", "--data-dir", str(data_dir), "--listen", listen,
             "--port-file", str(self.port_file), "--stop-timeout", "5",
             *(extra if "--defaults" in extra else ("--no-defaults", *extra)),
             # The console on a free port too: tests run side by side (the default is 7444).
             *(() if "--console-listen" in extra else ("--console-listen", "127.0.0.1:0"))],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.port = 0

    async def ready(self) -> None:
        """Wait for the port file. A server that never listens is stopped before the error is raised: a
        fixture failing in its setup never reaches its teardown, and the process would outlive the test."""
        try:
            await wait_until(lambda: self.port_file.exists() or self.proc.poll() is not None, READY_TIMEOUT,
                             what="server port")
            assert self.proc.poll() is None, (self.data_dir / "server.log").read_text()
        except BaseException:
            self.stop()
            raise
        self.port = int(self.port_file.read_text())

    def stub(self) -> tuple[grpc.aio.Channel, svc_grpc.WorkflowServiceStub]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        return channel, svc_grpc.WorkflowServiceStub(channel)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        stop_process(self.proc, sig)
        self.log.close()
