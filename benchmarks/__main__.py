"""`make bench`: every benchmark, each reported as a ratio against a baseline measured in the
same run. Figures go to stdout and benchmarks/last-run.json (each benchmark's whole result, and
a "summary": one row per figure with its same-run baseline and the ratio); a table of the
summary is printed at the end. Nothing here asserts a time.

`python -m benchmarks --only ingress [--only api …]` runs those alone and replaces only their
entries in last-run.json; `python -m benchmarks --list` names them. `operator_scale` (issue 17) runs
the operator over `--operator-workflows N` STOPPED Workflows (100 by default; the issue's figure is
1,000: `--only operator_scale --operator-workflows 1000`); `operator_watch_namespaces` spreads as many
over 10 namespaces, the operator watching two."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import (
    bench_api,
    bench_console,
    bench_crd_writes,
    bench_egress,
    bench_ingress,
    bench_operator,
    bench_optinout,
    bench_read,
    bench_split,
    bench_start,
    bench_verify,
)

#: Settings of the benchmarks that take one, from the command line.
OPTIONS: dict[str, int] = {"operator_workflows": 100}

BENCHMARKS: dict[str, Callable[[], Awaitable[Any]]] = {
    "api": bench_api.run, "start_to_running": bench_start.run, "ingress": bench_ingress.run,
    "ingress_latency": bench_ingress.run_latency, "read": bench_read.run,
    "egress": bench_egress.run, "opt_in_out": bench_optinout.run, "verify": bench_verify.run,
    "console": bench_console.run, "split_load": bench_split.run,
    "operator": lambda: asyncio.to_thread(bench_operator.run),
    "crd_writes": lambda: asyncio.to_thread(bench_crd_writes.run),
    "operator_scale": lambda: asyncio.to_thread(bench_operator.scale, OPTIONS["operator_workflows"]),
    "operator_watch_namespaces": lambda: asyncio.to_thread(bench_operator.watched_namespaces,
                                                           OPTIONS["operator_workflows"]),
}

#: Benchmarks that need the Kubernetes test binaries (skipped by --no-k8s).
K8S = {"operator", "operator_scale", "operator_watch_namespaces", "crd_writes"}


@dataclass(frozen=True)
class Row:
    """One figure of the summary: ``value`` (in ``unit``) against the same run's ``baseline``."""

    benchmark: str
    figure: str
    value: float
    baseline: str
    baseline_value: float
    unit: str
    better: str  # "higher" or "lower": which way the ratio should go

    @property
    def ratio(self) -> float:
        """``value / baseline_value`` (same unit on both sides); NaN when the baseline is 0."""
        return self.value / self.baseline_value if self.baseline_value else float("nan")


def _get(result: Any, path: str) -> Any:
    for part in path.split("/"):
        result = result[part]
    return result


#: benchmark → (figure, path to it, baseline, path to it, unit, better), paths into its result.
SUMMARY: dict[str, list[tuple[str, str, str, str, str, str]]] = {
    "api": [row for m in ("GetWorkflow", "ListWorkflows(100)") for row in (
        (f"{m} rps", f"{m}/syncplane/rps", "bare grpc.aio servicer", f"{m}/bare/rps", "req/s", "higher"),
        (f"{m} CPU per call", f"{m}/syncplane/cpu_us_per_call", "bare grpc.aio servicer",
         f"{m}/bare/cpu_us_per_call", "us", "lower"))],
    "start_to_running": [("start to RUNNING", "syncplane/median_s", "bare process spawn", "bare_spawn/median_s",
                          "s", "lower")],
    "ingress": [("worker records/s, 0 ms", "worker_200k/steady_records_per_s", "bare writer, same concurrency",
                 "bare_writer/records_per_s", "rec/s", "higher"),
                ("worker CPU per record, 0 ms", "worker_200k/cpu_ms_per_record", "bare writer CPU per request",
                 "bare_writer/cpu_ms_per_request", "ms", "lower"),
                ("worker peak RSS at 200k", "worker_200k/worker_peak_rss_mib", "at 50k",
                 "worker_50k/worker_peak_rss_mib", "MiB", "lower")],
    "read": [("read records/s (200k contacts)", "syncplane/records_per_s", "dlt REST client",
              "dlt/records_per_s", "rec/s", "higher"),
             ("read CPU per 1,000 records", "syncplane/cpu_ms_per_1000", "dlt REST client", "dlt/cpu_ms_per_1000",
              "ms", "lower")],
    "split_load": [(f"first load records/s, 20 ms, {n} workers", f"workers_{n}/records_per_s", "1 worker",
                    "workers_1/records_per_s", "rec/s", "higher") for n in bench_split.WORKERS[1:]],
    "egress": [("egress events/s", "worker/events_per_s", "naive", "naive/events_per_s", "ev/s", "higher")],
    "opt_in_out": [("opt-in/out changes/s", "sync/changes_per_s", "naive", "naive/changes_per_s", "ch/s", "higher")],
    "verify": [*((f"verify records/s{latency}", f"{run}/verify/records_per_s", "raw paged read",
                  f"{run}/raw_paged_read/records_per_s", "rec/s", "higher")
                 for run, latency in (("no_latency", ""), ("latency_20ms", ", 20 ms"))),
               ("verify requests per 1,000 records", "no_latency/verify/requests_per_1000", "raw paged read",
                "no_latency/raw_paged_read/requests_per_1000", "req", "lower")],
    "console": [("watch to screen", "watch_to_screen_s/median", "gRPC watch", "baseline_grpc_watch_s/median",
                 "s", "lower")],
    "operator": [("operator reaction", "reaction/operator/median_s", "bare watch", "reaction/bare_watch/median_s",
                  "s", "lower")],
    "operator_scale": [
        ("cold start, every Workflow phased", "cold_start_every_phase_s", "cluster alone creating them",
         "cluster_alone_create_s", "s", "lower"),
        ("created while the operator runs, every one phased", "created_while_up/every_phase_s",
         "cluster alone creating them", "cluster_alone_create_s", "s", "lower"),
        ("operator started again over them, every one reconciled (writes nothing)",
         "restart/every_one_reconciled_s", "cold start", "cold_start_every_phase_s", "s", "lower"),
        ("operator peak RSS, cold start", "cold_start_peak_rss_mib", "operator with 0 Workflows",
         "no_workflows/peak_rss_mib", "MiB", "lower"),
        ("API requests/min, idle", "idle_requests_per_min", "cluster alone", "cluster_alone_requests_per_min",
         "req/min", "lower"),
        ("concurrent starts, p95 patch to RUNNING", "concurrent_starts/patch_to_running/p95_s",
         "bare watch sees the patch, p95", "concurrent_starts/bare_watch/p95_s", "s", "lower"),
        ("concurrent starts, p95 patch to RUNNING", "concurrent_starts/patch_to_running/p95_s",
         "worker processes alone (their imports, as many at once)", "concurrent_starts/workers_alone/all_done_s",
         "s", "lower"),
    ],
    "crd_writes": [row for kind in ("status", "spec") for row in (
        (f"API server CPU per Workflow {kind} write", f"generated/{kind}/api_server_cpu_ms",
         "the same CRD without its CEL rules", f"no_cel/{kind}/api_server_cpu_ms", "ms", "lower"),
        (f"API server CPU per Workflow {kind} write", f"generated/{kind}/api_server_cpu_ms",
         "a ConfigMap write of its size", "configmap/api_server_cpu_ms", "ms", "lower"))],
    "operator_watch_namespaces": [
        ("cold start, every watched Workflow phased", "cold_start_every_watched_phase_s",
         "cluster alone creating all of them", "cluster_alone_create_s", "s", "lower"),
        ("API requests/min, idle, 2 of 10 namespaces watched", "idle_requests_per_min", "cluster alone",
         "cluster_alone_requests_per_min", "req/min", "lower"),
    ],
}


