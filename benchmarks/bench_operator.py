"""The operator against the real test cluster (tests/k8s/cluster.py).

- Reaction latency: CR change -> worker Deployment created, 50 runs. Baseline:
  the same change seen by a bare watch on the Workflow (the API server's own
  floor for any controller).
- 200 idle Workflows: operator RSS and API requests per minute (from the API
  server's apiserver_request_total), against the cluster idling without it.
- Cold start: time for a fresh operator to reconcile 200 existing Workflows.

``scale(N)`` (issue 17; ``python -m benchmarks.bench_operator N``, or ``python -m benchmarks --only
operator_scale --operator-workflows N``): the operator with 0 Workflows, then a cold start over N
STOPPED ones (every one has a phase; peak RSS), idle with them (CPU, API requests), and 50 concurrent
starts (patch -> RUNNING, the fake kubelet running the 50 workers), each against the same run's
cluster-alone baseline. ``watched_namespaces()`` (``python -m benchmarks.bench_operator watch-namespaces``,
or ``--only operator_watch_namespaces``): 1,000 Workflows in 10 namespaces, the operator watching two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.factories import UNREACHABLE_SECRETS, literals
from tests.k8s.cluster import ClusterError, TestCluster
from tests.k8s.kubelet import FakeKubelet
from tests.k8s.test_operator import operator_reconciles

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "charts" / "syncplane" / "crds" / "workflows.syncplane.io.yaml"
DEFAULT = ROOT / "server" / "syncplane" / "defaults" / "10-contacts-ingress.yaml"
RUNS = 50
IDLE = 200
STARTS = 50


def _workflow(name: str, desired: str = "STOPPED") -> dict[str, Any]:
    doc = yaml.safe_load(DEFAULT.read_text())
    doc["metadata"] = {"name": name}
    doc["spec"]["desiredState"] = desired
    return doc


def _requests_total(cluster: TestCluster) -> float:
    """The API server's requests so far (apiserver_request_total, every verb and resource)."""
    return sum(cluster.requests_by_kind().values())


def _operator(cluster: TestCluster, namespace: str, log: Path, *more: str,
              metrics_listen: str | None = None) -> subprocess.Popen[bytes]:
    """`syncplane operator` watching ``namespace`` (and the ``more`` namespaces), serving its /metrics on
    ``metrics_listen`` (host:port) if given."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "SYNCPLANE_OPERATOR_RESYNC": "60"}
    watched = [arg for ns in (namespace, *more) for arg in ("--namespace", ns)]
    metrics = ["--metrics-listen", metrics_listen] if metrics_listen else []
    return subprocess.Popen([sys.executable, "-m", "syncplane", "operator", "--standalone", *watched, *metrics,
                             "--liveness", "http://127.0.0.1:0/healthz"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)


def _apply(cluster: TestCluster, namespace: str, docs: list[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))


def _wait(cluster: TestCluster, what: str, ready: Any, timeout: float = 120.0) -> None:
    cluster.wait_until(what, ready, timeout)


def pctl(samples: list[float]) -> dict[str, float]:
    """``{"median_s", "p95_s"}`` of ``samples`` (seconds; at least two)."""
    return {"median_s": statistics.median(samples), "p95_s": statistics.quantiles(samples, n=20)[18]}


def prepare(cluster: TestCluster, ns: str) -> None:
    """The CRD, established, and the namespace ``ns`` with the workers' service account."""
    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    cluster.wait_established("workflows.syncplane.io")
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "serviceaccount", "syncplane-worker", "-n", ns)


