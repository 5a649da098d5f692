"""`make bench`: every benchmark, each reported as a ratio against a baseline
measured in the same process and run. Figures go to stdout and
benchmarks/last-run.json; nothing here asserts a time.

`python -m benchmarks --only verify [--only ingress …]` runs those alone and replaces
only their entries in last-run.json."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks import (
    bench_api,
    bench_console,
    bench_egress,
    bench_ingress,
    bench_operator,
    bench_optinout,
    bench_start,
    bench_verify,
)

BENCHMARKS: dict[str, Callable[[], Awaitable[Any]]] = {
    "api": bench_api.run, "start_to_running": bench_start.run, "ingress": bench_ingress.run,
    "egress": bench_egress.run, "opt_in_out": bench_optinout.run, "verify": bench_verify.run,
    "console": bench_console.run,
    "operator": lambda: asyncio.to_thread(bench_operator.run),
}


async def main(argv: list[str]) -> None:
    only = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--only"]
    unknown = sorted(set(only) - BENCHMARKS.keys())
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
    names = only or [n for n in BENCHMARKS if n != "operator" or "--no-k8s" not in argv]
    out = Path(__file__).with_name("last-run.json")
    results: dict[str, Any] = json.loads(out.read_text()) if only and out.exists() else {}
    for name in names:
        results[name] = await BENCHMARKS[name]()
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
