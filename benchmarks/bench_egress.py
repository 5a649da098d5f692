"""Egress throughput: Campaign events to Dynamics activities through a real worker process
($batch upserts keyed by event id), side by side with a naive baseline run here: one GET of
the events, then one PATCH per event. Reported: events/s and requests per 1,000 events."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from benchmarks.bench_ingress import run_worker
from syncplane.connectors.base import Record
from syncplane.egress.transform import EventTransform
from syncplane.transform import Action
from syncplane_sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, SandboxOptions, SeedSpec, start_sandbox
from tests.factories import spec as default_spec

NAIVE_EVENTS = 2_000


def _wanted(sb: Any) -> int:
    return sum(1 for e in sb.acs.events.rows.values()
               if e["eventType"] != "bounce" or e["bounceType"] == "hard")


async def _worker(events: int) -> dict[str, Any]:
    sb = await start_sandbox(seed=SeedSpec(contacts=5_000, events=events, seed=8),
                             options=SandboxOptions(request_log_size=events + 10_000))
    try:
        spec = default_spec("egress")
        spec.source.endpoint, spec.destination.endpoint = sb.acs_url, sb.d365_url
        spec.batch_size, spec.poll_interval.seconds = 1000, 60
        target = _wanted(sb)
        run = await run_worker(sb, spec, lambda r: r["counters"]["written"] >= target and r["backlog"] == 0)
        assert len(sb.d365.table("new_emailevents").rows) == target
        n = len(sb.acs.events.rows)
        return {"events": n, "activities": target, "events_per_s": round(n / run["seconds"], 1),
                "requests_per_1000": round(1000 * (run["reads"] + run["acs"]) / n, 2),
                "worker_peak_rss_mib": round(run["peak_rss_mib"], 1)}
    finally:
        await sb.stop()


async def _naive(events: int) -> dict[str, Any]:
    sb = await start_sandbox(seed=SeedSpec(contacts=1_000, events=events, seed=9))
    try:
        transform = EventTransform(default_spec("egress").egress)
        # The same HTTP client library as the worker's connectors (aiohttp), without their pipeline.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), raise_for_status=True) as client:
            form = {"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET,
                    "grant_type": "client_credentials"}
            async with client.post(sb.acs_token_url, data=form) as r:
                acs = (await r.json())["access_token"]
            async with client.post(sb.d365_token_url, data={**form, "scope": sb.d365_scope}) as r:
                d365 = (await r.json())["access_token"]
            started = time.perf_counter()
            async with client.get(f"{sb.acs_url}events?_lineCount=10000",
                                  headers={"Authorization": f"Bearer {acs}", "X-Api-Key": SANDBOX_CLIENT_ID}) as r:
                page = await r.json()
            requests = 1
            for row in page["content"]:
                out = transform.apply(Record(row["eventId"], row), False)
                if out.action != Action.UPSERT:
                    continue
                async with client.patch(f"{sb.d365_url}new_emailevents(new_eventid='{out.key}')", json=out.values,
                                        headers={"Authorization": f"Bearer {d365}"}) as r:
                    await r.read()
                requests += 1
            elapsed = time.perf_counter() - started
        n = len(page["content"])
        return {"events": n, "events_per_s": round(n / elapsed, 1), "requests_per_1000": round(1000 * requests / n, 2)}
    finally:
        await sb.stop()


async def run(events: int = 50_000) -> dict[str, Any]:
    """``events`` Campaign events through a worker, and NAIVE_EVENTS through the naive baseline:
    ``{"worker": {"events", "activities", "events_per_s", ...}, "naive": {"events", "events_per_s",
    "requests_per_1000"}, "ratio_to_naive"}`` (events per second, worker over naive)."""
    worker = await _worker(events)
    print(f"egress worker: {worker}")
    naive = await _naive(NAIVE_EVENTS)
    print(f"egress naive ({NAIVE_EVENTS:,}): {naive}")
    result = {"worker": worker, "naive": naive,
              "ratio_to_naive": round(worker["events_per_s"] / naive["events_per_s"], 2)}
    print(f"egress: {result['ratio_to_naive']}x the naive baseline")
    return result
