"""Opt-in/out throughput, sandbox to sandbox, side by side with a naive baseline run here:

- the sync: ``OptInOutSync.run_once`` in BIDIRECTIONAL mode (feeds read in bulk, Dataverse
  writes in ``$batch``, Campaign PATCHes concurrent, echoes skipped);
- naive: the same change feeds read, then one write request per changed record, in sequence
  (plus the profile lookup Campaign needs to address a record), no echo memory.

Both handle the same number of fresh random flips, spread over both sides. Reported: changes/s,
requests per 1,000 changes (reads, writes, lookups), and the echo pass that follows (the
sync's own writes read back: it writes nothing there). The sandbox runs in this process.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from syncplane.connectors.campaign import CampaignSource
from syncplane.connectors.dynamics import DynamicsSource
from syncplane.connectors.http import Credentials, OAuth2ClientCredentials
from syncplane_sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Sandbox, SeedSpec, start_sandbox
from tests.integration.optinout_env import PAIRS, Harness, create_profiles, crm_row, disagreements, profile

CRM_FIELDS = [c for _, c in PAIRS]
ACS_FIELDS = [a for a, _ in PAIRS]


def _flip_distinct(sb: Sandbox, rng: random.Random, keys: list[str], n: int) -> int:
    """``n`` flips on distinct keys, half in the CRM, half in Campaign."""
    for i, key in enumerate(rng.sample(keys, n)):
        acs_f, crm_f = rng.choice(PAIRS)
        if i % 2:
            sb.d365.table("contacts").upsert(key, **{crm_f: not bool(crm_row(sb, key).get(crm_f))})
        else:
            pk = sb.acs.profiles.find(key)
            assert pk is not None
            sb.acs.profiles.set(pk, **{acs_f: not bool(profile(sb, key).get(acs_f))})
    return n


def _requests(sb: Sandbox, since: int) -> dict[str, int]:
    out = {"reads": 0, "writes": 0, "lookups": 0, "batch_parts": 0}
    for r in sb.requests.records(since):
        if r.path.split("?", 1)[0].endswith("/token") or "/ims/token" in r.path:
            continue
        if r.method == "GET" and "byExternalId" in r.path:
            out["lookups"] += 1
        elif r.method == "GET":
            out["reads"] += 1
        else:
            out["writes"] += 1
    return out


def _last_seq(sb: Sandbox) -> int:
    records = sb.requests.records()
    return records[-1].seq if records else 0


def _per_1000(counts: dict[str, int], changes: int) -> dict[str, float]:
    total = counts["reads"] + counts["writes"] + counts["lookups"]
    return {"total": round(1000 * total / changes, 1), **{k: round(1000 * v / changes, 1) for k, v in counts.items()}}


async def _sync_run(sb: Sandbox, h: Harness, keys: list[str], changes: int, rng: random.Random) -> dict[str, Any]:
    _flip_distinct(sb, rng, keys, changes)
    since = _last_seq(sb)
    parts_before = len(sb.batch_parts)
    started = time.perf_counter()
    await h.sync.run_once(asyncio.Event())
    elapsed = time.perf_counter() - started
    counts = _requests(sb, since)
    counts["batch_parts"] = len(sb.batch_parts) - parts_before
    stats = h.sync.last
    echo_since = _last_seq(sb)
    echo_started = time.perf_counter()
    await h.sync.run_once(asyncio.Event())
    echo_elapsed = time.perf_counter() - echo_started
    assert disagreements(sb, keys) == [], "the sync did not converge"
    return {"changes": changes, "seconds": round(elapsed, 3), "changes_per_s": round(changes / elapsed),
            "requests": counts, "requests_per_1000": _per_1000(counts, changes),
            "records_written": stats.written_crm + stats.written_campaign,
            "echo_pass": {"seconds": round(echo_elapsed, 3), "echoes_skipped": h.sync.last.echoes,
                          "writes": h.sync.last.write_requests, "requests": _requests(sb, echo_since)}}


async def _naive_run(sb: Sandbox, keys: list[str], changes: int, rng: random.Random) -> dict[str, Any]:
    d_tokens = OAuth2ClientCredentials(sb.d365_token_url, Credentials(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET,
                                                                      scope=sb.d365_scope))
    a_tokens = OAuth2ClientCredentials(sb.acs_token_url, Credentials(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET,
                                                                     organization=sb.options.org,
                                                                     api_host=sb.acs_origin))
    d_src = DynamicsSource(sb.d365_url, d_tokens, key_column="contactid")
    a_src = CampaignSource(sb.acs_url, a_tokens, SANDBOX_CLIENT_ID, key_field={"profile": "externalId"},
                           line_count=1000)
    try:
        # the cursors before the flips (not measured)
        d_cursor = a_cursor = None
        async for page in d_src.pages("contacts", CRM_FIELDS, None):
            d_cursor = page.cursor or d_cursor
        async for page in a_src.pages("profile", ACS_FIELDS, None):
            a_cursor = page.cursor or a_cursor
        _flip_distinct(sb, rng, keys, changes)
        since = _last_seq(sb)
        started = time.perf_counter()
        client = d_src.transport
        d_changes = [r async for p in d_src.pages("contacts", CRM_FIELDS, d_cursor) for r in p.records]
        a_changes = [r async for p in a_src.pages("profile", ACS_FIELDS, a_cursor) for r in p.records]
        for rec in d_changes:  # each CRM change: look the profile up, PATCH it
            hdrs = {"X-Api-Key": SANDBOX_CLIENT_ID, "Content-Type": "application/json"}
            found = await client.request("GET", f"{sb.acs_url}profileAndServices/profile/byExternalId?"
                                         f"{urlencode({'externalId_parameter': rec.key})}", headers=hdrs,
                                         auth=a_tokens)
            content = found.json().get("content") or []
            if content:
                body = {a: bool(rec.values.get(c)) for a, c in PAIRS}
                await client.request("PATCH", f"{sb.acs_url}profileAndServices/profile/{content[0]['PKey']}",
                                     headers=hdrs, content=json.dumps(body).encode(), auth=a_tokens)
        for rec in a_changes:  # each Campaign change: PATCH the contact
            body = {c: bool(rec.values.get(a)) for a, c in PAIRS}
            await client.request("PATCH", f"{sb.d365_url}contacts({rec.key})",
                                 headers={"Content-Type": "application/json", "If-Match": "*"},
                                 content=json.dumps(body).encode(), auth=d_tokens)
        elapsed = time.perf_counter() - started
        counts = _requests(sb, since)
        return {"changes": changes, "seconds": round(elapsed, 3), "changes_per_s": round(changes / elapsed),
                "requests": counts, "requests_per_1000": _per_1000(counts, changes),
                "note": "no echo memory: its writes come back as changes in the next read"}
    finally:
        await d_src.aclose()
        await a_src.aclose()
        await d_tokens.aclose()
        await a_tokens.aclose()


async def run(contacts: int = 20_000, changes: int = 4_000) -> dict[str, Any]:
    """``contacts`` contacts and profiles synced once, then ``changes`` flips through the sync and
    through the naive baseline: ``{"initial_sync": {"records", "seconds"}, "sync": {...}, "naive":
    {...}`` (each ``changes``, ``seconds``, ``changes_per_s``, ``requests_per_1000`` by kind and
    ``total``), ``"speedup_vs_naive"`` (changes/s), ``"request_ratio_vs_naive"`` (requests)}."""
    sb = await start_sandbox(seed=SeedSpec(contacts=contacts, seed=5, opt_out_ratio=0.1))
    try:
        keys = sorted(sb.d365.table("contacts").rows)
        create_profiles(sb, keys)
        with tempfile.TemporaryDirectory() as tmp:
            h = Harness(sb, Path(tmp), "BIDIRECTIONAL")
            try:
                started = time.perf_counter()
                await h.converge()
                initial = {"records": contacts, "seconds": round(time.perf_counter() - started, 3)}
                print(f"opt-in/out initial sync of {contacts:,} contacts and profiles: {initial}")
                rng = random.Random(7)
                sync = await _sync_run(sb, h, keys, changes, rng)
                print(f"opt-in/out sync, {changes:,} changes: {sync}")
                naive = await _naive_run(sb, keys, changes, rng)
                print(f"naive per-record baseline, {changes:,} changes: {naive}")
            finally:
                await h.aclose()
        result = {"initial_sync": initial, "sync": sync, "naive": naive,
                  "speedup_vs_naive": round(sync["changes_per_s"] / max(1, naive["changes_per_s"]), 1),
                  "request_ratio_vs_naive": round(sync["requests_per_1000"]["total"]
                                                  / max(1e-9, naive["requests_per_1000"]["total"]), 3)}
        print(f"opt-in/out: {result['speedup_vs_naive']}x the naive baseline's changes/s, with "
              f"{result['request_ratio_vs_naive']:.1%} of its requests")
        return result
    finally:
        await sb.stop()


if __name__ == "__main__":
    print(asyncio.run(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)))