def run() -> dict[str, Any]:
    """The three figures of the module docstring, on a fresh test cluster: ``{"cold_reconcile_200_s",
    "idle_200": {"operator_rss_mib", "api_requests_per_min", "cluster_without_operator_per_min",
    "operator_share_per_min"}, "reaction": {"operator": pctl(), "bare_watch": pctl(), "ratio_median"}}``."""
    results: dict[str, Any] = {}
    with TestCluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        ns = "bench"
        prepare(cluster, ns)

        # Cold start over 200 existing Workflows.
        _apply(cluster, ns, [_workflow(f"idle-{i:03d}") for i in range(IDLE)])

        def reconciled() -> int:
            items = json.loads(cluster.kubectl("get", "workflows", "-n", ns, "-o", "json").stdout)["items"]
            return sum(1 for i in items if (i.get("status") or {}).get("observedGeneration"))

        before_idle = _requests_total(cluster)
        t_idle = time.monotonic()
        time.sleep(60)  # a measurement window, not synchronisation
        baseline_rpm = (_requests_total(cluster) - before_idle) / ((time.monotonic() - t_idle) / 60)

        t0 = time.monotonic()
        proc = _operator(cluster, ns, Path(tmp) / "operator.log")
        try:
            _wait(cluster, "200 workflows reconciled", lambda: reconciled() == IDLE, timeout=600)
            results["cold_reconcile_200_s"] = time.monotonic() - t0
            # Idle: 200 stopped workflows, one minute.
            before = _requests_total(cluster)
            t1 = time.monotonic()
            time.sleep(60)  # a measurement window, not synchronisation
            rpm = (_requests_total(cluster) - before) / ((time.monotonic() - t1) / 60)
            rss = psutil.Process(proc.pid).memory_info().rss
            results["idle_200"] = {"operator_rss_mib": rss / 2**20, "api_requests_per_min": rpm,
                                   "cluster_without_operator_per_min": baseline_rpm,
                                   "operator_share_per_min": rpm - baseline_rpm}

            # Reaction latency: desiredState RUNNING -> Deployment exists.
            ours, floor = [], []
            for i in range(RUNS):
                name = f"react-{i:02d}"
                _apply(cluster, ns, [_workflow(name)])
                _wait(cluster, f"{name} reconciled", lambda n=name: json.loads(cluster.kubectl(
                    "get", "workflow", n, "-n", ns, "-o", "json").stdout).get("status", {}).get("phase") == "STOPPED")
                # --watch prints the current object first: once read, the watch is live.
                watch = subprocess.Popen([str(cluster.kubectl_path), "--kubeconfig", str(cluster.kubeconfig), "get",
                                          "workflow", name, "-n", ns, "--watch", "-o", "name"],
                                         stdout=subprocess.PIPE, env=cluster.env)
                assert watch.stdout is not None
                watch.stdout.readline()
                t = time.monotonic()
                cluster.kubectl("patch", "workflow", name, "-n", ns, "--type", "merge",
                                "-p", '{"spec":{"desiredState":"RUNNING"}}')
                watch.stdout.readline()
                floor.append(time.monotonic() - t)
                watch.kill()
                watch.wait()
                _wait(cluster, f"{name} deployment", lambda n=name: cluster.api(
                    "GET", f"/apis/apps/v1/namespaces/{ns}/deployments/{n}-worker")[0] == 200)
                ours.append(time.monotonic() - t)
            results["reaction"] = {"operator": pctl(ours), "bare_watch": pctl(floor),
                                   "ratio_median": statistics.median(ours) / statistics.median(floor)}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    r = results
    print(f"Operator cold reconcile of {IDLE} workflows: {r['cold_reconcile_200_s']:.1f} s")
    print(f"Operator idle with {IDLE} workflows: RSS {r['idle_200']['operator_rss_mib']:.0f} MiB, "
          f"API {r['idle_200']['api_requests_per_min']:.0f} req/min "
          f"(cluster alone {r['idle_200']['cluster_without_operator_per_min']:.0f} req/min)")
    ro = r["reaction"]
    print(f"CR change -> Deployment ({RUNS}x): median {ro['operator']['median_s']*1e3:.0f} ms "
          f"p95 {ro['operator']['p95_s']*1e3:.0f} ms | bare watch median {ro['bare_watch']['median_s']*1e3:.0f} ms"
          f" | ratio {ro['ratio_median']:.1f}")
    return results


class _Sampler:
    """The operator process's peak RSS, its peak count of open TCP connections (each API call that finds
    no idle one in its client's pool opens one) and its CPU seconds, sampled every 0.2 s in a thread."""

    def __init__(self, pid: int) -> None:
        import threading

        self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.peak_connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
                self.peak_connections = max(self.peak_connections, len(self.proc.net_connections("tcp")))
            except psutil.Error:
                return

    def cpu_seconds(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _phases(cluster: TestCluster, ns: str) -> dict[str, str]:
    """Each Workflow's phase ("" before its first status); none when the API server answers with an error
    (it may time out a list while the operator's cold start loads it): the caller polls again."""
    res = cluster.kubectl("get", "workflows", "-n", ns, "-o", "json", check=False)
    if res.returncode != 0:
        return {}
    return {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "") for i in json.loads(res.stdout)["items"]}


