"""`syncplane up`: the embedded control plane in one process.

SQLite store + local supervisor + gRPC server. On SIGTERM/SIGINT the server
drains in-flight RPCs, then stops the workers (each drains its batch in flight);
desired states are kept, so the next `syncplane up` on the same data directory
starts them again from their checkpoints. If the process dies instead (kill -9),
its workers keep running and the next `up` re-adopts them (or they stop
themselves after the orphan timeout).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from syncplane.api.server import ServerSecurity, check_bind, create_server, serve_until_signalled
from syncplane.console import ConsoleConfig, announce_console, serve_console
from syncplane.errors import AlreadyExists
from syncplane.model.convert import from_resource
from syncplane.private_files import PRIVATE_UMASK, make_private_dir
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.runtime.supervisor import Supervisor, SupervisorConfig
from syncplane.service import WorkflowService
from syncplane.service.dead_letters import DeadLetterService, SqliteDeadLetters
from syncplane.service.verify import EmbeddedVerifyEnvironment, LocalVerifyRunner, VerifyService
from syncplane.startup import startup_line
from syncplane.store.sqlite import SqliteStore
from syncplane.telemetry import serve_metrics, setup_metrics, setup_tracing

log = logging.getLogger(__name__)
DEFAULTS_DIR = Path(__file__).resolve().parent.parent / "defaults"


class Companion(Protocol):
    """Something `syncplane up` runs beside the control plane: the sandbox package's emulators
    (``syncplane_sandbox.quickstart``, `make run`), which the product itself never imports.

    ``start`` runs before the supervisor starts, with the directory of the local secret files it
    may write (``<name>.json``); ``stop`` after the workers stopped. ``start_defaults``: start the
    default workflows this run created (there is something for them to sync).
    """

    start_defaults: bool

    async def start(self, secrets_dir: Path) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class EmbeddedConfig:
    data_dir: Path
    address: str = "127.0.0.1:7443"
    security: ServerSecurity = field(default_factory=ServerSecurity)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    with_defaults: bool = False
    otlp_endpoint: str | None = None
    metrics_address: str | None = None   # host:port of the server's /metrics (Prometheus); None: not served
    port_file: Path | None = None
    # Run beside the control plane (the sandbox's emulators, whose default ports the default
    # workflows point at: the quickstart needs no vendor account).
    companion: Companion | None = None
    # The web console, on its own loopback port next to gRPC (None: not served).
    console: ConsoleConfig | None = None
    console_port_file: Path | None = None


async def create_default_workflows(service: WorkflowService, directory: Path = DEFAULTS_DIR) -> list[str]:
    """The three default workflows (ingress, egress, opt-in/out), created stopped."""
    created = []
    for path in sorted(directory.glob("*.yaml")):  # noqa: ASYNC240 (three tiny files, at start-up)
        workflow_id, wf = from_resource(yaml.safe_load(path.read_text()))
        try:
            await service.create(svc.CreateWorkflowRequest(workflow_id=workflow_id, workflow=wf))
            created.append(workflow_id)
        except AlreadyExists:
            pass
    return created


def embedded_dead_letters(store: SqliteStore, supervisor: Supervisor) -> DeadLetterService:
    """The dead letters the local workers keep, in the data directory's worker-state.db."""
    return DeadLetterService(store, SqliteDeadLetters(supervisor.state_db))


def embedded_verifier(store: SqliteStore, supervisor: Supervisor) -> VerifyService:
    """Verify with the local secret files and the local workers' state file."""
    return VerifyService(store, LocalVerifyRunner(store, EmbeddedVerifyEnvironment(supervisor.secrets_dir,
                                                                                  supervisor.state_db)))


async def serve(config: EmbeddedConfig, stop: asyncio.Event | None = None) -> None:
    if config.console is not None:   # refuse an insecure console before anything starts
        check_bind(config.console.address, config.console.security)
    setup_tracing("syncplane-server", config.otlp_endpoint)
    setup_metrics("syncplane-server", config.otlp_endpoint)
    if config.metrics_address:
        serve_metrics(config.metrics_address)
    # Customer data (dead letters carry names and e-mails), logs, specs, secrets: owner only,
    # for everything this process and its workers create.
    os.umask(PRIVATE_UMASK)
    make_private_dir(config.data_dir)
    store = SqliteStore(config.data_dir / "syncplane.db")
    supervisor = Supervisor(store, config.data_dir / "run", config.supervisor)
    service = WorkflowService(store, on_change=supervisor.wake)
    letters = embedded_dead_letters(store, supervisor)
    server, port, health = await create_server(service, config.address, config.security, dead_letters=letters,
                                               verifier=embedded_verifier(store, supervisor))
    try:
        console = await serve_console(config.console, service, letters, config.console_port_file)
    except BaseException:
        await server.stop(None)
        store.close()
        raise
    companion = config.companion
    if companion is not None:
        await companion.start(supervisor.secrets_dir)
    # Before the defaults: each create and start answers once the supervisor has observed it.
    supervisor.start()
    if config.with_defaults:
        created = await create_default_workflows(service)
        if created:
            log.info("created default workflows: %s", ", ".join(created))
        if created and companion is not None and companion.start_defaults:
            # With the sandbox there is something to sync: run the defaults (once; a stop sticks).
            for name in created:
                await service.start(svc.StartWorkflowRequest(name=f"workflows/{name}"))
    if console is not None:
        announce_console(console[1])
    host = config.address.rsplit(":", 1)[0]
    log.info(startup_line("server", listen=f"{host}:{port}", tls=config.security.tls,
                          backend="embedded", data_dir=config.data_dir,
                          console=console[1] if console is not None else "off"))
    await serve_until_signalled(server, health, port, config.port_file, stop)
    if console is not None:
        await console[0].cleanup()
    # An interactive stop (Ctrl-C, SIGTERM) stops the workers too: each drains its batch in flight
    # and commits. Desired states stay as they are, so the next `up` starts the same workers again,
    # from their checkpoints. (A control plane that dies, kill -9, leaves them running: the next
    # `up` re-adopts them, or they stop themselves after --orphan-timeout.)
    log.info("RPCs drained; stopping the workers (each finishes its batch in flight)")
    await supervisor.close(stop_workers=True)
    log.info("workers stopped; the next `syncplane up` resumes them")
    if companion is not None:
        await companion.stop()
    store.close()
