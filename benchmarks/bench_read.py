"""The read path against dlt's: the same 200,000-contact Dynamics 365 feed of the sandbox (in this
process, answering at once) read by syncplane's source and by dlt's REST client, each in its own
process (benchmarks/reader.py), interleaved twice (dlt, syncplane, dlt, syncplane) so that the
shared machine's drift falls on both. Reported: records/s and CPU per 1,000 records of each, and
syncplane's ratio to dlt (issue 18: >= 1.0)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from syncplane_sandbox import SandboxOptions, SeedSpec, start_sandbox

RECORDS = 200_000
ROUNDS = 2


async def _read(which: str, d365_url: str, token_url: str, scope: str) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "benchmarks.reader", which, d365_url,
                                                token_url, scope, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the {which} reader exited with {proc.returncode}")
    result: dict[str, float] = json.loads(out)
    return result


def _mean(runs: list[dict[str, float]]) -> dict[str, Any]:
    seconds = sum(r["seconds"] for r in runs)
    records = sum(r["records"] for r in runs)
    return {"records": runs[0]["records"], "pages": runs[0]["pages"],
            "records_per_s": round(records / seconds, 1),
            "cpu_ms_per_1000": round(1e6 * sum(r["cpu_s"] for r in runs) / records, 2),
            "runs_records_per_s": [round(r["records"] / r["seconds"], 1) for r in runs]}


async def run(records: int = RECORDS, rounds: int = ROUNDS) -> dict[str, Any]:
    """``records`` contacts read ``rounds`` times by each reader: ``{"syncplane": ..., "dlt": ...}``
    (each ``records``, ``pages``, ``records_per_s``, ``cpu_ms_per_1000`` (CPU milliseconds per 1,000
    records), ``runs_records_per_s``), ``"ratio"`` (records/s, syncplane over dlt), ``"cpu_ratio"``.
    Raises RuntimeError when a reader fails or reads another count."""
    sb = await start_sandbox(seed=SeedSpec(contacts=records, seed=4), options=SandboxOptions(request_log_size=1000))
    sb.faults.set(latency_ms=0)
    runs: dict[str, list[dict[str, float]]] = {"dlt": [], "syncplane": []}
    try:
        for _ in range(rounds):
            for which in ("dlt", "syncplane"):
                got = await _read(which, sb.d365_url, sb.d365_token_url, sb.d365_scope)
                if got["records"] != records:
                    raise RuntimeError(f"the {which} reader read {got['records']} of {records} records")
                runs[which].append(got)
    finally:
        await sb.stop()
    ours, theirs = _mean(runs["syncplane"]), _mean(runs["dlt"])
    result = {"syncplane": ours, "dlt": theirs, "ratio": round(ours["records_per_s"] / theirs["records_per_s"], 3),
              "cpu_ratio": round(ours["cpu_ms_per_1000"] / theirs["cpu_ms_per_1000"], 3)}
    print(f"read {records:,} contacts: syncplane {ours['records_per_s']} rec/s ({ours['cpu_ms_per_1000']} ms CPU "
          f"per 1,000), dlt {theirs['records_per_s']} rec/s ({theirs['cpu_ms_per_1000']} ms CPU per 1,000): "
          f"ratio {result['ratio']} (target >= 1.0)")
    return result
