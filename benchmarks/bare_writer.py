"""The bare writer: the floor the ingress worker is measured against, run as its own process
(so its CPU time is its own, as the worker's is).

A read of every contact (pages of 5,000), then one POST per record to Campaign's profile resource
from ``concurrency`` coroutines over one aiohttp session (the worker's HTTP library): no
transform, no checkpoint, no retry, no answer parsed. Prints one JSON line:
``{"records", "seconds", "cpu_s"}`` (seconds: wall time of the writes; cpu_s: this process's
user+system CPU over the same span).

Usage: ``python -m benchmarks.bare_writer D365_URL ACS_URL D365_TOKEN_URL ACS_TOKEN_URL D365_SCOPE
CONCURRENCY`` (a sandbox's addresses).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

from syncplane_sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET


async def write_all(d365_url: str, acs_url: str, d365_token_url: str, acs_token_url: str, d365_scope: str,
                    concurrency: int) -> dict[str, float]:
    """Read every contact in one page, write each as a profile with ``concurrency`` writers."""
    form = {"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET,
            "grant_type": "client_credentials"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60),
                                     raise_for_status=True) as client:
        async with client.post(d365_token_url, data={**form, "scope": d365_scope}) as r:
            d365 = (await r.json())["access_token"]
        async with client.post(acs_token_url, data=form) as r:
            acs = (await r.json())["access_token"]
        rows: list[dict[str, Any]] = []
        url: str | None = f"{d365_url}contacts?$select=contactid,emailaddress1,firstname,lastname"
        while url:  # pages of 5,000 (Dataverse's largest), following @odata.nextLink
            async with client.get(url, headers={"Authorization": f"Bearer {d365}",
                                                "Prefer": "odata.maxpagesize=5000"}) as r:
                page = await r.json()
            rows += page["value"]
            url = page.get("@odata.nextLink")
        headers = {"Authorization": f"Bearer {acs}", "X-Api-Key": SANDBOX_CLIENT_ID,
                   "Content-Type": "application/json"}
        url = f"{acs_url}profileAndServices/profile"
        it = iter(rows)

        async def writer() -> None:
            for row in it:  # one shared iterator: each row is taken once
                body = json.dumps({"externalId": row["contactid"], "email": row["emailaddress1"],
                                   "firstName": (row["firstname"] or "")[:30], "lastName": row["lastname"]})
                async with client.post(url, data=body, headers=headers) as r:
                    await r.read()

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(concurrency)))
        return {"records": len(rows), "seconds": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}


if __name__ == "__main__":
    d365_url, acs_url, d365_token, acs_token, scope, n = sys.argv[1:7]
    print(json.dumps(asyncio.run(write_all(d365_url, acs_url, d365_token, acs_token, scope, int(n)))))
