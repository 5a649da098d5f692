"""A real, throw-away Kubernetes control plane for the k8s test tier.

`TestCluster.start()` runs, on free 127.0.0.1 ports and inside one temp dir:

    etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler, kwok

and registers one fake Node that KWOK keeps Ready, so Deployments really
schedule and their (fake) pods turn Running/Ready.  No container runtime is
involved and nothing dials pod or node IPs: there are no webhooks, no
aggregated APIs and no kubelet.

The binaries come from `scripts/build-k8s.sh` (`make k8s-binaries`), in
`$SYNCPLANE_CACHE/k8s-<version>/bin` (default `~/.cache/syncplane`), where
<version> is the `k8s.io/kubernetes` requirement of `tests/k8s/cluster/go.mod`.

`stop()` terminates every process by pid, removes the temp dir, then checks
the process table and raises if anything it started is still alive.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
GO_MOD = HERE / "cluster" / "go.mod"
KWOK_STAGES = sorted((HERE / "kwok").glob("*.yaml"))

SERVER_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
CLIENT_BINARIES = ("kubectl", "helm")

# The annotation KWOK selects the nodes it manages by; see fake_node().
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
SERVICE_CIDR = "10.0.0.0/24"
POD_CIDR = "10.244.0.0/16"  # KWOK hands out fake pod IPs from this; must not overlap SERVICE_CIDR

LOG_TAIL_LINES = 40
START_ATTEMPTS = 2  # a second go only when a picked port was taken before its process bound it
STOP_GRACE_SECONDS = 10.0


class ClusterError(RuntimeError):
    """The test cluster could not start, or did not stop cleanly."""


def kubernetes_version(go_mod: Path = GO_MOD) -> str:
    """The `k8s.io/kubernetes` version pinned by the committed wrapper go.mod."""
    match = re.search(r"^require\s+k8s\.io/kubernetes\s+(v\S+)\s*$", go_mod.read_text(), re.MULTILINE)
    if not match:
        raise ClusterError(f"no `require k8s.io/kubernetes vX.Y.Z` line in {go_mod}")
    return match.group(1)


def cache_dir() -> Path:
    return Path(os.environ.get("SYNCPLANE_CACHE") or Path.home() / ".cache" / "syncplane")


def default_bin_dir() -> Path:
    return cache_dir() / f"k8s-{kubernetes_version()}" / "bin"


def check_binaries(bin_dir: Path) -> None:
    missing = [name for name in SERVER_BINARIES + CLIENT_BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        raise ClusterError(
            f"Kubernetes test binaries missing from {bin_dir}: {', '.join(missing)}.\n"
            "Build them with `make k8s-binaries` (scripts/build-k8s.sh)."
        )


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports below the kernel's ephemeral range, so that no outgoing
    connection can take one while its server restarts (all sockets are held until every port
    is picked)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    candidates = random.sample(range(max(1024, low - 12_000), low), k=min(12_000, low - 1024))
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for port in candidates:
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            ports.append(port)
            if len(ports) == count:
                return ports
    raise ClusterError(f"no {count} free loopback ports below {low}")


def fake_node(name: str) -> dict[str, Any]:
    key, value = KWOK_NODE_ANNOTATION
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {key: value, "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/role": "agent",
                "node-role.kubernetes.io/agent": "",
            },
        },
        # No taint: any workload schedules here without a toleration.
        "spec": {},
    }


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the test process dies without running stop()."""
    PR_SET_PDEATHSIG = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    args: tuple[str, ...] = ()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            text = [f"(log unreadable: {exc})"]
        state = "running" if self.popen.poll() is None else f"exited with code {self.popen.returncode}"
        header = f"--- {self.name} (pid {self.popen.pid}, {state}), last {lines} lines of {self.log}:"
        return "\n".join([header, *text])


