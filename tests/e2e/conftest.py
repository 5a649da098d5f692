"""The e2e tier: the web console in a real browser, Debian's `chromium` driven by Playwright for
Python through `executable_path` (Playwright's own browser download cannot reach its host here;
`make test` installs the package with apt-get). A missing browser FAILS the tier: never a skip.

Each scenario runs `syncplane up` as a process (its gRPC API and its console on free loopback
ports) against the sandbox emulators, started in the test process on free ports with the
default workflows' secrets written into the data directory. The end state of every scenario
is saved as a screenshot under SCREENSHOTS, which the run prints at its end.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane_sandbox import Faults, Sandbox, SeedSpec, start_sandbox
from syncplane_sandbox.quickstart import write_sandbox_secrets
from tests.backends import eventually
from tests.embedded_plane import worker_processes
from tests.integration.conftest import ServerProcess, wait_until

CHROMIUM = Path(os.environ.get("SYNCPLANE_CHROMIUM", "/usr/bin/chromium"))
# Root needs --no-sandbox; the rest keeps a headless Chromium from calling home or doing extra work.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(os.environ.get("SYNCPLANE_E2E_SCREENSHOTS",
                                  Path(__file__).resolve().parents[2] / "build" / "e2e-screenshots"))
# Generous: the machine is shared and a worker process takes seconds to start under load.
UI_TIMEOUT_MS = 120_000
expect.set_options(timeout=UI_TIMEOUT_MS)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SCREENSHOTS.exists():
        terminalreporter.write_line(f"e2e screenshots of each scenario's end state: {SCREENSHOTS}")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():  # noqa: ASYNC240 (one stat, before the browser starts)
        pytest.fail(f"{CHROMIUM} is missing: the e2e tier needs Debian's chromium (make test installs it with "
                    "apt-get; or set SYNCPLANE_CHROMIUM)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    try:
        yield page
    finally:
        await context.close()


async def screenshot(page: Page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once per scenario)
    path = SCREENSHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


@asynccontextmanager
async def writes_held_until(page: Page, faults: Faults, shown: str, timeout_s: float = 300.0) -> AsyncIterator[None]:
    """Writes to the emulator of ``faults`` held (the sandbox's hold switch) while the block runs and
    until the page shows ``shown`` (a JavaScript predicate, polled in the page, for at most
    ``timeout_s`` seconds), then released: a state that fast writes would pass by (a backlog above
    0) is seen whatever the machine's speed and the workflow's concurrency."""
    with faults.holding():
        yield
        await page.wait_for_function(shown, timeout=timeout_s * 1000)


@dataclass
class Console:
    """`syncplane up` with its console, a gRPC stub to it, and the sandbox it syncs."""

    url: str
    server: ServerProcess
    stub: svc_grpc.WorkflowServiceStub
    channel: grpc.aio.Channel
    sandbox: Sandbox

    def ingress_spec(self, batch_size: int = 100) -> pb.WorkflowSpec:
        from tests.integration.ingress_env import ingress_spec

        return ingress_spec(self.sandbox, batch_size=batch_size)

    async def create(self, name: str, spec: pb.WorkflowSpec | None = None) -> pb.Workflow:
        return await self.stub.CreateWorkflow(svc.CreateWorkflowRequest(
            workflow_id=name, workflow=pb.Workflow(spec=spec or self.ingress_spec())))

    async def get(self, name: str) -> pb.Workflow:
        return await self.stub.GetWorkflow(svc.GetWorkflowRequest(name=f"workflows/{name}"))

    async def sandbox_drained(self, name: str, timeout: float = 240.0) -> None:
        """Every seeded contact is in Campaign and the workflow's backlog is 0."""
        contacts = len(self.sandbox.d365.table("contacts").rows)

        async def check() -> bool:
            return (len(self.sandbox.acs.profiles.rows) >= contacts
                    and (await self.get(name)).status.backlog == 0)

        await eventually(check, f"{name} to write all {contacts} contacts", timeout)

    async def phase_is(self, name: str, phase: int, timeout: float = 120.0) -> None:
        async def check() -> bool:
            return (await self.get(name)).status.phase == phase

        await eventually(check, f"{name} in {pb.Phase.Name(pb.Phase.ValueType(phase))}", timeout)


async def start_console(tmp_path: Path, *extra: str, contacts: int = 2000,
                        latency_ms: float = 10.0) -> AsyncIterator[Console]:
    sandbox = await start_sandbox(seed=SeedSpec(contacts=contacts, events=50, seed=16))
    sandbox.faults.set(latency_ms=latency_ms)   # like a cloud API: the backlog is visible while it drains
    console_port = tmp_path / "console.port"
    server = ServerProcess(tmp_path, "--console-listen", "127.0.0.1:0", "--console-port-file", str(console_port),
                           *extra)
    write_sandbox_secrets(sandbox, tmp_path / "secrets")
    channel: grpc.aio.Channel | None = None
    try:
        await server.ready()
        await wait_until(lambda: console_port.exists(), what="console port")
        channel, stub = server.stub()
        yield Console(f"http://127.0.0.1:{int(console_port.read_text())}/", server, stub, channel, sandbox)
    finally:
        if channel is not None:
            await channel.close()
        await asyncio.to_thread(server.stop)
        for proc in worker_processes(tmp_path):   # a stopped `up` leaves its workers to be re-adopted
            proc.kill()
        await sandbox.stop()


@pytest.fixture
async def console(tmp_path: Path) -> AsyncIterator[Console]:
    async for c in start_console(tmp_path):
        yield c
