"""A stop ends every wait of a worker at once: a backoff, a Retry-After, a read, a token fetch.

A real worker process syncs from the sandbox; a fault makes it wait an hour (a Retry-After of
3600 s, a read held unanswered by the sandbox, a token endpoint throttling for an hour), with a drain
timeout of an hour too. The stop begins (SIGTERM, or the orphan timeout of a worker nobody
polls) once the sandbox's request log shows the worker waiting; the worker must then exit by
itself, with status 0 (drained, not killed), well before any of those hours: the deadline of
the test is a bound on a condition, and an unabandoned wait would run far past it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from syncplane.contract.names import state_file
from syncplane.model.convert import spec_to_dict
from syncplane_sandbox import Sandbox, SeedSpec, start_sandbox
from syncplane_sandbox.common import RequestRecord
from tests.backends import eventually
from tests.integration.ingress_env import ingress_spec, prepare

HOUR = 3600
EXIT_DEADLINE = 60.0   # seconds; every injected wait is an hour


@dataclass(frozen=True)
class Wait:
    """How to make the worker wait, and how the sandbox's log shows it is waiting."""

    inject: Callable[[Sandbox], None]
    waiting: Callable[[RequestRecord], bool]


def _retry_after_on_write(sb: Sandbox) -> None:
    sb.faults.acs.queue(429, count=100_000, retry_after=HOUR, path_regex=r"profileAndServices/profile$")


def _backoff_on_write(sb: Sandbox) -> None:
    sb.faults.acs.queue(500, count=100_000, path_regex=r"profileAndServices/profile$")


def _retry_after_on_read(sb: Sandbox) -> None:
    sb.faults.d365.queue(503, count=100_000, retry_after=HOUR, path_regex=r"/contacts$")


def _held_read(sb: Sandbox) -> None:
    sb.faults.d365.hold(path_regex=r"/contacts$", methods=["GET"])  # unanswered until released


def _token_fetch(sb: Sandbox) -> None:
    sb.faults.acs.queue(503, count=100_000, retry_after=HOUR, path_regex=r"/ims/token")


def _answered(server: str, status: int, path: str = "") -> Callable[[RequestRecord], bool]:
    return lambda r: r.server == server and r.status == status and path in r.path


WAITS = {
    "retry-after-during-a-write": Wait(_retry_after_on_write, _answered("acs", 429, "profileAndServices/profile")),
    "backoff-during-a-write": Wait(_backoff_on_write, _answered("acs", 500, "profileAndServices/profile")),
    "retry-after-on-a-read": Wait(_retry_after_on_read, _answered("d365", 503, "contacts")),
    "read-in-progress": Wait(_held_read, lambda r: r.server == "d365" and r.status is None and "contacts" in r.path),
    "token-fetch": Wait(_token_fetch, _answered("acs", 503, "/ims/token")),
}


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    sb = await start_sandbox(seed=SeedSpec(contacts=300))
    try:
        yield sb
    finally:
        sb.faults.reset()
        await sb.stop()


def start_worker(sb: Sandbox, data_dir: Path, orphan_timeout: float = 0.0) -> subprocess.Popen[bytes]:
    prepare(sb, data_dir)
    spec_file = data_dir / "spec.json"
    spec_file.write_text(json.dumps(spec_to_dict(ingress_spec(sb, batch_size=20))))
    log = open(data_dir / "worker.log", "ab")  # noqa: SIM115 (closed with the process, below)
    return subprocess.Popen(
        [sys.executable, "-m", "syncplane", "worker", "--workflow", "stopper", "--generation", "1",
         "--spec-file", str(spec_file), "--state-dir", str(data_dir), "--secrets-dir", str(data_dir / "secrets"),
         "--state-db", str(data_dir / "worker-state.db"), "--orphan-timeout", str(orphan_timeout),
         "--drain-timeout", str(HOUR)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def exits(proc: subprocess.Popen[bytes], data_dir: Path) -> int:
    try:
        await eventually(lambda: _done(proc), lambda: "the worker to exit after the stop began:\n" +
                         (data_dir / "worker.log").read_text()[-3000:], timeout=EXIT_DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


async def _done(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is not None


async def waiting(sb: Sandbox, wait: Wait, proc: subprocess.Popen[bytes], data_dir: Path) -> None:
    async def check() -> bool:
        assert proc.poll() is None, (data_dir / "worker.log").read_text()
        return any(wait.waiting(r) for r in sb.requests.records())

    await eventually(check, "the worker to reach the injected wait", timeout=120)


@pytest.mark.parametrize("kind", list(WAITS))
async def test_sigterm_abandons_the_wait(sandbox: Sandbox, tmp_path: Path, kind: str):
    wait = WAITS[kind]
    wait.inject(sandbox)
    proc = start_worker(sandbox, tmp_path)
    await waiting(sandbox, wait, proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert await exits(proc, tmp_path) == 0, (tmp_path / "worker.log").read_text()
    log = (tmp_path / "worker.log").read_text()
    assert "drained and stopped" in log and "abandoning it" not in log, log


async def supervise(data_dir: Path) -> None:
    """Poll the worker's /status as its supervisor does (every 0.5 s, with the supervisor's header) until
    cancelled: the orphan timeout counts from the last poll, not from the worker's start."""
    async with aiohttp.ClientSession() as http:
        while True:
            announced = state_file(data_dir, "stopper", 0)
            if announced.exists():
                port = json.loads(announced.read_text())["port"]
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{port}/status",
                                        headers={"X-Syncplane-Supervisor": "1"}) as resp:
                        await resp.read()
            await asyncio.sleep(0.5)  # the supervisor's poll period, not a wait for a condition


async def test_orphan_timeout_during_a_retry_stops_at_once(sandbox: Sandbox, tmp_path: Path):
    """The case seen after Ctrl-C: a worker nobody polls any more, in the middle of a retry.

    The test is the supervisor until the worker waits in its retry, then goes away; a short orphan
    timeout from the worker's start would fire before the first write on a loaded machine."""
    wait = WAITS["retry-after-during-a-write"]
    wait.inject(sandbox)
    proc = start_worker(sandbox, tmp_path, orphan_timeout=2.0)
    supervisor = asyncio.create_task(supervise(tmp_path))
    try:
        await waiting(sandbox, wait, proc, tmp_path)
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
    assert await exits(proc, tmp_path) == 0
    assert "drained and stopped" in (tmp_path / "worker.log").read_text()

