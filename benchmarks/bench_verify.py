"""`syncplane verify` throughput, sandbox to sandbox, against a baseline run here:

- verify: the comparison of an ingress workflow (contacts → profiles) as the API server runs
  it (both sides read whole through the connectors, transformed, digested, compared);
- raw paged read of both sides: the same two listings (Dataverse pages of 5,000, Campaign pages
  of 10,000) fetched and parsed concurrently, nothing transformed or compared — the ceiling.

Reported: records compared per second, requests per 1,000 records, and the ratios to the
baseline; once with the sandbox answering at once (CPU-bound: this 2-core machine runs both
sides) and once answering after 20 ms per request, like a cloud API. The destination is filled
in advance with the profiles the mapping produces (tests.integration.ingress_env, written
independently of the transform), so verify finds 0 differences.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

from syncplane.connectors.base import Record
from syncplane.connectors.campaign import MAX_LINE_COUNT, CampaignSource
from syncplane.connectors.dynamics import MAX_PAGE_SIZE, DynamicsSource
from syncplane.connectors.http import OAuth2ClientCredentials
from syncplane.verify.run import verify
from syncplane_sandbox import SANDBOX_CLIENT_ID, Sandbox, SandboxOptions, SeedSpec, start_sandbox
from tests.integration.ingress_env import expected_profiles, ingress_spec
from tests.integration.optinout_env import secrets


class NoCheckpoints:
    """A workflow that never ran: nothing committed, nothing queued."""

    async def committed(self, workflow: str, stream: str) -> tuple[str | None, float | None]:
        return None, None

    async def queue_repairs(self, workflow: str, stream: str, records: Sequence[Record]) -> int:
        return 0


async def _sandbox(records: int, latency_ms: float) -> Sandbox:
    sb = await start_sandbox(seed=SeedSpec(contacts=records, seed=8),
                             options=SandboxOptions(request_log_size=records + 10_000))
    profiles = sb.acs.profiles
    for values in expected_profiles(sb).values():
        profiles.create(profiles.validate(values), created_by=SANDBOX_CLIENT_ID)
    sb.faults.set(latency_ms=latency_ms)
    return sb


async def _verify(records: int, latency_ms: float) -> dict[str, Any]:
    sb = await _sandbox(records, latency_ms)
    try:
        before = len(sb.requests.records())
        started = time.perf_counter()
        report = await verify("bench", ingress_spec(sb), secrets(sb), NoCheckpoints(), running=False)
        elapsed = time.perf_counter() - started
        total = report.total()
        assert total.compared == records and not total.keys, "verify of an equal destination found differences"
        sent = len(sb.requests.records()) - before
        return {"records": records, "seconds": round(elapsed, 2), "records_per_s": round(records / elapsed, 1),
                "requests_per_1000": round(1000 * report.requests / records, 3),
                "requests_seen_by_the_sandbox": sent}
    finally:
        await sb.stop()


async def _raw_read(records: int, latency_ms: float) -> dict[str, Any]:
    sb = await _sandbox(records, latency_ms)
    try:
        # The sandbox's own secrets, as verify gets them: each declares the origin its tokens are for.
        spec, conn = ingress_spec(sb), secrets(sb)
        d365, acs = conn[spec.source.credentials.name], conn[spec.destination.credentials.name]
        d365_tokens = OAuth2ClientCredentials(d365.token_url, d365.credentials())
        acs_tokens = OAuth2ClientCredentials(acs.token_url, acs.credentials())
        contacts = DynamicsSource(sb.d365_url, d365_tokens, key_column="contactid", page_size=MAX_PAGE_SIZE)
        profiles = CampaignSource(sb.acs_url, acs_tokens, SANDBOX_CLIENT_ID, key_field="externalId",
                                  line_count=MAX_LINE_COUNT)
        before = len(sb.requests.records())
        started = time.perf_counter()

        async def count(pages: Any) -> int:
            return sum([len(p.records) async for p in pages])

        read = await asyncio.gather(
            count(contacts.pages("contacts", ["emailaddress1", "firstname", "lastname"], None)),
            count(profiles.pages("profile", ["email", "firstName", "lastName"], None)))
        elapsed = time.perf_counter() - started
        sent = len(sb.requests.records()) - before
        for closer in (contacts, profiles, d365_tokens, acs_tokens):
            await closer.aclose()
        assert list(read) == [records, records]
        return {"records": records, "seconds": round(elapsed, 2), "records_per_s": round(records / elapsed, 1),
                "requests_per_1000": round(1000 * sent / records, 3)}
    finally:
        await sb.stop()


async def _pair(records: int, latency_ms: float) -> dict[str, Any]:
    v = await _verify(records, latency_ms)
    raw = await _raw_read(records, latency_ms)
    out = {"verify": v, "raw_paged_read": raw,
           "ratio_to_raw_read": round(v["records_per_s"] / raw["records_per_s"], 3),
           "requests_ratio_to_raw_read": round(v["requests_per_1000"] / raw["requests_per_1000"], 3)}
    print(f"verify {records:,} records, {latency_ms:g} ms latency: {v['records_per_s']} compared/s "
          f"({out['ratio_to_raw_read']:.1%} of the raw paged read of both sides, {raw['records_per_s']}/s); "
          f"{v['requests_per_1000']} requests per 1,000 records (raw read: {raw['requests_per_1000']})")
    return out


async def run(records: int = 50_000, slow_records: int = 20_000, latency_ms: float = 20.0) -> dict[str, Any]:
    """``{"no_latency": ..., "latency_<latency_ms>ms": ...}``: ``records`` (then ``slow_records``, the
    sandbox answering after ``latency_ms`` milliseconds) compared by verify and read raw, each ``{"verify",
    "raw_paged_read"`` (``records``, ``seconds``, ``records_per_s``, ``requests_per_1000``),
    ``"ratio_to_raw_read"``, ``"requests_ratio_to_raw_read"}``."""
    return {"no_latency": await _pair(records, 0.0), f"latency_{latency_ms:g}ms": await _pair(slow_records, latency_ms)}


if __name__ == "__main__":
    print(asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)))
