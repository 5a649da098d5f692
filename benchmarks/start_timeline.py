"""One start on the test cluster, step by step (issue 17, "patch to RUNNING").

``python -m benchmarks.start_timeline [STARTS]``: a test cluster, the operator (``syncplane operator``) and
the fake kubelet (tests/k8s/kubelet.py, real ``syncplane worker`` processes) with ``STARTS`` (1) STOPPED
Workflows, each patched to RUNNING in turn, the previous one RUNNING first. For each start, the seconds
after its patch at which a watch saw each step:

- ``workflow STARTING``: the operator acted on the Workflow's watch event (and created the children);
- ``deployment``, ``pod``: the Deployment and its pod exist (controller-manager, scheduler, KWOK);
- ``process``: the fake kubelet started the worker (its log);
- ``worker listening``: the worker's imports done, its HTTP port bound (the worker's log);
- ``lease``, ``lease ready``: the worker's first heartbeat Lease, and the first that says ready;
- ``workflow RUNNING``: the operator's status patch.

Times come from ``kubectl get --watch`` lines read as they arrive and from the processes' log lines (their
timestamps, milliseconds): a timeline, not a statistic. Wall-clock times throughout (the logs' clock).
``worker_cpu_s_at_running``: the worker process's CPU seconds when the Workflow showed RUNNING.

What one start spent (Nov 30, load 2.5, ``python -m benchmarks.start_timeline 3``, seconds after the patch,
the three starts within 0.3 s of each other), before the changes that came with this file:

==================================================  =========  ==========================================
step                                                 at (s)     what it waited for
==================================================  =========  ==========================================
operator's STARTING, Deployment, pod                 0.2-0.4    watch event, reconcile, controller, KWOK
fake kubelet starts the process                      0.35-0.6   its 0.2 s pod poll, ConfigMap/Secret reads
worker listening (imports done)                      1.7-1.9    ~1.2 s of CPU: interpreter and imports
first heartbeat Lease                                2.3-2.6    kubernetes_asyncio's import, kubeconfig
Lease says ready                                     4.3-4.6    exactly +2.0 s: the Lease's renew period
RUNNING                                              4.4-4.7    the operator, 0.02-0.05 s after the Lease
==================================================  =========  ==========================================

The worker had used 1.27-1.64 s of CPU by then. Fixed delays: the 2 s renew period (now: a phase change is
beaten at once, LeaseHeartbeat.run) and the fake kubelet's 0.2 s poll; everything else is CPU, most of it
imports: per process, at load ~7 (min of 5, ``import``): the command line 0.36 s, the worker's own modules
0.8 s, ``kubernetes_asyncio.client`` 0.98 s (its ~800 model modules; the heartbeat and the ConfigMap
stores use six of its calls), aiohttp 0.46 s (two SSL contexts at import), the OTel SDK 0.33 s. Many
workers starting at once share the cores: N starts need about N x that CPU / 2 cores, all finishing
together (10 starts: median and p95 within 2 s of each other).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks.bench_operator import _apply, _kubelet, _operator, _phases, _wait, _workflow, prepare
from tests.factories import UNREACHABLE_SECRETS, literals
from tests.k8s.cluster import TestCluster


class _Watch:
    """``kubectl get KIND --watch -o jsonpath=TEMPLATE`` in a thread: each line with time.time()."""

    def __init__(self, cluster: TestCluster, ns: str, kind: str, template: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self._proc = subprocess.Popen([str(cluster.kubectl_path), "--kubeconfig", str(cluster.kubeconfig), "get",
                                       kind, "-n", ns, "--watch", "-o", f"jsonpath={template}\n"],
                                      stdout=subprocess.PIPE, env=cluster.env, text=True)
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def first(self, after: float, match: str) -> float | None:
        return next((t for t, line in self.lines if t >= after and re.search(match, line)), None)

    def stop(self) -> None:
        self._proc.kill()
        self._proc.wait()


def _log_time(path: Path, match: str) -> float | None:
    """The timestamp of the first line of a log (``%(asctime)s`` format) matching ``match``."""
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if re.search(match, line):
            stamp = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
            if stamp:
                return datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _worker_cpu(pod: str) -> float | None:
    """CPU seconds (user + system) the worker process of ``pod`` (a child of this process, started by the
    fake kubelet with POD_NAME set) has used so far."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("POD_NAME") == pod:
                t = child.cpu_times()
                return round(t.user + t.system, 3)
    return None


