"""The integration tier: the gRPC server in-process on a loopback port, SQLite
on disk, workers as real OS processes.

The `cp` / `authed_cp` fixtures are in tests/backends.py (parametrized over the
backends; here they are the embedded one, built by tests/embedded_plane.py's `serve`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from tests.embedded_plane import FAST, ControlPlane, serve, write_unreachable_secrets
from tests.processes import stop_process

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


@pytest.fixture
async def plane(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """The embedded control plane in-process on ``tmp_path``; its supervisor runs with the config of the
    test's (or module's) ``supervisor`` marker, FAST when it has none."""
    marker = request.node.get_closest_marker("supervisor")
    async for p in serve(tmp_path, config=marker.args[0] if marker else FAST):
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
