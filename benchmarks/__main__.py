"""`make bench`: every benchmark, each reported as a ratio against a baseline
measured in the same process and run. Figures go to stdout and
benchmarks/last-run.json; nothing here asserts a time."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from benchmarks import bench_api, bench_egress, bench_ingress, bench_operator, bench_optinout, bench_start, bench_verify


async def main() -> None:
    results = {"api": await bench_api.run(), "start_to_running": await bench_start.run(),
               "ingress": await bench_ingress.run(), "egress": await bench_egress.run(),
               "opt_in_out": await bench_optinout.run(), "verify": await bench_verify.run()}
    if "--no-k8s" not in sys.argv:
        results["operator"] = await asyncio.to_thread(bench_operator.run)
    out = Path(__file__).with_name("last-run.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    asyncio.run(main())