class PhaseWatch:
    """Each Workflow of ``namespace`` and its phase, as ``kubectl get --watch`` sees them, in a thread:
    the cost of following a cold start is one line per change, not a list of every Workflow per poll
    (polling ``kubectl get -o json`` of 1,000 Workflows back to back took a core of its own from the
    API server and the operator it was measuring, a cost growing with the count times the duration).
    A watch the API server ends (its timeout, a loaded watch cache) is started again: it lists first."""

    def __init__(self, cluster: TestCluster, namespace: str) -> None:
        self.phases: dict[str, str] = {}
        self.first: dict[str, float] = {}   # name -> when the watch first showed it with a phase
        self._args = [str(cluster.kubectl_path), "--kubeconfig", str(cluster.kubeconfig), "get", "workflows",
                      "-n", namespace, "--watch", "--no-headers", "-o",
                      "custom-columns=N:.metadata.name,P:.status.phase"]
        self._env = cluster.env
        self._stopped = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stopped.is_set():
            self._proc = proc = subprocess.Popen(self._args, stdout=subprocess.PIPE, env=self._env, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                name, phase = [*line.split(), "", ""][:2]
                phase = "" if phase == "<none>" else phase
                self.phases[name] = phase
                if phase:
                    self.first.setdefault(name, time.monotonic())
            proc.wait()

    def phased(self) -> int:
        """How many Workflows the watch has shown with a phase."""
        return len(self.first)

    def stop(self) -> None:
        """End the watch (again: nothing)."""
        self._stopped.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._thread.join(timeout=10)


def _kubelet(cluster: TestCluster, namespace: str, workdir: Path, stop: threading.Event) -> threading.Thread:
    """The fake kubelet of ``namespace`` (its pods' workers as local processes), in a thread of its own
    until ``stop`` is set."""

    async def serve() -> None:
        async with FakeKubelet(namespace, Path(cluster.kubeconfig), workdir):
            await asyncio.to_thread(stop.wait)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    return thread


#: What a worker process imports on its way to ready: its command, the worker, the Kubernetes platform and
#: what its first heartbeat (the Lease) and the ConfigMap stores load. Keep in step with the worker.
WORKER_IMPORTS = ("syncplane.entry", "syncplane.worker.command", "syncplane.worker.main",
                  "syncplane.worker.platform.kubernetes", "kubernetes_asyncio.client", "kubernetes_asyncio.config")


def workers_alone(count: int) -> dict[str, Any]:
    """The floor of ``count`` worker starts at once on this machine: ``count`` processes of the interpreter
    the fake kubelet runs workers with, started together, each importing :data:`WORKER_IMPORTS` and
    exiting; seconds until all are done, and each process's CPU seconds (user + system, from ``wait4``).
    No process-per-worker design can start ``count`` workers faster than this on the same cores."""
    program = "import " + ", ".join(WORKER_IMPORTS)
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", program]) for _ in range(count)]
    cpu: list[float] = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"`python -c {program!r}` exited {proc.returncode}")
        cpu.append(usage.ru_utime + usage.ru_stime)
    return {"processes": count, "imports": list(WORKER_IMPORTS), "all_done_s": time.monotonic() - t0,
            "cpu_s_per_process": {"median": statistics.median(cpu), "max": max(cpu)},
            "cpu_s_total": sum(cpu)}


