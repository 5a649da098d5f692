"""The first load of one table split across workers (issue 18 item 4): records/s of a first
load of ``records`` contacts at 20 ms of API latency with 1, 2 and 4 `syncplane worker`
processes (``spec.workers``; indices 0..N-1 sharing one state database, as the embedded
supervisor runs them), the 1-worker run as the baseline. Timed from the workers' start to the
last profile at the sandbox (which runs in this process), so the delta token and the range
plan are in the figure.

`python -m benchmarks --only split_load`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from syncplane.model.convert import spec_to_dict
from syncplane_sandbox import SandboxOptions, SeedSpec, start_sandbox
from syncplane_sandbox.quickstart import write_sandbox_secrets
from tests.integration.ingress_env import ingress_spec

WORKERS = (1, 2, 4)


async def _load(records: int, workers: int, latency_ms: float) -> dict[str, Any]:
    sb = await start_sandbox(seed=SeedSpec(contacts=records, seed=1),
                             options=SandboxOptions(request_log_size=10_000))
    sb.faults.set(latency_ms=latency_ms)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            write_sandbox_secrets(sb, d / "secrets")
            spec = ingress_spec(sb, batch_size=1000, poll_seconds=1)
            spec.workers = workers
            (d / "spec.json").write_text(json.dumps(spec_to_dict(spec)))
            (d / "workers").mkdir()
            started = time.perf_counter()
            for i in range(workers):
                cmd = [sys.executable, "-m", "syncplane", "worker", "--workflow", "bench", "--generation", "1",
                       "--index", str(i), "--spec-file", str(d / "spec.json"), "--state-dir", str(d / "workers"),
                       "--secrets-dir", str(d / "secrets"), "--state-db", str(d / "state.db")]
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,  # noqa: ASYNC220
                                              stderr=subprocess.DEVNULL))
            while len(sb.acs.profiles.rows) < records:
                await asyncio.sleep(0.1)  # polling the sandbox's state for the end of the load
                if any(p.poll() is not None for p in procs):
                    raise RuntimeError("a worker exited during the split-load benchmark")
            elapsed = time.perf_counter() - started
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        await sb.stop()
    return {"records": records, "workers": workers, "seconds": round(elapsed, 2),
            "records_per_s": round(records / elapsed, 1)}


async def run(records: int = 20_000, latency_ms: float = 20.0) -> dict[str, Any]:
    """A first load of ``records`` contacts, the sandbox answering after ``latency_ms`` milliseconds, by
    each count of WORKERS: ``{"latency_ms", "workers_N": {"records", "workers", "seconds",
    "records_per_s"}}``."""
    result: dict[str, Any] = {"latency_ms": latency_ms}
    for n in WORKERS:
        result[f"workers_{n}"] = r = await _load(records, n, latency_ms)
        print(f"split first load, {latency_ms:g} ms, {n} worker(s): {r['records_per_s']} rec/s")
    return result