def summary(name: str, result: Any) -> list[Row]:
    """The summary rows of one benchmark's result (those its result has)."""
    rows: list[Row] = []
    for figure, path, baseline, base_path, unit, better in SUMMARY.get(name, []):
        try:
            rows.append(Row(name, figure, float(_get(result, path)), baseline, float(_get(result, base_path)),
                            unit, better))
        except (KeyError, TypeError, ValueError):
            continue
    if name == "ingress_latency":
        latency = result.get("latency_ms", 20)
        for key, r in result.items():
            if not key.startswith("concurrency_"):
                continue
            c = key.removeprefix("concurrency_")
            worker = float(r["worker"]["steady_records_per_s"])
            rows.append(Row(name, f"worker records/s, {latency:g} ms, {c} in flight", worker,
                            "bare writer, same concurrency", float(r["bare_writer"]["records_per_s"]),
                            "rec/s", "higher"))
            rows.append(Row(name, f"worker records/s, {latency:g} ms, {c} in flight", worker,
                            "concurrency / latency", float(r["concurrency_over_latency"]), "rec/s", "higher"))
    return rows


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def table(rows: list[Row]) -> str:
    """The summary as a fixed-width text table."""
    head = ("benchmark", "figure", "value", "baseline", "baseline value", "ratio")
    body = [(r.benchmark, r.figure, f"{_num(r.value)} {r.unit}", r.baseline, f"{_num(r.baseline_value)} {r.unit}",
             f"{r.ratio:.2f}x ({r.better} is better)") for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])


def parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks`` command line (``--only NAME``, repeatable, and each benchmark's sizes)."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmarks (all by default), each against a baseline measured in the same run; "
                    "write benchmarks/last-run.json and print a summary table.")
    p.add_argument("--only", action="append", metavar="NAME", choices=sorted(BENCHMARKS), default=[],
                   help="run this benchmark alone (repeatable); its entry in last-run.json is replaced, the "
                        f"others kept. One of: {', '.join(sorted(BENCHMARKS))}")
    p.add_argument("--no-k8s", action="store_true",
                   help=f"skip the benchmarks that start a Kubernetes test cluster ({', '.join(sorted(K8S))})")
    p.add_argument("--list", action="store_true", help="print the benchmarks' names and exit")
    p.add_argument("--operator-workflows", type=int, default=OPTIONS["operator_workflows"], metavar="N",
                   help="operator_scale, operator_watch_namespaces: how many STOPPED Workflows "
                        "(default: %(default)s)")
    p.add_argument("--output", type=Path, default=Path(__file__).with_name("last-run.json"),
                   help="where to write the results (default: benchmarks/last-run.json)")
    return p


async def run(names: list[str]) -> dict[str, Any]:
    """Run the named benchmarks, one after the other; their results by name."""
    return {name: await BENCHMARKS[name]() for name in names}


def main(argv: list[str]) -> int:
    """Parse ``argv`` (``--help`` prints usage and exits before anything starts), then run."""
    args = parser().parse_args(argv)
    OPTIONS["operator_workflows"] = args.operator_workflows
    if args.list:
        print("\n".join(BENCHMARKS))
        return 0
    names = args.only or [n for n in BENCHMARKS if not (args.no_k8s and n in K8S)]
    out: Path = args.output
    results: dict[str, Any] = json.loads(out.read_text()) if args.only and out.exists() else {}
    results.pop("summary", None)
    results.update(asyncio.run(run(names)))
    rows = [row for name, result in results.items() for row in summary(name, result)]
    results["summary"] = [{**asdict(r), "ratio": round(r.ratio, 3)} for r in rows]
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {out}\n\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
