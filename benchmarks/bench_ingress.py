"""Ingress throughput, sandbox to sandbox, side by side with two baselines run here:

- the worker: a real `syncplane worker` process running the ingress engine;
- naive: one GET of a page, then one write request per record, in sequence (aiohttp, as the worker);
- the raw read ceiling: Dataverse pages fetched and parsed, nothing written.

Reported: records/s, requests per 1,000 records (reads, writes), the worker's peak RSS
at 50,000 and at 200,000 records (flat is the goal), and the ratios to the baselines.
The sandbox runs in this process; the worker in its own.
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

import aiohttp
import httpx

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.connectors.dynamics import DynamicsSource
from syncplane.connectors.http import Credentials, OAuth2ClientCredentials
from syncplane.model.convert import spec_to_dict
from syncplane.runtime.embedded import write_sandbox_secrets
from syncplane.sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Sandbox, SandboxOptions, SeedSpec, start_sandbox
from tests.integration.ingress_env import ingress_spec

NAIVE_RECORDS = 3_000


def _peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's peak resident set, read while it is alive."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_worker(sb: Sandbox, spec: pb.WorkflowSpec, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Run one `syncplane worker` process on ``spec`` until ``done(report)``; time it and read
    its peak RSS. Returns seconds, peak RSS and the sandbox's request counts per server."""
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
                    if done(report):
                        break
            elapsed = time.perf_counter() - started
            peak = _peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
    return {"seconds": elapsed, "peak_rss_mib": peak, "reads": len(sb.requests.records(server="d365")),
            "acs": len(sb.requests.records(server="acs"))}


async def _worker_run(records: int, latency_ms: float = 0.0) -> dict[str, Any]:
    sb = await start_sandbox(seed=SeedSpec(contacts=records, seed=1),
                             options=SandboxOptions(request_log_size=4 * records + 10_000))
    sb.faults.set(latency_ms=latency_ms)
    try:
        spec = ingress_spec(sb, batch_size=1000, poll_seconds=60)
        run = await run_worker(sb, spec, lambda r: r["counters"]["written"] >= records and r["backlog"] == 0)
        assert len(sb.acs.profiles.rows) == records
    finally:
        await sb.stop()
    elapsed = run["seconds"]
    return {"records": records, "seconds": round(elapsed, 2), "records_per_s": round(records / elapsed, 1),
            "read_requests_per_1000": round(1000 * run["reads"] / records, 2),
            "write_requests_per_1000": round(1000 * run["acs"] / records, 2),
            "worker_peak_rss_mib": round(run["peak_rss_mib"], 1)}


async def _naive(records: int, latency_ms: float = 0.0) -> dict[str, Any]:
    sb = await start_sandbox(seed=SeedSpec(contacts=records, seed=2))
    sb.faults.set(latency_ms=latency_ms)
    try:
        # The same HTTP client library as the worker's connectors (aiohttp), without their pipeline.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), raise_for_status=True) as client:
            form = {"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET,
                    "grant_type": "client_credentials"}
            async with client.post(sb.d365_token_url, data={**form, "scope": sb.d365_scope}) as r:
                d365 = (await r.json())["access_token"]
            async with client.post(sb.acs_token_url, data=form) as r:
                acs = (await r.json())["access_token"]
            started = time.perf_counter()
            async with client.get(f"{sb.d365_url}contacts?$select=contactid,emailaddress1,firstname,lastname",
                                  headers={"Authorization": f"Bearer {d365}",
                                           "Prefer": f"odata.maxpagesize={records}"}) as r:
                page = await r.json()
            headers = {"Authorization": f"Bearer {acs}", "X-Api-Key": SANDBOX_CLIENT_ID}
            for row in page["value"]:
                body = {"externalId": row["contactid"], "email": row["emailaddress1"],
                        "firstName": (row["firstname"] or "")[:30], "lastName": row["lastname"]}
                async with client.post(f"{sb.acs_url}profileAndServices/profile", json=body, headers=headers) as r:
                    await r.read()
            elapsed = time.perf_counter() - started
        return {"records": records, "records_per_s": round(records / elapsed, 1)}
    finally:
        await sb.stop()


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


async def run(records: int = 200_000, small: int = 50_000, latency_ms: float = 20.0) -> dict[str, Any]:
    """Two settings: the sandbox answering at once (CPU-bound: both sides share this 2-core
    machine), and answering after ``latency_ms`` like a cloud API, where concurrency pays."""
    small_run = await _worker_run(small)
    print(f"ingress {small:,}: {small_run}")
    full = await _worker_run(records)
    print(f"ingress {records:,}: {full}")
    naive = await _naive(NAIVE_RECORDS)
    print(f"naive baseline ({NAIVE_RECORDS:,}): {naive}")
    raw = await _raw_read(records)
    print(f"raw read ceiling ({records:,}): {raw}")
    result: dict[str, Any] = {
        "worker_50k": small_run, "worker_200k": full, "naive": naive, "raw_read": raw,
        "ratio_to_naive": round(full["records_per_s"] / naive["records_per_s"], 2),
        "ratio_to_raw_read": round(full["records_per_s"] / raw["records_per_s"], 3),
        "rss_growth_50k_to_200k": round(full["worker_peak_rss_mib"] / small_run["worker_peak_rss_mib"], 2)}
    print(f"ingress, no latency: {result['ratio_to_naive']}x the naive baseline, {result['ratio_to_raw_read']:.1%} "
          f"of the raw read ceiling; worker peak RSS x{result['rss_growth_50k_to_200k']} from 50k to 200k")
    slow_worker = await _worker_run(20_000, latency_ms)
    slow_naive = await _naive(500, latency_ms)
    slow_raw = await _raw_read(records, latency_ms)
    result[f"latency_{latency_ms:g}ms"] = {
        "worker": slow_worker, "naive": slow_naive, "raw_read": slow_raw,
        "ratio_to_naive": round(slow_worker["records_per_s"] / slow_naive["records_per_s"], 2),
        "ratio_to_raw_read": round(slow_worker["records_per_s"] / slow_raw["records_per_s"], 3)}
    r = result[f"latency_{latency_ms:g}ms"]
    print(f"ingress, {latency_ms:g} ms latency: worker {slow_worker['records_per_s']} rec/s, naive "
          f"{slow_naive['records_per_s']} rec/s ({r['ratio_to_naive']}x), raw read {slow_raw['records_per_s']} rec/s "
          f"({r['ratio_to_raw_read']:.1%})")
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)))
