"""Ingress throughput, sandbox to sandbox, side by side with baselines run here:

- the worker: a real `syncplane worker` process running the ingress engine;
- the bare writer (benchmarks/bare_writer.py, its own process): a read of every contact, then
  one POST per record from the same number of coroutines as the worker has requests in flight,
  aiohttp as the worker, nothing else;
- concurrency / latency: what N requests in flight at L seconds each allow at most;
- the raw read ceiling: Dataverse pages fetched and parsed, nothing written.

Reported: records/s (whole run, and steady: between the first and the last record written),
CPU per record (worker) and per request (bare writer), requests per 1,000 records, the worker's
peak RSS at 50,000 and at 200,000 records (flat is the goal), and the ratios to the baselines.
The sandbox runs in this process; the worker and the bare writer each in their own.

`python -m benchmarks --only ingress` runs it at 0 ms; `--only ingress_latency` at 20 ms with
16, 52 and 128 requests in flight (the worker's spec.destination.maxConcurrency).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from syncplane.connectors.dynamics import DynamicsSource
from syncplane.connectors.http import Credentials, OAuth2ClientCredentials
from syncplane.model.convert import spec_to_dict
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.validation.rules import DEFAULT_MAX_CONCURRENCY_CAMPAIGN
from syncplane_sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Sandbox, SandboxOptions, SeedSpec, start_sandbox
from syncplane_sandbox.quickstart import write_sandbox_secrets
from tests.integration.ingress_env import ingress_spec

#: Requests in flight compared at 20 ms: the old fixed cap, Dataverse's per-user limit, beyond it.
CONCURRENCIES = (16, 52, 128)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (/proc/PID/stat fields 14 and 15), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set, read while it is alive."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_worker(sb: Sandbox, spec: pb.WorkflowSpec, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Run one `syncplane worker` process on ``spec`` until ``done(report)``; time it and read
    its peak RSS. Returns seconds, peak RSS, the sandbox's request counts per server, and the
    steady span: written records, seconds and worker CPU seconds from the first status that
    showed a record written to the end."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_sandbox_secrets(sb, d / "secrets")
        (d / "spec.json").write_text(json.dumps(spec_to_dict(spec)))
        (d / "workers").mkdir()
        cmd = [sys.executable, "-m", "syncplane", "worker", "--workflow", "bench", "--generation", "1",
               "--spec-file", str(d / "spec.json"), "--state-dir", str(d / "workers"),
               "--secrets-dir", str(d / "secrets"), "--state-db", str(d / "state.db")]
        log = open(d / "worker.log", "wb")  # noqa: SIM115,ASYNC230 (once, before timing)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)  # noqa: ASYNC220
        first: tuple[int, float, float] | None = None
        try:
            port_file = d / "workers" / "bench.0.worker.json"
            async with httpx.AsyncClient() as client:
                while True:
                    await asyncio.sleep(0.25)
                    if proc.poll() is not None:
                        raise RuntimeError((d / "worker.log").read_text()[-2000:])
                    if not port_file.exists():
                        continue
                    port = json.loads(port_file.read_text())["port"]
                    report = (await client.get(f"http://127.0.0.1:{port}/status")).json()
                    written = report["counters"]["written"]
                    if first is None and written > 0:
                        first = (written, time.perf_counter(), _cpu_seconds(proc.pid))
                    if done(report):
                        break
            elapsed = time.perf_counter() - started
            end = (written, time.perf_counter(), _cpu_seconds(proc.pid))
            peak = _peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    assert first is not None
    return {"seconds": elapsed, "peak_rss_mib": peak, "reads": len(sb.requests.records(server="d365")),
            "acs": len(sb.requests.records(server="acs")), "steady_records": end[0] - first[0],
            "steady_seconds": end[1] - first[1], "steady_cpu_s": end[2] - first[2]}


async def _worker_run(records: int, latency_ms: float = 0.0, concurrency: int | None = None) -> dict[str, Any]:
    """The worker on ``records`` contacts; ``concurrency``: its destination's requests in flight
    (None: the spec's default)."""
    sb = await start_sandbox(seed=SeedSpec(contacts=records, seed=1),
                             options=SandboxOptions(request_log_size=4 * records + 10_000))
    sb.faults.set(latency_ms=latency_ms)
    try:
        spec = ingress_spec(sb, batch_size=1000, poll_seconds=60)
        if concurrency is not None:
            spec.destination.max_concurrency = concurrency  # the writes; the reads are sequential pages
        run = await run_worker(sb, spec, lambda r: r["counters"]["written"] >= records and r["backlog"] == 0)
        assert len(sb.acs.profiles.rows) == records
    finally:
        await sb.stop()
    elapsed = run["seconds"]
    return {"records": records, "seconds": round(elapsed, 2), "records_per_s": round(records / elapsed, 1),
            "read_requests_per_1000": round(1000 * run["reads"] / records, 2),
            "write_requests_per_1000": round(1000 * run["acs"] / records, 2),
            "worker_peak_rss_mib": round(run["peak_rss_mib"], 1),
            "steady_records_per_s": round(run["steady_records"] / run["steady_seconds"], 1),
            "cpu_ms_per_record": round(1000 * run["steady_cpu_s"] / run["steady_records"], 4)}


async def _bare(records: int, concurrency: int, latency_ms: float = 0.0) -> dict[str, Any]:
    """The bare writer (its own process) on ``records`` contacts with ``concurrency`` writers."""
    sb = await start_sandbox(seed=SeedSpec(contacts=records, seed=2),
                             options=SandboxOptions(request_log_size=records + 1000))
    sb.faults.set(latency_ms=latency_ms)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.bare_writer", sb.d365_url, sb.acs_url, sb.d365_token_url,
            sb.acs_token_url, sb.d365_scope, str(concurrency), stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"bare writer exited with {proc.returncode}")
        run = json.loads(out)
        assert len(sb.acs.profiles.rows) == records
    finally:
        await sb.stop()
    return {"records": records, "concurrency": concurrency, "records_per_s": round(records / run["seconds"], 1),
            "cpu_ms_per_request": round(1000 * run["cpu_s"] / records, 4)}