def requests_by_kind(metrics_text: str, metric: str = "apiserver_request_total") -> dict[tuple[str, str], float]:
    """The samples named ``metric`` in an API server's /metrics text (parsed by prometheus_client), summed by
    (verb, resource[/subresource]), e.g. ``{("PATCH", "workflows/status"): 3.0}``. ``metric`` is a sample's
    name: apiserver_request_total (requests), or apiserver_request_duration_seconds_sum (the seconds the
    API server spent on them: a sample of the histogram family apiserver_request_duration_seconds). A
    defaultdict: a kind the API server has not served reads 0."""
    counts: dict[tuple[str, str], float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == metric:
                labels = sample.labels
                resource = "/".join(x for x in (labels.get("resource", ""), labels.get("subresource", "")) if x)
                counts[(labels.get("verb", ""), resource)] += sample.value
    return counts


class TestCluster:
    """etcd + kube-apiserver + controller-manager + scheduler + KWOK with one fake node."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        node_name: str = "kwok-node-0",
        start_timeout: float = 90.0,
    ) -> None:
        self.bin_dir = bin_dir if bin_dir is not None else default_bin_dir()
        self.node_name = node_name
        self.start_timeout = start_timeout
        self.tmp: Path | None = None
        self.server = ""  # https://127.0.0.1:<port> once started
        self.start_seconds: float | None = None
        self._processes: list[_Process] = []
        # pid -> process creation time of everything this instance ever started (kept after stop()),
        # so that the leftover check cannot mistake a later process reusing a pid for one of ours.
        self.started: dict[int, float] = {}
        self._ssl: ssl.SSLContext | None = None

    # ---------------------------------------------------------------- public

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm_path(self) -> Path:
        return self.bin_dir / "helm"

    @property
    def kubeconfig(self) -> Path:
        return self._dir / "kubeconfig"

    @property
    def pids(self) -> list[int]:
        """The pids of the running cluster's processes."""
        return [p.popen.pid for p in self._processes]

    @property
    def pids_by_name(self) -> dict[str, int]:
        """The pid of each running cluster process by its name (etcd, kube-apiserver, kwok, ...)."""
        return {p.name: p.popen.pid for p in self._processes if p.popen.poll() is None}

    @property
    def env(self) -> dict[str, str]:
        """Environment for kubectl/helm (and code under test) aimed at this cluster only."""
        d = self._dir
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(d / "kube-cache"),
            "HELM_CACHE_HOME": str(d / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(d / "helm" / "config"),
            "HELM_DATA_HOME": str(d / "helm" / "data"),
        }

    def __enter__(self) -> TestCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        check_binaries(self.bin_dir)
        if self.tmp is not None:
            raise ClusterError("cluster already started")
        t0 = time.monotonic()
        for attempt in range(1, START_ATTEMPTS + 1):
            self.tmp = Path(tempfile.mkdtemp(prefix="syncplane-k8s-"))
            try:
                self._start(deadline=t0 + self.start_timeout)
                break
            except BaseException as exc:
                cleanup = ""
                try:
                    self.stop()
                except ClusterError as stop_error:
                    cleanup = f"\nand cleaning up after it failed too: {stop_error}"
                if not isinstance(exc, ClusterError):
                    raise
                # A port from free_ports() can be taken by someone else before our process binds it.
                if attempt < START_ATTEMPTS and "address already in use" in str(exc) and not cleanup:
                    continue
                raise ClusterError(f"test cluster failed to start: {exc}{cleanup}") from exc
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Terminate every process by pid, delete the temp dir, verify nothing survived."""
        tmp, processes = self.tmp, self._processes
        if tmp is None:
            return
        # Clients of the API server first, then the API server, then etcd.
        for group in (("kwok", "kube-scheduler", "kube-controller-manager"), ("kube-apiserver",), ("etcd",)):
            self._terminate([p for p in processes if p.name in group])
        shutil.rmtree(tmp, ignore_errors=True)
        self.tmp, self._processes, self._ssl, self.server = None, [], None, ""
        survivors = self.survivors(tmp)
        if survivors:
            raise ClusterError(
                "test-cluster processes still alive after stop():\n  " + "\n  ".join(survivors)
            )

    def survivors(self, tmp: Path) -> list[str]:
        """Live processes that this instance started, or that run from the bin dir naming `tmp`."""
        bin_dir = str(self.bin_dir.resolve()) + os.sep
        found = []
        for proc in psutil.process_iter(["pid", "exe", "cmdline", "status", "create_time"]):
            info = proc.info
            if info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(info["cmdline"] or [])
            started = self.started.get(info["pid"])
            ours = (started is not None and abs(started - (info["create_time"] or 0.0)) < 0.5) or (
                (info["exe"] or "").startswith(bin_dir) and str(tmp) in cmdline
            )
            if ours:
                found.append(f"pid {info['pid']}: {cmdline[:200]}")
        return found

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return self._run(self.kubectl_path, args, check=check, input=input, timeout=timeout)

    def helm(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        return self._run(self.helm_path, args, check=check, input=input, timeout=timeout)

    def api(self, method: str, path: str, body: Any = None, timeout: float = 10.0,
            content_type: str = "application/json") -> tuple[int, Any]:
        """One request to the API server as the admin user: (status, decoded JSON body or text); a PATCH
        names its kind in ``content_type`` (e.g. application/merge-patch+json)."""
        conn = self.connection(timeout)
        try:
            payload = None if body is None else json.dumps(body)
            conn.request(method, path, body=payload, headers={"Content-Type": content_type})
            resp = conn.getresponse()
            raw = resp.read().decode(errors="replace")
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw

    def connection(self, timeout: float = 10.0) -> http.client.HTTPSConnection:
        """A connection to the API server as the admin user (client certificate), not yet opened; it
        stays open across requests (keep-alive) until closed, so a run of requests pays one TLS handshake."""
        if self._ssl is None:
            raise ClusterError("cluster not started")
        host, port = self.server.removeprefix("https://").rsplit(":", 1)
        return http.client.HTTPSConnection(host, int(port), context=self._ssl, timeout=timeout)

    def requests_by_kind(self, metric: str = "apiserver_request_total") -> dict[tuple[str, str], float]:
        """The API server's requests so far by (verb, resource[/subresource]), from its /metrics: see
        :func:`requests_by_kind`. Raises ClusterError if /metrics does not answer 200."""
        status, text = self.api("GET", "/metrics")
        if status != 200:
            raise ClusterError(f"GET /metrics of the API server: HTTP {status}")
        return requests_by_kind(str(text), metric)

    def wait_established(self, crd: str, timeout: float = 60.0) -> None:
        """Wait until the CustomResourceDefinition ``crd`` (e.g. ``workflows.syncplane.io``) has its
        Established condition True (polled; fails at ``timeout`` seconds). Not `kubectl wait
        --for=condition=Established`: right after the create, before the API server has written any
        condition, that kubectl exits 1 (".status.conditions accessor error: <nil>") instead of waiting."""
        def established() -> bool:
            status, body = self.api("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
            if status != 200 or not isinstance(body, dict):
                return False
            conditions = (body.get("status") or {}).get("conditions") or []
            return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)

        self.wait_until(f"CustomResourceDefinition {crd} Established", established, timeout)

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Stop one control-plane process and start it again with the same flags (an API server restart)."""
        old = next(p for p in self._processes if p.name == name and p.popen.poll() is None)
        self._terminate([old])
        self._processes.remove(old)
        new = self._spawn(name, *old.args)
        if name == "kube-apiserver":
            self._wait("kube-apiserver /readyz after a restart", self._readyz, [new], time.monotonic() + timeout)

    def wait_until(self, what: str, ready: Callable[[], bool], timeout: float = 60.0) -> None:
        """Poll `ready()` until true; fail (with log tails) at the deadline or if a cluster process dies."""
        self._wait(what, ready, self._processes, time.monotonic() + timeout)

    # ---------------------------------------------------------------- start-up

    @property
    def _dir(self) -> Path:
        if self.tmp is None:
            raise ClusterError("cluster not started")
        return self.tmp

    def _start(self, deadline: float) -> None:
        d = self._dir
        (d / "logs").mkdir()
        pki = make_pki(d / "pki")
        self._ssl = ssl.create_default_context(cafile=str(pki["ca.crt"]))
        self._ssl.load_cert_chain(pki["admin.crt"], pki["admin.key"])
        etcd_client, etcd_peer, api_port, cm_port, sched_port, kwok_port = free_ports(6)
        self.server = f"https://127.0.0.1:{api_port}"

        etcd_url = f"http://127.0.0.1:{etcd_client}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        etcd = self._spawn(
            "etcd",
            "--name=default",
            f"--data-dir={d / 'etcd'}",
            "--unsafe-no-fsync",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--log-level=warn",
        )
        self._wait("etcd /health", lambda: _http_ok(f"127.0.0.1:{etcd_client}", "/health"), [etcd], deadline)

        apiserver = self._spawn(
            "kube-apiserver",
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={d / 'apiserver-certs'}",
            f"--tls-cert-file={pki['serving.crt']}",
            f"--tls-private-key-file={pki['serving.key']}",
            f"--client-ca-file={pki['ca.crt']}",
            "--authorization-mode=Node,RBAC",
            "--endpoint-reconciler-type=none",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki['sa.pub']}",
            f"--service-account-signing-key-file={pki['sa.key']}",
            "--allow-privileged=true",
            "--profiling=false",
        )
        self._wait("kube-apiserver /readyz", self._readyz, [apiserver], deadline)
        self._write_kubeconfig(pki)

        common = [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
        ]
        cm = self._spawn(
            "kube-controller-manager",
            *common,
            f"--secure-port={cm_port}",
            f"--cert-dir={d / 'controller-manager-certs'}",
            f"--service-account-private-key-file={pki['sa.key']}",
            f"--root-ca-file={pki['ca.crt']}",
            f"--cluster-signing-cert-file={pki['ca.crt']}",
            f"--cluster-signing-key-file={pki['ca.key']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
        )
        scheduler = self._spawn(
            "kube-scheduler",
            *common,
            f"--secure-port={sched_port}",
            f"--cert-dir={d / 'scheduler-certs'}",
            "--profiling=false",
        )
        key, value = KWOK_NODE_ANNOTATION
        kwok = self._spawn(
            "kwok",
            f"--kubeconfig={self.kubeconfig}",
            *(f"--config={stage}" for stage in KWOK_STAGES),
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={key}={value}",
            f"--server-address=127.0.0.1:{kwok_port}",
            # Heartbeat through a kube-node-lease Lease (renewed every 10s). Without this flag standalone
            # kwok keeps no lease, and the node-lifecycle controller marks the node NotReady (and its pods
            # not Ready) every node-monitor-grace-period, until node-initialize flips it back.
            "--node-lease-duration-seconds=40",
            "--node-ip=127.0.0.1",
            f"--node-port={kwok_port}",
            f"--cidr={POD_CIDR}",
        )
        self._wait("kube-controller-manager /healthz", lambda: _https_ok(cm_port, "/healthz"), [cm], deadline)
        self._wait(
            "kube-scheduler /healthz", lambda: _https_ok(sched_port, "/healthz"), [scheduler], deadline
        )
        self._wait("kwok /healthz", lambda: _http_ok(f"127.0.0.1:{kwok_port}", "/healthz"), [kwok], deadline)

        status, body = self.api("POST", "/api/v1/nodes", fake_node(self.node_name))
        if status != 201:
            raise self._failure(f"creating node {self.node_name} failed: HTTP {status} {body}", [apiserver])
        self._wait(
            f"node {self.node_name} Ready with a Lease", self._node_ready, [kwok, cm, apiserver], deadline
        )

    def _spawn(self, name: str, *args: str) -> _Process:
        log = self._dir / "logs" / f"{name}.log"
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only from the main thread.
        main_thread = threading.current_thread() is threading.main_thread()
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                env=self.env,
                start_new_session=True,  # a Ctrl-C aimed at pytest is for stop() to handle
                preexec_fn=_die_with_parent if main_thread else None,
            )
        proc = _Process(name, popen, log, args)
        self._processes.append(proc)
        try:
            self.started[popen.pid] = psutil.Process(popen.pid).create_time()
        except psutil.Error:  # already gone (and reaped)
            self.started[popen.pid] = 0.0
        return proc

    def _wait(self, what: str, ready: Callable[[], bool], watch: list[_Process], deadline: float) -> None:
        """Poll `ready()` until it is true; fail early if a watched process exits, or at the deadline."""
        last_error = ""
        while True:
            for proc in watch:
                if proc.popen.poll() is not None:
                    raise self._failure(f"{proc.name} exited while waiting for {what}", watch)
            try:
                if ready():
                    return
            except (OSError, http.client.HTTPException, ValueError) as exc:
                last_error = f" (last error: {exc!r})"
            if time.monotonic() > deadline:
                raise self._failure(f"timed out waiting for {what}{last_error}", watch)
            # The poll interval, spent watching the first process for an early exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                watch[0].popen.wait(timeout=0.1)

    def _failure(self, message: str, watch: list[_Process]) -> ClusterError:
        dead = [p for p in self._processes if p not in watch and p.popen.poll() is not None]
        return ClusterError("\n".join([message, *(p.tail() for p in [*watch, *dead])]))

    def _readyz(self) -> bool:
        status, _ = self.api("GET", "/readyz", timeout=2.0)
        return status == 200

    def _node_ready(self) -> bool:
        """The node is Ready and KWOK holds its heartbeat Lease."""
        status, node = self.api("GET", f"/api/v1/nodes/{self.node_name}", timeout=2.0)
        conditions = node.get("status", {}).get("conditions", []) if status == 200 else []
        if not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return False
        lease = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node_name}"
        return self.api("GET", lease, timeout=2.0)[0] == 200

    def _run(
        self, exe: Path, args: Sequence[str], *, check: bool, input: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(exe), *args], env=self.env, input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise ClusterError(
                f"`{exe.name} {' '.join(args)}` exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def _terminate(self, processes: list[_Process]) -> None:
        for proc in processes:
            if proc.popen.poll() is None:
                proc.popen.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in processes:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):  # stop()'s survivor check reports it
                    proc.popen.wait(timeout=STOP_GRACE_SECONDS)

    def _write_kubeconfig(self, pki: dict[str, Path]) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.server, "certificate-authority": str(pki["ca.crt"])},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(pki["admin.crt"]),
                        "client-key": str(pki["admin.key"]),
                    },
                }
            ],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "admin"}}],
            "current-context": "test",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))  # JSON is YAML