class ClassCpu:
    """CPU seconds (user + system) by process class while a scenario runs, sampled every ``interval``
    seconds in a thread: the test cluster's processes by name, the operator, the worker processes (this
    process's children with POD_NAME set: the fake kubelet's), kubectl (the bench's own watches and
    patches), and this process (the fake kubelet's thread and the bench). ``worker_cpu[pod]``: the last
    sample of each worker's CPU seconds (the caller reads it when that worker's Workflow is RUNNING)."""

    def __init__(self, cluster: TestCluster, interval: float = 0.5) -> None:
        self.classes: dict[str, dict[int, psutil.Process]] = {
            name: {pid: psutil.Process(pid)} for name, pid in cluster.pids_by_name.items()}
        self.me = psutil.Process()
        self.pods: dict[int, str] = {}
        self.last: dict[tuple[str, int], float] = {}
        self.worker_cpu: dict[str, float] = {}
        self.interval = interval
        self._stop = threading.Event()
        self._sample()
        self.start = dict(self.last)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _classify(self, proc: psutil.Process) -> str | None:
        if proc.pid in self.pods:
            return "workers"
        with contextlib.suppress(psutil.Error):
            pod = proc.environ().get("POD_NAME")
            if pod:
                self.pods[proc.pid] = pod
                return "workers"
            cmd = proc.cmdline()
            if "operator" in cmd:
                return "operator"
            if cmd and cmd[0].endswith("kubectl"):
                return "kubectl"
        return None

    def _sample(self) -> None:
        procs = [("bench+kubelet", self.me)]
        for name, by_pid in self.classes.items():
            procs += [(name, p) for p in by_pid.values()]
        with contextlib.suppress(psutil.Error):
            for child in self.me.children(recursive=True):
                kind = self._classify(child)
                if kind is not None:
                    procs.append((kind, child))
        for kind, proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                cpu = float(t.user + t.system)
                self.last[(kind, proc.pid)] = cpu
                if proc.pid in self.pods:
                    self.worker_cpu[self.pods[proc.pid]] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def report(self) -> dict[str, float]:
        """CPU seconds by class since this object was made (processes gone before a sample: lost)."""
        self._stop.set()
        self._thread.join()
        self._sample()
        out: dict[str, float] = {}
        for (kind, pid), cpu in self.last.items():
            out[kind] = out.get(kind, 0.0) + cpu - self.start.get((kind, pid), 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _steps(ns: str, workdir: Path, watches: dict[str, Any], kubelet_log: list[tuple[float, str]],
           patched: dict[str, float], names: list[str]) -> dict[str, Any]:
    """Per start step (as benchmarks/start_timeline.py names them for one start), the seconds after each
    Workflow's patch at which it was first seen, p50/p95/max over the Workflows that reached it."""
    from benchmarks.start_timeline import _log_time

    per: dict[str, list[float]] = {}
    for name in names:
        t0 = patched[name]
        pods = [line.split()[0] for _, line in watches["pod"].lines if line.startswith(f"{name}-worker-")]
        pod = pods[0] if pods else ""
        started = next((t for t, message in kubelet_log if message.startswith(f"fake kubelet: started {pod} ")), None)
        steps = {
            "workflow STARTING": watches["workflow"].first(t0, rf"^{name} RUNNING STARTING$"),
            "deployment": watches["deployment"].first(t0, rf"^{name}-worker"),
            "pod": watches["pod"].first(t0, rf"^{name}-worker-"),
            "process started (kubelet)": started if pod else None,
            "worker listening": _log_time(workdir / f"{pod}.log", r"listening on") if pod else None,
            "lease": watches["lease"].first(t0, rf"^{re.escape(pod)} ") if pod else None,
            "lease ready": watches["lease"].first(t0, rf'^{re.escape(pod)} .*"ready": true') if pod else None,
            "deployment available": watches["deployment"].first(t0, rf"^{name}-worker 1$"),
            "workflow RUNNING": watches["workflow"].first(t0, rf"^{name} RUNNING RUNNING$"),
        }
        for step, t in steps.items():
            if t is not None:
                per.setdefault(step, []).append(t - t0)
    return {step: {"count": len(v), "median_s": round(statistics.median(v), 2),
                   "p95_s": round(statistics.quantiles(v, n=20)[18], 2) if len(v) > 1 else round(v[0], 2),
                   "max_s": round(max(v), 2)} for step, v in per.items()}


class _Remember(logging.Handler):
    """Keeps (time, message) of each record: the fake kubelet's "started <pod>" lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.created, record.getMessage()))


def concurrent_starts(cluster: TestCluster, ns: str, workdir: Path, count: int = STARTS,
                      deadline: float = 600.0, idle_window: float = 10.0) -> dict[str, Any]:
    """``count`` STOPPED Workflows of ``ns`` (which the operator watches) patched to RUNNING at once:
    per Workflow, the seconds from its patch to phase RUNNING (the Deployment Available under the fake
    kubelet, the worker's heartbeat ready). Secrets with an unreachable token URL: the workers start,
    their connectors retry. Those not RUNNING ``deadline`` seconds after the patches are counted, not
    waited for (a worker whose heartbeat goes stale on a loaded machine is ERROR, then restarted).

    Two same-run baselines: ``bare_watch``, the same patches seen by a bare watch of the Workflows (the
    API server's own floor), and ``workers_alone`` (:func:`workers_alone`), ``count`` processes doing
    only a worker's imports at once (the machine's floor for ``count`` process starts), run first while
    the operator idles. Where the time goes: ``steps``, per start step the seconds after the patch
    (p50/p95, as benchmarks/start_timeline.py gives them for one start); ``cpu_s``, CPU seconds by process
    class from the patches until every one is RUNNING (:class:`ClassCpu`); ``worker_cpu_s_at_running``,
    each worker's CPU seconds when its Workflow showed RUNNING; ``requests``, the API server's requests by
    kind over the same window (:class:`ClusterCost`); ``idle_workers``, the workers' CPU share of a core
    and the requests over ``idle_window`` seconds after that (unreachable vendors: what retrying costs)."""
    from benchmarks.start_timeline import _watches

    for secret, data in UNREACHABLE_SECRETS.items():
        cluster.kubectl("create", "secret", "generic", secret, "-n", ns, *literals(data))
    names = [f"start-{i:02d}" for i in range(count)]
    _apply(cluster, ns, [_workflow(n) for n in names])

    _wait(cluster, f"{count} workflows STOPPED",
          lambda: list(_phases(cluster, ns).values()).count("STOPPED") == count, 300)
    floor = workers_alone(count)
    # One watch prints each change's desired state and phase; its first `count` lines are the listing.
    watch = subprocess.Popen([str(cluster.kubectl_path), "--kubeconfig", str(cluster.kubeconfig), "get", "workflows",
                              "-n", ns, "--watch", "--no-headers", "-o",
                              "custom-columns=N:.metadata.name,D:.spec.desiredState,P:.status.phase"],
                             stdout=subprocess.PIPE, env=cluster.env, text=True)
    assert watch.stdout is not None
    for _ in range(count):
        watch.stdout.readline()
    seen: dict[str, float] = {}      # name -> when the watch first showed desiredState RUNNING
    running: dict[str, float] = {}   # name -> when the watch first showed phase RUNNING
    at_running: dict[str, float] = {}   # name -> its worker's CPU seconds then (last sample)
    kubelet_log = _Remember()
    kubelet_logger = logging.getLogger("tests.k8s.kubelet")
    kubelet_logger.addHandler(kubelet_log)
    kubelet_logger.setLevel(logging.INFO)
    steps = contextlib.ExitStack()
    watches = steps.enter_context(_watches(cluster, ns))
    cluster.wait_until("the steps' watches listed", lambda: len(watches["workflow"].lines) >= count, 60)
    time.sleep(2)   # the other watches' (empty) listings: not synchronisation of the measured steps
    cpu = ClassCpu(cluster)
    cost = ClusterCost(cluster)

    def follow() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            name, desired, phase = [*line.split(), "", "", ""][:3]
            now = time.monotonic()
            if desired == "RUNNING":
                seen.setdefault(name, now)
            if phase == "RUNNING" and name not in running:
                running[name] = now
                at_running[name] = sum(c for pod, c in list(cpu.worker_cpu.items())
                                       if pod.startswith(f"{name}-worker-"))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    stop = threading.Event()
    kubelet = _kubelet(cluster, ns, workdir, stop)
    patched: dict[str, float] = {}
    patched_wall: dict[str, float] = {}
    out: dict[str, Any] = {"workflows": count, "load_1min_before": os.getloadavg()[0]}
    try:
        def start(name: str) -> None:
            patched[name], patched_wall[name] = time.monotonic(), time.time()
            cluster.kubectl("patch", "workflow", name, "-n", ns, "--type", "merge",
                            "-p", '{"spec":{"desiredState":"RUNNING"}}')

        threads = [threading.Thread(target=start, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            _wait(cluster, f"{count} workflows RUNNING", lambda: len(running) == count, deadline)
        except ClusterError:   # a figure still: those that made it, and how many did not
            pass
        out["load_1min_at_running"] = os.getloadavg()[0]
        out["cpu_s"] = cpu.report()
        out["requests"] = cost.report(count / 10)["requests"]
        idle_cpu, idle_cost = ClassCpu(cluster), ClusterCost(cluster)
        time.sleep(idle_window)   # a measurement window, not synchronisation
        workers_idle = idle_cpu.report().get("workers", 0.0)
        out["idle_workers"] = {"window_s": idle_window, "workers": len(idle_cpu.pods),
                               "cpu_percent_of_a_core_per_worker":
                                   round(100 * workers_idle / idle_window / max(1, len(idle_cpu.pods)), 2),
                               "requests": idle_cost.report(1)["requests"]}
        out["steps"] = _steps(ns, workdir, watches, kubelet_log.lines, patched_wall, names)
    finally:
        stop.set()
        kubelet.join(timeout=120)
        watch.kill()
        watch.wait()
        steps.close()
        kubelet_logger.removeHandler(kubelet_log)
    ours = [running[n] - patched[n] for n in names if n in running]
    bare = [seen[n] - patched[n] for n in names if n in seen]
    cpu_at_running = list(at_running.values())
    out.update({"not_running_within_s": {"count": count - len(ours), "deadline_s": deadline},
                "patch_to_running": {**pctl(ours), "max_s": max(ours)} if len(ours) > 1 else {},
                "bare_watch": {**pctl(bare), "max_s": max(bare)} if len(bare) > 1 else {},
                "workers_alone": floor,
                "worker_cpu_s_at_running": {"median": statistics.median(cpu_at_running),
                                            "max": max(cpu_at_running)} if cpu_at_running else {}})
    if len(ours) > 1:
        out["p95_over_workers_alone"] = out["patch_to_running"]["p95_s"] / floor["all_done_s"]
        out["p95_over_bare_watch"] = (out["patch_to_running"]["p95_s"] / out["bare_watch"]["p95_s"]
                                      if out["bare_watch"] else None)
    return out


@contextlib.contextmanager
def _sampled_operator(cluster: TestCluster, namespace: str, log: Path, *more: str,
                      metrics_listen: str | None = None) -> Iterator[_Sampler]:
    """`syncplane operator` (:func:`_operator`) sampled by a :class:`_Sampler` while the block runs;
    the sampler and the operator are stopped after it, also when it fails."""
    proc = _operator(cluster, namespace, log, *more, metrics_listen=metrics_listen)
    sampler = _Sampler(proc.pid)
    try:
        yield sampler
    finally:
        sampler.stop()
        proc.terminate()
        proc.wait(timeout=60)


def _peaks(sampler: _Sampler, prefix: str = "") -> dict[str, float]:
    """The operator's peak RSS (MiB) and peak count of open TCP connections so far, named with ``prefix``."""
    return {f"{prefix}peak_rss_mib": sampler.peak_rss / 2**20,
            f"{prefix}peak_tcp_connections": sampler.peak_connections}


def operator_alone(cluster: TestCluster, ns: str, log: Path, window: float) -> dict[str, float]:
    """The operator watching ``ns`` with no Workflow in it, for ``window`` seconds: its peak RSS and
    CPU share of one core (a measurement window: startup included)."""
    with _sampled_operator(cluster, ns, log) as sampler:
        cpu0, t0 = sampler.cpu_seconds(), time.monotonic()
        time.sleep(window)  # a measurement window, not synchronisation
        return {"peak_rss_mib": sampler.peak_rss / 2**20,
                "cpu_percent_of_a_core": 100 * (sampler.cpu_seconds() - cpu0) / (time.monotonic() - t0)}


def idle(cluster: TestCluster, sampler: _Sampler, window: float, alone_per_min: float) -> dict[str, float]:
    """The operator idle for ``window`` seconds (after 5 s for the last status writes' watch events): API
    requests per minute (all, and beyond ``alone_per_min``, the same cluster idling without it), its CPU
    share of one core and its RSS."""
    time.sleep(5)   # let the last status writes' watch events settle before the idle window
    before, cpu0, t1 = _requests_total(cluster), sampler.cpu_seconds(), time.monotonic()
    time.sleep(window)  # a measurement window, not synchronisation
    elapsed = time.monotonic() - t1
    rpm = (_requests_total(cluster) - before) / (elapsed / 60)
    return {"idle_requests_per_min": rpm, "idle_operator_requests_per_min": rpm - alone_per_min,
            "idle_cpu_percent_of_a_core": 100 * (sampler.cpu_seconds() - cpu0) / elapsed,
            "idle_rss_mib": sampler.proc.memory_info().rss / 2**20}


def _create(cluster: TestCluster, namespaces: list[str], count: int, make_namespaces: bool = True) -> float:
    """``count`` STOPPED Workflows spread evenly over ``namespaces`` (made here unless ``make_namespaces``
    is False), 200 per kubectl apply; the seconds it took."""
    t = time.monotonic()
    for ns in namespaces if make_namespaces else []:
        cluster.kubectl("create", "namespace", ns)
    per = count // len(namespaces)
    for ns in namespaces:
        for start in range(0, per, 200):
            _apply(cluster, ns, [_workflow(f"idle-{i:04d}") for i in range(start, min(per, start + 200))])
    return time.monotonic() - t


class ClusterCost:
    """What the test cluster spends from this object's creation to :meth:`report`: the CPU seconds of each
    of its processes (kube-apiserver, etcd, kube-controller-manager, kube-scheduler, kwok), the API
    server's requests and the seconds it spent on them (apiserver_request_duration_seconds_sum, wall
    time summed over concurrent requests) by verb and resource, and the 1-minute load average at both ends
    (the machine is shared: a figure comes with its load)."""

    def __init__(self, cluster: TestCluster) -> None:
        self.cluster = cluster
        self.processes = {name: psutil.Process(pid) for name, pid in cluster.pids_by_name.items()}
        self.cpu0 = self._cpu()
        self.requests0 = cluster.requests_by_kind()
        self.seconds0 = cluster.requests_by_kind("apiserver_request_duration_seconds_sum")
        self.load0 = os.getloadavg()[0]
        self.t0 = time.monotonic()

    def _cpu(self) -> dict[str, float]:
        return {name: float(sum(p.cpu_times()[:2])) for name, p in self.processes.items()}

    def report(self, least: float = 1) -> dict[str, Any]:
        """Elapsed seconds, load, CPU seconds by process, and the requests (at least ``least`` of a
        kind) with the API server's seconds on each kind (WATCH: open watches, not work)."""
        cpu = self._cpu()
        made = {k: v - self.requests0.get(k, 0) for k, v in self.cluster.requests_by_kind().items()}
        spent = {k: v - self.seconds0.get(k, 0) for k, v in
                 self.cluster.requests_by_kind("apiserver_request_duration_seconds_sum").items()}
        kinds = sorted((k for k, v in made.items() if v >= least), key=lambda k: -made[k])
        return {"elapsed_s": round(time.monotonic() - self.t0, 2),
                "load_1min": [self.load0, os.getloadavg()[0]],
                "cpu_s": {name: round(cpu[name] - self.cpu0[name], 2) for name in cpu},
                "requests": {" ".join(k): round(made[k]) for k in kinds},
                "api_server_s": {" ".join(k): round(spent.get(k, 0.0), 2) for k in kinds if k[0] != "WATCH"}}


def restart_and_create(cluster: TestCluster, ns: str, count: int, workdir: Path, alone_create_s: float,
                       settle: float = 5.0) -> dict[str, Any]:
    """The two other starts a user meets (issue 17), after a first operator gave ``ns``'s ``count``
    Workflows a phase and was stopped:

    - ``restart``: an operator started again over them (an upgrade, a rescheduled pod): the seconds until
      it has reconciled each once (its reconciles counter), the status PATCHes and Events it wrote (none
      is due: every reconcile is a no-op), its CPU seconds and the cluster's cost (:class:`ClusterCost`),
      counted ``settle`` seconds after (kopf posts Events from a queue);
    - ``created_while_up``: ``count`` Workflows created (as :func:`_create` did for the baseline,
      ``alone_create_s``) in a namespace the same operator watches: seconds from the first create until
      every one has a phase, and the cluster's cost."""
    from tests.k8s.cluster import free_ports

    port = free_ports(1)[0]
    fresh = "created"
    cluster.kubectl("create", "namespace", fresh)
    out: dict[str, Any] = {}
    cost = ClusterCost(cluster)
    t0 = time.monotonic()
    with _sampled_operator(cluster, ns, workdir / "operator-restart.log", fresh,
                           metrics_listen=f"127.0.0.1:{port}") as sampler:
        _wait(cluster, f"{count} reconciles by the restarted operator", lambda: operator_reconciles(port) >= count,
              timeout=600)
        seconds = time.monotonic() - t0
        time.sleep(settle)  # a measurement window, not synchronisation: Events it might still post
        report = cost.report(count / 10)
        out["restart"] = {"workflows": count, "every_one_reconciled_s": seconds,
                          "status_patches": round(report["requests"].get("PATCH workflows/status", 0)),
                          "events_posted": round(report["requests"].get("POST events", 0)),
                          "workflow_patches": round(report["requests"].get("PATCH workflows", 0)),
                          "operator_cpu_s": sampler.cpu_seconds(), "cluster": report,
                          **_peaks(sampler)}
        watch = PhaseWatch(cluster, fresh)
        try:
            cost = ClusterCost(cluster)
            t1 = time.monotonic()
            created = _create(cluster, [fresh], count, make_namespaces=False)
            _wait(cluster, f"{count} created workflows with a phase", lambda: watch.phased() == count, timeout=900)
            out["created_while_up"] = {"workflows": count, "every_phase_s": time.monotonic() - t1,
                                       "create_s": created, "cluster_alone_create_s": alone_create_s,
                                       "cluster": cost.report(count / 10), **_peaks(sampler)}
        finally:
            watch.stop()
    return out


def _cluster_alone(cluster: TestCluster, window: float) -> float:
    """API requests per minute of the cluster idling for ``window`` seconds with no operator."""
    before, t = _requests_total(cluster), time.monotonic()
    time.sleep(window)  # a measurement window, not synchronisation
    return (_requests_total(cluster) - before) / ((time.monotonic() - t) / 60)


def watched_namespaces(count: int = 1000, spread: int = 10, watched: int = 2,
                       window: float = 60.0) -> dict[str, Any]:
    """issue 17, ``watchNamespaces``: ``count`` STOPPED Workflows in ``spread`` namespaces, the operator
    watching ``watched`` of them (``--namespace`` each, as the chart passes `watchNamespaces`): the cold
    start until every watched Workflow has a phase (baseline: the cluster alone creating all of them), how
    many unwatched ones got one (none expected), the operator's peak RSS, and idle: its CPU, RSS and API
    requests per minute against the same cluster idling without it. Memory and requests are to follow the
    watched Workflows (compare :func:`scale` over ``count * watched / spread``), not all of them."""
    out: dict[str, Any] = {"workflows": count, "namespaces": spread, "watched_namespaces": watched,
                           "watched_workflows": count // spread * watched}
    with TestCluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        cluster.kubectl("apply", "--server-side", "-f", str(CRD))
        cluster.wait_established("workflows.syncplane.io")
        namespaces = [f"team-{i:02d}" for i in range(spread)]
        out["cluster_alone_create_s"] = _create(cluster, namespaces, count)
        out["cluster_alone_requests_per_min"] = _cluster_alone(cluster, window)
        watches = [PhaseWatch(cluster, ns) for ns in namespaces[:watched]]
        per = count // spread
        cluster.wait_until("the watched workflows listed", lambda: all(len(w.phases) == per for w in watches), 120)
        t0 = time.monotonic()
        try:
            with _sampled_operator(cluster, namespaces[0], Path(tmp) / "operator.log",
                                   *namespaces[1:watched]) as sampler:
                _wait(cluster, f"{out['watched_workflows']} watched workflows with a phase",
                      lambda: sum(w.phased() for w in watches) == out["watched_workflows"], timeout=900)
                out["cold_start_every_watched_phase_s"] = time.monotonic() - t0
                for w in watches:
                    w.stop()
                out.update(_peaks(sampler, "cold_start_"))
                out.update(idle(cluster, sampler, window, out["cluster_alone_requests_per_min"]))
                out["unwatched_with_a_phase"] = sum(1 for ns in namespaces[watched:]
                                                    for phase in _phases(cluster, ns).values() if phase)
                out.update(_peaks(sampler))
        finally:
            for w in watches:
                w.stop()
            print(json.dumps(out, indent=1), flush=True)   # what was measured, also when a stage failed
    return out


def scale(count: int, window: float = 60.0, starts: int = STARTS) -> dict[str, Any]:
    """issue 17: the operator with 0 Workflows (``window`` seconds), then ``count`` STOPPED Workflows: cold
    start (every one has a phase; baseline: the cluster alone creating them), the operator's peak RSS,
    then idle for ``window`` seconds: its CPU share of one core and the API requests per minute, against
    the same cluster idling without it (measured first); then ``starts`` concurrent starts
    (:func:`concurrent_starts`; 0: none); then, that operator stopped, :func:`restart_and_create`: one
    started again over the phased Workflows (it writes nothing), and ``count`` more created while it runs.

    The cold start runs from the operator's spawn (Python start-up, imports, kopf's login and listing
    included) until a ``kubectl get --watch`` (:class:`PhaseWatch`) has shown the last Workflow with a
    phase; Workflows created before, by ``kubectl apply`` with no operator (``cluster_alone_create_s``,
    the baseline: 1,000 writes into the same API server on the same machine, one at a time). Its cost is
    broken down (:class:`ClusterCost`): CPU seconds of the operator and of each cluster process, the
    requests by kind and the API server's seconds on each."""
    out: dict[str, Any] = {"workflows": count}
    with TestCluster() as cluster, tempfile.TemporaryDirectory() as tmp:
        cluster.kubectl("apply", "--server-side", "-f", str(CRD))
        cluster.wait_established("workflows.syncplane.io")
        ns, starts_ns = "bench", "starts"
        cluster.kubectl("create", "namespace", starts_ns)
        out["no_workflows"] = operator_alone(cluster, starts_ns, Path(tmp) / "operator-alone.log", min(window, 20))
        out["cluster_alone_create_s"] = _create(cluster, [ns], count)
        alone = ClusterCost(cluster)
        out["cluster_alone_requests_per_min"] = _cluster_alone(cluster, window)
        # what the cluster spends idling (its controllers, leases): to subtract from a window's CPU seconds
        out["cluster_alone_idle"] = alone.report()
        watch = PhaseWatch(cluster, ns)
        cluster.wait_until(f"{count} workflows listed by the watch", lambda: len(watch.phases) == count, 120)
        cost = ClusterCost(cluster)
        t0 = time.monotonic()
        try:
            with _sampled_operator(cluster, ns, Path(tmp) / "operator.log", starts_ns) as sampler:
                _wait(cluster, f"{count} workflows with a phase", lambda: watch.phased() == count, timeout=900)
                out["cold_start_every_phase_s"] = time.monotonic() - t0
                out["cold_start_first_phase_s"] = min(watch.first.values()) - t0
                watch.stop()
                out["cold_start_cpu_s"] = sampler.cpu_seconds()
                out["cold_start_cluster"] = report = cost.report(count / 10)
                out["cold_start_requests"] = report["requests"]
                out.update(_peaks(sampler, "cold_start_"))
                out.update(idle(cluster, sampler, window, out["cluster_alone_requests_per_min"]))
                if starts:
                    out["concurrent_starts"] = concurrent_starts(cluster, starts_ns, Path(tmp) / "containers",
                                                                 starts)
                out.update(_peaks(sampler))
            out.update(restart_and_create(cluster, ns, count, Path(tmp), out["cluster_alone_create_s"]))
        finally:
            watch.stop()
            print(json.dumps(out, indent=1), flush=True)   # what was measured, also when a stage failed
    return out


def main(argv: list[str]) -> int:
    """``python -m benchmarks.bench_operator [N [WINDOW [STARTS]]]``: :func:`scale` (1,000, 60 s, 50);
    ``python -m benchmarks.bench_operator watch-namespaces [N [WINDOW]]``: :func:`watched_namespaces`
    (1,000 in 10 namespaces, 2 watched, 60 s)."""
    if argv[:1] == ["watch-namespaces"]:
        watched_namespaces(int(argv[1]) if len(argv) > 1 else 1000, window=float(argv[2]) if len(argv) > 2 else 60.0)
        return 0
    count = int(argv[0]) if argv else 1000
    window = float(argv[1]) if len(argv) > 1 else 60.0
    starts = int(argv[2]) if len(argv) > 2 else STARTS
    scale(count, window, starts)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
