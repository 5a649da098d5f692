"""An ingress worker's engine in this process, against the sandbox over real HTTP.

For property tests that run hundreds of passes: a worker process per example would
cost seconds each. Everything under the runner is real: the connectors speak HTTP to
the sandbox emulators, checkpoints, dead letters and held records live in a SQLite
file. The destination is then read from the sandbox (the outside world).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from syncplane.contract.report import WorkerReport
from syncplane.credentials import ConnectionSecret
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.state.factory import embedded_stores
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.worker.engine import IngressRunner
from syncplane_sandbox import Sandbox


def sandbox_secrets(sandbox: Sandbox) -> dict[str, ConnectionSecret]:
    """The secrets the test specs reference (tests.factories: d365-sandbox, acs-sandbox)."""
    return {name: ConnectionSecret.parse(name, f"secret {name}", data) for name, data in sandbox.secrets().items()}


class InProcessIngress:
    """``await run.passes(n)`` runs n ingress passes; ``report`` is the worker's heartbeat."""

    def __init__(self, sandbox: Sandbox, spec: pb.WorkflowSpec, state_dir: Path, workflow: str = "wf") -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state = SqliteWorkerState(state_dir / "worker-state.db")
        self.held = self.state
        self.report = WorkerReport(workflow, 0, 1)
        self.workflow = workflow
        self.runner = IngressRunner(workflow, spec, sandbox_secrets(sandbox),
                                    embedded_stores(self.state), self.report,
                                    spec.batch_size or 500, 0)

    async def passes(self, n: int = 1) -> None:
        for _ in range(n):
            await self.runner.run_once(asyncio.Event())

    def held_keys(self, stream: str) -> set[str]:
        return {h.key for h in self.held.all(self.workflow, stream)}

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.state.dead_letters(self.workflow)

    async def aclose(self) -> None:
        await self.runner.aclose()
        self.held.close()
        self.state.close()


def run_example(scenario: Callable[[Path], Coroutine[Any, Any, None]]) -> None:
    """Run one Hypothesis example's ``scenario`` on an event loop and in a state directory of its own
    (an example cannot use pytest's per-test ``tmp_path`` nor its loop: it runs many times per test)."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp)))