def make_pki(pki: Path) -> dict[str, Path]:
    """With the openssl CLI: a CA, the API server's serving cert (SAN 127.0.0.1, localhost), an admin
    client cert (CN=admin, O=system:masters) and the service-account token key pair."""
    pki.mkdir()
    (pki / "openssl.cnf").write_text(OPENSSL_CNF)

    def openssl(*args: str) -> None:
        result = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=pki)
        if result.returncode != 0:
            raise ClusterError(f"openssl {' '.join(args)} failed:\n{result.stderr}")

    def cert(name: str, subject: str, extensions: str, *signer: str) -> None:
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key")
        openssl("req", "-x509", "-new", "-config", "openssl.cnf", "-days", "7", "-extensions", extensions,
                "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.crt", *signer)  # fmt: skip

    cert("ca", "/CN=syncplane-test-ca", "ca_ext")
    ca = ("-CA", "ca.crt", "-CAkey", "ca.key")
    cert("serving", "/CN=kube-apiserver", "serving_ext", *ca)
    cert("admin", "/O=system:masters/CN=admin", "client_ext", *ca)
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "sa.key")
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
    return {f.name: f for f in pki.iterdir()}


# Extensions of the certificates above (`-extensions <section>`).
OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[serving_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost, DNS:kubernetes, DNS:kubernetes.default, \
DNS:kubernetes.default.svc, DNS:kubernetes.default.svc.cluster.local, IP:10.0.0.1
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
"""


def _http_ok(hostport: str, path: str) -> bool:
    conn = http.client.HTTPConnection(hostport, timeout=2.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    finally:
        conn.close()


def _https_ok(port: int, path: str) -> bool:
    """GET on a component's self-signed secure port (only its liveness matters, not its identity)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=2.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    finally:
        conn.close()
