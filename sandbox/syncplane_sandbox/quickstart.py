"""``syncplane-sandbox-up`` (`make run`): `syncplane up` with the emulators beside it.

The quickstart needs no vendor account: the emulators listen on 127.0.0.1:7480 (Dynamics 365) and
:7481 (Campaign), the ports the default workflows point at, seeded with 20,000 contacts and 500
e-mail events; the secret files the defaults reference hold the sandbox's own client; the default
workflows this run creates are started. Every option of `syncplane up` is accepted, plus
``--sandbox-latency``.

This is the only module of the sandbox that imports the product (the emulators themselves are a
witness and know nothing of syncplane); the product never imports the sandbox (import-linter
contracts in pyproject.toml), so the runtime image holds no emulator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import click

from syncplane.cli import up
from syncplane.credentials import write_local_secret
from syncplane_sandbox.seed import SeedSpec
from syncplane_sandbox.server import Sandbox, start_sandbox

log = logging.getLogger(__name__)

#: Where the default workflows (server/syncplane/defaults/*.yaml) expect the emulators.
D365_PORT, ACS_PORT = 7480, 7481


def write_sandbox_secrets(sandbox: Sandbox, secrets_dir: Path) -> None:
    """The secret files the default workflows reference (``<name>.json`` in ``secrets_dir``,
    owner-only), holding the sandbox's own client."""
    for name, data in sandbox.secrets().items():
        write_local_secret(secrets_dir, name, data)


class SandboxCompanion:
    """The emulators as `syncplane up`'s companion (``syncplane.runtime.embedded.Companion``).

    ``latency_ms``: milliseconds each request takes. At cloud-like latency a newcomer sees the backlog
    rise and fall; at loopback speed the 20,000 seeded contacts are synced before `syncplane list`
    can show it.
    """

    start_defaults = True

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self.sandbox: Sandbox | None = None

    async def start(self, secrets_dir: Path) -> None:
        """Start both emulators on their default ports and write the defaults' secret files."""
        self.sandbox = await start_sandbox(d365_port=D365_PORT, acs_port=ACS_PORT,
                                           seed=SeedSpec(contacts=20_000, events=500))
        self.sandbox.faults.set(latency_ms=self.latency_ms)
        write_sandbox_secrets(self.sandbox, secrets_dir)
        log.info("sandbox emulators: Dynamics 365 %s, Campaign %s", self.sandbox.d365_url, self.sandbox.acs_url)

    async def stop(self) -> None:
        """Stop both emulators (their state is in memory and goes with them)."""
        if self.sandbox is not None:
            await self.sandbox.stop()


def _run(sandbox_latency: float, **options: Any) -> None:
    run_up = cast(Callable[..., None], up.callback)   # (a command made by @cli.command has its function)
    run_up(**options, companion=SandboxCompanion(sandbox_latency))


main = click.Command(
    "syncplane-sandbox-up", callback=_run,
    help="Run the embedded control plane (`syncplane up`, same options) with the Dynamics 365 and Campaign "
         "emulators on 127.0.0.1:7480 and :7481, and start the default workflows it creates.",
    params=[*up.params,
            click.Option(["--sandbox-latency"], type=float, default=20.0, show_default=True,
                         help="Milliseconds the emulators take per request, like a cloud API (0: loopback speed).")])

if __name__ == "__main__":
    main()
