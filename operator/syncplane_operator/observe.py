"""Pure: what the cluster shows about a workflow's workers -> lifecycle.Observed."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from syncplane.contract import names as L
from syncplane.contract.report import WorkerReport
from syncplane.lifecycle import Observed, WorkerFailure
from syncplane.lifecycle.reports import totals

CRASH_RESTARTS = 3           # restarts of one container before it counts as a crash loop
STALE_AFTER_SECONDS = 30.0   # a heartbeat Lease not renewed this long is stale


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def lease_report(lease: dict[str, Any]) -> dict[str, Any]:
    raw = (lease.get("metadata", {}).get("annotations") or {}).get(L.REPORT_ANNOTATION, "{}")
    try:
        report = json.loads(raw)
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def observe(deployment: dict[str, Any] | None, pods: Iterable[dict[str, Any]], leases: Iterable[dict[str, Any]],
            generation: int, now: datetime, require_heartbeat: bool = True) -> Observed:
    pods = list(pods)
    leases = list(leases)
    failure: WorkerFailure | None = None
    live = len(pods)  # terminating pods count: they may still be draining
    available = 0
    if deployment is not None:
        status = deployment.get("status") or {}
        available = int(status.get("availableReplicas") or 0)
        live = max(live, int(status.get("replicas") or 0))
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
                failure = WorkerFailure("ROLLOUT_STALLED", f"the worker Deployment did not progress: "
                                        f"{cond.get('message', '')}")
            elif cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
                # e.g. a missing service account or a quota: pods cannot even be created
                failure = WorkerFailure("WORKER_PODS_REJECTED", str(cond.get("message", "")))
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            # A worker that exited because retrying cannot help (e.g. its heartbeat Lease refused)
            # says why in its termination message: without a heartbeat it is the only place.
            for state in (cs.get("state") or {}, cs.get("lastState") or {}):
                terminated = state.get("terminated") or {}
                if terminated.get("exitCode") == L.EXIT_FATAL and terminated.get("message"):
                    reason, _, message = str(terminated["message"]).partition(": ")
                    failure = failure or WorkerFailure(reason if message else "WORKER_FATAL",
                                                       message or reason)
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") == "CrashLoopBackOff" or int(cs.get("restartCount") or 0) >= CRASH_RESTARTS:
                failure = failure or WorkerFailure(
                    "CRASH_LOOP", f"worker pod {pod['metadata']['name']} is crash-looping "
                    f"({cs.get('restartCount', 0)} restarts)")
    ready_heartbeats = 0
    fresh: list[dict[str, Any]] = []
    for lease in leases:
        raw = lease_report(lease)
        report = WorkerReport.from_json(raw)
        renewed = _parse_time((lease.get("spec") or {}).get("renewTime"))
        stale = renewed is None or (now - renewed).total_seconds() > STALE_AFTER_SECONDS
        if (fatal := report.fatal_at(generation)) is not None:
            failure = failure or WorkerFailure(*fatal)
        if stale:
            if report.generation == generation and not report.draining:
                failure = failure or WorkerFailure(
                    "HEARTBEAT_STALE", f"worker {lease['metadata']['name']} has not renewed its heartbeat "
                    f"for over {STALE_AFTER_SECONDS:.0f}s")
            continue
        if report.ready_at(generation):
            ready_heartbeats += 1
        fresh.append(raw)
    ready = min(available, ready_heartbeats) if require_heartbeat else available
    summed = totals(fresh)
    return Observed(live=live, ready=ready, failure=failure, backlog=summed.backlog, counters=summed.counters,
                    tables=summed.tables, stale=summed.stale, dead_letters=summed.dead_letters,
                    trouble=summed.trouble, waiting_since=summed.waiting_since, concurrency=summed.concurrency)
