"""The embedded supervisor: observe worker processes, call the reconcile core,
converge processes to its decision, write status.

Level-based: every tick (and on every store change) it recomputes from what
is stored and what it sees, so a restart of the control plane resumes from
the same state. Crashes restart with capped exponential backoff; too many
within a window is a crash loop, reported as ERROR.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from syncplane.contract.names import EXIT_FATAL
from syncplane.contract.report import WorkerReport
from syncplane.lifecycle import DEFAULT_POLICY, Observed, Policy, WorkerFailure, reconcile
from syncplane.lifecycle.reports import totals
from syncplane.model.convert import spec_to_dict
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.runtime.processes import WorkerProcess, adopt_all, prune_spec_files, read_port, spawn
from syncplane.runtime.processes import spec_file as spec_path
from syncplane.state.sqlite import forget_workflows
from syncplane.store.base import WorkflowStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisorConfig:
    tick: float = 0.5
    fast_tick: float = 0.05             # while any workflow is STARTING or STOPPING
    stop_timeout: float = 30.0          # SIGTERM, then SIGKILL after this long
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    crash_limit: int = 5                # this many crashes ...
    crash_window: float = 120.0         # ... within this many seconds is a crash loop
    orphan_timeout: float = 30.0        # a worker nobody polls this long stops itself
    poll_timeout: float = 2.0
    # Degraded threshold and automatic restarts from ERROR (seconds): see lifecycle.reconcile.
    policy: Policy = DEFAULT_POLICY
    # Each worker's data segment limit (bytes, RLIMIT_DATA: heap and anonymous mappings): a worker
    # fed more than it can hold fails (MemoryError, a crash) instead of taking the machine with it.
    worker_memory_limit: int = 2 * 1024 ** 3


@dataclass
class WorkerGroup:
    """The supervisor's memory of one workflow's workers."""

    procs: dict[int, WorkerProcess] = field(default_factory=dict)
    crashes: deque[float] = field(default_factory=deque)
    restart_at: dict[int, float] = field(default_factory=dict)
    failure: WorkerFailure | None = None


def backoff(attempt: int, base: float, cap: float) -> float:
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


class Supervisor:
    def __init__(self, store: WorkflowStore, run_dir: Path, config: SupervisorConfig | None = None) -> None:
        self.store = store
        self.config = config or SupervisorConfig()
        self.state_dir = run_dir / "workers"
        self.spec_dir = run_dir / "specs"
        self.log_dir = run_dir / "logs"
        # Beside the run directory: the data directory's secrets and worker state (checkpoints, dead letters).
        self.secrets_dir = run_dir.parent / "secrets"
        self.state_db = run_dir.parent / "worker-state.db"
        for d in (self.state_dir, self.spec_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.groups: dict[str, WorkerGroup] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._transitioning = False
        self._sweep = True  # the workers' state may hold rows of deleted workflows: forget them
        self._http = httpx.AsyncClient(timeout=self.config.poll_timeout,
                                       headers={"X-Syncplane-Supervisor": "embedded"})

    # -- lifecycle of the supervisor itself -------------------------------
    def start(self) -> None:
        now = time.monotonic()
        for proc in adopt_all(self.state_dir, now):
            self.groups.setdefault(proc.workflow, WorkerGroup()).procs[proc.index] = proc
        self._task = asyncio.create_task(self._loop(), name="supervisor")

    def wake(self) -> None:
        self._wake.set()

    async def close(self, stop_workers: bool = False) -> None:
        """Stop supervising. Workers keep running (and are re-adopted by the
        next control plane) unless `stop_workers`."""
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if stop_workers:
            await self.stop_all()
        await self._http.aclose()

    async def stop_all(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.config.stop_timeout)
        procs = [p for g in self.groups.values() for p in g.procs.values()]
        for p in procs:
            p.signal(signal.SIGTERM)
        while procs and time.monotonic() < deadline:
            procs = [p for p in procs if p.exit_code() is None]
            await asyncio.sleep(0.05)
        for p in procs:
            p.signal(signal.SIGKILL)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # (CancelledError is not one: a cancel still ends the loop)
                log.exception("supervisor tick failed; retrying")
            self._wake.clear()
            try:
                delay = self.config.fast_tick if self._transitioning else self.config.tick
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass

    # -- one reconcile pass ------------------------------------------------
    async def tick(self) -> None:
        now = time.monotonic()
        workflows = {wf.name.split("/", 1)[1]: wf for wf in await self.store.list(limit=1_000_000)}
        await self._poll_reports()
        self._transitioning = False
        for wid in list(self.groups.keys() | workflows.keys()):
            group = self.groups.setdefault(wid, WorkerGroup())
            wf = workflows.get(wid)
            self._reap(wid, group, now, keep_running=wf is not None
                       and wf.spec.desired_state == pb.DESIRED_STATE_RUNNING)
            if wf is None:
                self._converge(wid, group, 0, 0, None, now)
                if not group.procs:
                    del self.groups[wid]
                    self._sweep = True
                continue
            applied = await self.store.get_applied(wf.name)
            outcome = reconcile(wf, applied, self._observe(group, wf.status.applied_generation, now),
                                datetime.now(UTC), self.config.policy)
            if outcome.restarted:
                log.info("workflow %s: automatic restart %d after %s", wid, outcome.status.auto_restart.count,
                         wf.status.last_error.reason)
            if outcome.fresh:
                group.crashes.clear()
                group.restart_at.clear()
                group.failure = None
            if outcome.apply is not None:
                applied = outcome.apply
            if outcome.status != wf.status or outcome.apply is not None:
                if outcome.status.phase != wf.status.phase:
                    log.info("workflow %s: %s -> %s", wid, pb.Phase.Name(wf.status.phase),
                             pb.Phase.Name(outcome.status.phase))
                await self.store.set_status(wf.name, outcome.status, outcome.apply)
            self._converge(wid, group, outcome.target_workers, outcome.status.applied_generation, applied, now)
            self._transitioning |= outcome.status.phase in (pb.PHASE_STARTING, pb.PHASE_STOPPING)
        if self._sweep:
            await self._forget_deleted(workflows.keys())

    async def _forget_deleted(self, existing: Collection[str]) -> None:
        """Delete the worker state (checkpoints, dead letters, held records) of deleted workflows
        whose workers are gone. Only this loop starts workers, and not during the call, so no
        worker of a forgotten workflow can be writing; one created again since the listing has
        no worker yet, so it loses nothing either."""
        keep = set(existing) | {wid for wid, g in self.groups.items() if g.procs}
        gone = await asyncio.to_thread(forget_workflows, self.state_db, keep)
        if gone:
            log.info("forgot the worker state of deleted workflows: %s", ", ".join(gone))
        self._sweep = False

    async def _poll_reports(self) -> None:
        procs = [p for g in self.groups.values() for p in g.procs.values()]
        for p in procs:
            if p.port is None:
                p.port = read_port(p, self.state_dir)
        polled = [p for p in procs if p.port is not None]
        results = await asyncio.gather(*(self._http.get(f"http://127.0.0.1:{p.port}/status") for p in polled),
                                       return_exceptions=True)
        for p, res in zip(polled, results, strict=True):
            if isinstance(res, httpx.Response) and res.status_code == 200:
                p.report = res.json()
            else:
                p.report = {}

    def _reap(self, wid: str, group: WorkerGroup, now: float, keep_running: bool) -> None:
        for index, proc in list(group.procs.items()):
            code = proc.exit_code()
            if code is None:
                continue
            del group.procs[index]
            if proc.stopping_since is not None or not keep_running:
                log.info("worker %s/%d (pid %d) stopped with status %s", wid, index, proc.pid, code)
                continue
            fatal = WorkerReport.from_json(proc.report).failure()
            if code == EXIT_FATAL and fatal is not None:
                group.failure = WorkerFailure(*fatal)
                continue
            group.crashes.append(now)
            while group.crashes and now - group.crashes[0] > self.config.crash_window:
                group.crashes.popleft()
            n = len(group.crashes)
            log.warning("worker %s/%d (pid %d) exited unexpectedly with status %s (%d in window)",
                        wid, index, proc.pid, code, n)
            if n >= self.config.crash_limit:
                group.failure = WorkerFailure(
                    "CRASH_LOOP", f"worker {index} exited unexpectedly {n} times within "
                    f"{self.config.crash_window:.0f}s (last exit status {code})")
            else:
                group.restart_at[index] = now + backoff(n, self.config.backoff_base, self.config.backoff_cap)

    def _observe(self, group: WorkerGroup, generation: int, now: float) -> Observed:
        reports = {i: WorkerReport.from_json(p.report) for i, p in group.procs.items()}
        ready = sum(1 for i, p in group.procs.items()
                    if reports[i].ready_at(generation) and p.stopping_since is None)
        for report in reports.values():
            fatal = report.fatal_at(generation)
            if group.failure is None and fatal is not None:
                # A live worker that hit what retrying cannot fix (credentials, a schema change).
                group.failure = WorkerFailure(*fatal)
        summed = totals(p.report for p in group.procs.values())
        restarting = sorted(i for i, t in group.restart_at.items() if t > now or i not in group.procs)
        degraded = f"worker(s) {restarting} restarting after a crash" if restarting and not group.failure else ""
        return Observed(live=len(group.procs), ready=ready, failure=group.failure, backlog=summed.backlog,
                        counters=summed.counters, tables=summed.tables, stale=summed.stale, degraded=degraded,
                        dead_letters=summed.dead_letters, trouble=summed.trouble,
                        waiting_since=summed.waiting_since, concurrency=summed.concurrency)

    def _converge(self, wid: str, group: WorkerGroup, target: int, generation: int,
                  applied: pb.WorkflowSpec | None, now: float) -> None:
        for index, proc in group.procs.items():
            unwanted = index >= target or proc.generation != generation
            if not unwanted:
                continue
            if proc.stopping_since is None:
                log.info("stopping worker %s/%d (pid %d)", wid, index, proc.pid)
                proc.stopping_since = now
                proc.signal(signal.SIGTERM)
            elif not proc.killed and now - proc.stopping_since > self.config.stop_timeout:
                log.warning("worker %s/%d (pid %d) did not drain in %.0fs; killing", wid, index, proc.pid,
                            self.config.stop_timeout)
                proc.killed = True
                proc.signal(signal.SIGKILL)
        if target == 0 or applied is None or group.failure is not None:
            group.restart_at.clear()
            return
        spec_file = spec_path(self.spec_dir, wid, generation)
        if not spec_file.exists():
            spec_file.write_text(json.dumps(spec_to_dict(applied)))
            # One file per generation: keep those in use and the newest few, not every one ever.
            prune_spec_files(self.spec_dir, wid, {generation, *(p.generation for p in group.procs.values())})
        for index in range(target):
            if index in group.procs or group.restart_at.get(index, 0) > now:
                continue
            group.restart_at.pop(index, None)
            group.procs[index] = spawn(wid, index, generation, spec_file, self.state_dir, self.log_dir,
                                       self.config.orphan_timeout, now, secrets_dir=self.secrets_dir,
                                       state_db=self.state_db, memory_limit=self.config.worker_memory_limit)
