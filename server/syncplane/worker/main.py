"""Entry point of a worker process.

Lifecycle: bind /status on a loopback port, announce it in a state file the
supervisor reads, take secrets, stores and heartbeat from the platform
(:mod:`syncplane.worker.platform`: embedded or kubernetes), run until SIGTERM,
drain, remove the state file, exit 0. When embedded, a worker that nobody
polls for `orphan_timeout` seconds assumes its supervisor is gone for good and
drains itself: no orphans.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from pathlib import Path

from aiohttp import web

from syncplane import metrics, telemetry
from syncplane.contract.names import EXIT_FATAL, state_file
from syncplane.contract.report import WorkerReport
from syncplane.credentials import CredentialsError, check_endpoints
from syncplane.model.convert import spec_from_dict
from syncplane.state.stores import Stores
from syncplane.worker.engine import Engine, FatalError
from syncplane.worker.platform import HeartbeatRejected, Platform
from syncplane.worker.platform.embedded import EmbeddedPlatform

log = logging.getLogger("syncplane.worker")
LOG_MAX_BYTES = 10 * 1024 * 1024   # bytes per worker log file before it rotates
LOG_BACKUPS = 3                     # rotated files kept (<log>.1 … <log>.3)
# Where a container's last words go (the Pod's terminationMessagePath, Kubernetes' default).
TERMINATION_LOG = Path("/dev/termination-log")


@dataclass(frozen=True)
class WorkerOptions:
    workflow: str
    index: int
    generation: int
    spec_file: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 0
    orphan_timeout: float = 0.0
    platform: str = "embedded"       # "embedded" or "kubernetes": see syncplane.worker.platform
    namespace: str = ""
    pod_name: str = ""
    workflow_uid: str = ""           # kubernetes: owner of the ConfigMaps the worker creates
    secrets_dir: Path | None = None  # embedded: <name>.json per secret reference; kubernetes: the mounts
    state_db: Path | None = None     # the worker-state SQLite file (kubernetes: the echo memory only)
    drain_timeout: float = 20.0      # after SIGTERM, how long the batch in flight may take


def platform_of(opts: WorkerOptions) -> Platform:
    """The platform ``opts.platform`` names; raises ValueError for another name."""
    secrets_dir = opts.secrets_dir or opts.state_dir / "secrets"
    state_db = opts.state_db or opts.state_dir / "worker-state.db"
    if opts.platform == "embedded":
        return EmbeddedPlatform(state_db=state_db, secrets_dir=secrets_dir)
    if opts.platform == "kubernetes":
        from syncplane.worker.platform.kubernetes import KubernetesPlatform

        return KubernetesPlatform(namespace=opts.namespace, pod_name=opts.pod_name or f"{opts.workflow}-{os.getpid()}",
                                  workflow=opts.workflow, workflow_uid=opts.workflow_uid, secrets_dir=secrets_dir,
                                  state_db=state_db, holder=opts.pod_name)
    raise ValueError(f"unknown platform {opts.platform!r}")


class Worker:
    def __init__(self, opts: WorkerOptions, platform: Platform | None = None) -> None:
        self.opts = opts
        self.platform = platform or platform_of(opts)
        self.report = WorkerReport(workflow=opts.workflow, index=opts.index, generation=opts.generation)
        metrics.observe_worker(self.report)
        self.last_polled = time.monotonic()
        self.stop = asyncio.Event()
        self.exit_code = 0

    async def status(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Syncplane-Supervisor"):
            self.last_polled = time.monotonic()
        return web.json_response(self.report.to_json())

    async def healthz(self, _: web.Request) -> web.Response:
        if self.report.fatal:
            return web.Response(status=503, text=self.report.fatal.get("message", "fatal"))
        return web.Response(text="ok")

    async def metrics(self, _: web.Request) -> web.Response:
        body, content_type = telemetry.prometheus_exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def run(self) -> int:
        spec = spec_from_dict(json.loads(self.opts.spec_file.read_text()))
        runner, port = await self._serve()
        self._announce(port)
        log.info("worker %s/%d generation %d listening on %s:%d (type %s, platform %s)", self.opts.workflow,
                 self.opts.index, self.opts.generation, self.opts.host, port, spec.type, self.platform.name)
        heartbeat = self.platform.heartbeat(self.report)
        engine_task: asyncio.Task[None] | None = None
        beats: asyncio.Task[None] | None = None
        stores: Stores | None = None
        try:
            secrets = self.platform.secrets(spec)
            check_endpoints(spec, secrets)
            stores = self.platform.stores()
            engine = Engine(self.opts.workflow, spec, secrets, stores, self.report, self.opts.index,
                            holder=self.platform.holder)
            engine_task = asyncio.create_task(engine.run(self.stop))
            engine_task.add_done_callback(self._engine_done)
        except CredentialsError as exc:
            self._fatal(exc.reason, str(exc))
        if heartbeat is not None:
            beats = asyncio.create_task(heartbeat.run(self.stop))
            beats.add_done_callback(self._beats_done)
        try:
            await self._wait()
        finally:
            self.report.set_phase("DRAINING", ready=False)
            self.stop.set()
            if engine_task is not None:
                await self._drain(engine_task)
            if stores is not None:
                await stores.aclose()
            if beats is not None:
                await asyncio.gather(beats, return_exceptions=True)
            if heartbeat is not None:
                await heartbeat.close(remove=self.exit_code == 0)
            state_file(self.opts.state_dir, self.opts.workflow, self.opts.index).unlink(missing_ok=True)
            await runner.cleanup()
        log.info("worker %s/%d drained and stopped", self.opts.workflow, self.opts.index)
        return self.exit_code

    async def _serve(self) -> tuple[web.AppRunner, int]:
        """/status, /healthz and /metrics on ``opts.host:opts.port``, SIGTERM/SIGINT wired to the
        stop; the runner and the port bound (the one asked for, or a free one for port 0)."""
        app = web.Application()
        app.router.add_get("/status", self.status)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.opts.host, self.opts.port)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server) and server.sockets
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        return runner, int(server.sockets[0].getsockname()[1])

    def _fatal(self, reason: str, message: str) -> None:
        # Keep heartbeating the fatal report: the control plane decides (ERROR, then stop).
        log.error("%s: %s", reason, message)
        self.report.fatal = {"reason": reason, "message": message}
        self.report.set_phase("FATAL", ready=False)

    def _beats_done(self, task: asyncio.Task[None]) -> None:
        """A heartbeat the API server refuses: nobody can see this worker's report, so it says why
        where Kubernetes shows it (the container's termination message) and exits EXIT_FATAL."""
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, HeartbeatRejected):
            self._fatal("HEARTBEAT_REJECTED", str(exc))
            try:
                TERMINATION_LOG.write_text(f"HEARTBEAT_REJECTED: {exc}"[:4096])  # Kubernetes keeps 4 KiB
            except OSError:
                pass  # not in a container (the log line above says it)
            self.exit_code = EXIT_FATAL
            self.stop.set()
        elif exc is not None:
            log.error("heartbeat failed", exc_info=exc)

    def _engine_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, FatalError):
            self._fatal(exc.reason, str(exc))
        elif exc is not None:
            log.error("sync engine failed", exc_info=exc)
            self._fatal("INTERNAL", f"sync engine failed: {type(exc).__name__}")

    async def _drain(self, task: asyncio.Task[None]) -> None:
        """Let the engine finish its batch in flight and commit; past the timeout, abandon it
        (nothing after the last commit is lost: it is written again, idempotently, next time)."""
        done, _ = await asyncio.wait({task}, timeout=self.opts.drain_timeout)
        if not done:
            log.warning("the batch in flight did not finish in %.0fs; abandoning it", self.opts.drain_timeout)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _wait(self) -> None:
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), timeout=1.0)
            except TimeoutError:
                pass
            if self.opts.orphan_timeout and time.monotonic() - self.last_polled > self.opts.orphan_timeout:
                log.warning("no supervisor has polled for %.0fs; stopping", self.opts.orphan_timeout)
                return

    def _announce(self, port: int) -> None:
        path = state_file(self.opts.state_dir, self.opts.workflow, self.opts.index)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"workflow": self.opts.workflow, "index": self.opts.index,
                                   "generation": self.opts.generation, "pid": os.getpid(), "port": port}))
        tmp.replace(path)


def configure_logging(log_file: Path | None, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS) -> None:
    """The worker's logging: to stderr, or to ``log_file`` rotated at ``max_bytes`` bytes with
    ``backups`` older files kept (``<log>.1`` newest), so a worker's logs never grow forever."""
    handlers: list[logging.Handler] | None = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers = [RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups)]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        handlers=handlers)


def run(opts: WorkerOptions, log_file: Path | None = None) -> int:
    """Run a worker until it stops; its exit code. Logs as `configure_logging` says."""
    configure_logging(log_file)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request: too much, and URLs carry keys
    resource = {"syncplane.workflow": opts.workflow, "syncplane.worker.index": str(opts.index)}
    if telemetry.otlp_endpoint():
        # Only when spans go somewhere: otherwise the API's no-op tracer costs nothing per vendor request.
        telemetry.setup_tracing("syncplane-worker", attributes=resource)
    telemetry.setup_metrics("syncplane-worker", attributes=resource)
    metrics.WORKFLOW.set(opts.workflow)  # the engine's tasks inherit it: the workflow label of vendor requests
    try:
        return asyncio.run(Worker(opts).run())
    finally:
        telemetry.shutdown()