@contextlib.contextmanager
def _watches(cluster: TestCluster, ns: str) -> Iterator[dict[str, _Watch]]:
    watches = {
        "workflow": _Watch(cluster, ns, "workflows", "{.metadata.name} {.spec.desiredState} {.status.phase}"),
        "deployment": _Watch(cluster, ns, "deployments", "{.metadata.name} {.status.availableReplicas}"),
        "pod": _Watch(cluster, ns, "pods", "{.metadata.name} {.status.phase}"),
        "lease": _Watch(cluster, ns, "leases", "{.metadata.name} {.metadata.annotations.syncplane\\.io/report}"),
    }
    try:
        yield watches
    finally:
        for w in watches.values():
            w.stop()


def timeline(starts: int = 1) -> list[dict[str, Any]]:
    """``starts`` starts in turn on a fresh test cluster: one dict per start, ``{"workflow", "pod",
    "worker_cpu_s_at_running", "after_patch_s": {step: seconds after the patch at which it was seen,
    None if never}}`` (the steps of the module docstring)."""
    out: list[dict[str, Any]] = []
    with TestCluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        ns = "starts"
        prepare(cluster, ns)
        for secret, data in UNREACHABLE_SECRETS.items():
            cluster.kubectl("create", "secret", "generic", secret, "-n", ns, *literals(data))
        names = [f"start-{i:02d}" for i in range(starts)]
        _apply(cluster, ns, [_workflow(n) for n in names])
        work = Path(tmp) / "containers"
        operator_log = Path(tmp) / "operator.log"
        logging.basicConfig(filename=Path(tmp) / "kubelet.log", level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
        proc = _operator(cluster, ns, operator_log)
        stop = threading.Event()
        kubelet = _kubelet(cluster, ns, work, stop)
        try:
            _wait(cluster, f"{starts} workflows STOPPED",
                  lambda: list(_phases(cluster, ns).values()).count("STOPPED") == starts, 300)
            with _watches(cluster, ns) as w:
                time.sleep(2)   # the watches' first listing printed (not synchronisation of the measured steps)
                for name in names:
                    t0 = time.time()
                    cluster.kubectl("patch", "workflow", name, "-n", ns, "--type", "merge",
                                    "-p", '{"spec":{"desiredState":"RUNNING"}}')
                    _wait(cluster, f"{name} RUNNING", lambda n=name, t=t0: w["workflow"].first(
                        t, rf"^{n} RUNNING RUNNING$") is not None, 300)
                    pods = [line.split()[0] for _, line in w["pod"].lines if line.startswith(f"{name}-worker-")]
                    pod = pods[0] if pods else ""
                    steps = {
                        "workflow RUNNING desired (watch)": w["workflow"].first(t0, rf"^{name} RUNNING"),
                        "workflow STARTING": w["workflow"].first(t0, rf"^{name} RUNNING STARTING$"),
                        "deployment": w["deployment"].first(t0, rf"^{name}-worker"),
                        "pod": w["pod"].first(t0, rf"^{name}-worker-"),
                        "process started (kubelet)": None,
                        "worker listening": _log_time(work / f"{pod}.log", r"listening on"),
                        "lease": w["lease"].first(t0, rf"^{re.escape(pod)} "),
                        "lease ready": w["lease"].first(t0, rf'^{re.escape(pod)} .*"ready": true'),
                        "deployment available": w["deployment"].first(t0, rf"^{name}-worker 1$"),
                        "workflow RUNNING": w["workflow"].first(t0, rf"^{name} RUNNING RUNNING$"),
                    }
                    steps["process started (kubelet)"] = _log_time(Path(tmp) / "kubelet.log", rf"started {pod} ")
                    out.append({"workflow": name, "pod": pod, "worker_cpu_s_at_running": _worker_cpu(pod),
                                "after_patch_s": {k: (None if v is None else round(v - t0, 3))
                                                  for k, v in steps.items()}})
                    print(json.dumps(out[-1], indent=1), flush=True)
        finally:
            stop.set()
            kubelet.join(timeout=120)
            if keep := os.environ.get("SYNCPLANE_TIMELINE_KEEP"):   # the workers' and operator's logs
                shutil.copytree(tmp, keep, dirs_exist_ok=True)
            proc.terminate()
            proc.wait(timeout=60)
            print(operator_log.read_text(errors="replace")[-3000:], file=sys.stderr)
    return out


if __name__ == "__main__":
    timeline(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