async def _raw_read(records: int, latency_ms: float = 0.0) -> dict[str, Any]:
    sb = await start_sandbox(seed=SeedSpec(contacts=records, seed=3))
    sb.faults.set(latency_ms=latency_ms)
    try:
        tokens = OAuth2ClientCredentials(sb.d365_token_url, Credentials(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET,
                                                                        scope=sb.d365_scope))
        src = DynamicsSource(sb.d365_url, tokens, key_column="contactid")
        started = time.perf_counter()
        n = 0
        async for page in src.pages("contacts", ["emailaddress1", "firstname", "lastname"], None):
            n += len(page.records)
        elapsed = time.perf_counter() - started
        await src.aclose()
        await tokens.aclose()
        assert n == records
        return {"records": records, "records_per_s": round(records / elapsed, 1)}
    finally:
        await sb.stop()


async def run(records: int = 200_000, small: int = 50_000, concurrency: int = DEFAULT_MAX_CONCURRENCY_CAMPAIGN
              ) -> dict[str, Any]:
    """The sandbox answering at once (CPU-bound: every side shares this 2-core machine): the
    worker at ``concurrency`` writes in flight (default: its default to Campaign) against the bare
    writer at the same concurrency (set on both: the worker's default and the bare writer's once differed)."""
    small_run = await _worker_run(small, concurrency=concurrency)
    print(f"ingress {small:,}: {small_run}")
    full = await _worker_run(records, concurrency=concurrency)
    print(f"ingress {records:,}: {full}")
    bare = await _bare(small, concurrency)
    print(f"bare writer ({small:,}, {concurrency} in flight): {bare}")
    raw = await _raw_read(records)
    print(f"raw read ceiling ({records:,}): {raw}")
    result: dict[str, Any] = {
        "worker_50k": small_run, "worker_200k": full, "bare_writer": bare, "raw_read": raw,
        "ratio_to_bare_writer": round(full["steady_records_per_s"] / bare["records_per_s"], 3),
        "cpu_ratio_to_bare_writer": round(full["cpu_ms_per_record"] / bare["cpu_ms_per_request"], 3),
        "ratio_to_raw_read": round(full["records_per_s"] / raw["records_per_s"], 3),
        "rss_growth_50k_to_200k": round(full["worker_peak_rss_mib"] / small_run["worker_peak_rss_mib"], 2)}
    print(f"ingress, no latency: {result['ratio_to_bare_writer']}x the bare writer, CPU per record "
          f"{result['cpu_ratio_to_bare_writer']}x; worker peak RSS x{result['rss_growth_50k_to_200k']} 50k to 200k")
    return result


async def run_latency(records: int = 20_000, latency_ms: float = 20.0,
                      concurrencies: tuple[int, ...] = CONCURRENCIES) -> dict[str, Any]:
    """The sandbox answering after ``latency_ms`` like a cloud API, where concurrency pays: the
    worker at each concurrency against the bare writer at the same one and concurrency / latency."""
    result: dict[str, Any] = {"latency_ms": latency_ms}
    for c in concurrencies:
        worker = await _worker_run(records, latency_ms, c)
        bare = await _bare(records, c, latency_ms)
        ceiling = c / (latency_ms / 1000.0)
        result[f"concurrency_{c}"] = {
            "worker": worker, "bare_writer": bare, "concurrency_over_latency": ceiling,
            "ratio_to_bare_writer": round(worker["steady_records_per_s"] / bare["records_per_s"], 3),
            "ratio_to_ceiling": round(worker["steady_records_per_s"] / ceiling, 3)}
        print(f"ingress {latency_ms:g} ms, {c} in flight: worker {worker['steady_records_per_s']} rec/s, bare "
              f"{bare['records_per_s']} rec/s, ceiling {ceiling:g} rec/s")
    return result


