"""Plays the kubelet's container runtime for the workers' fake pods.

KWOK makes pods Running without running anything. `FakeKubelet` watches the
namespace's worker pods and, for each live one, starts the container its pod
spec describes as a local process — the same `syncplane worker` arguments,
with the spec file written from the pod's ConfigMap volume, POD_NAME/POD_UID
set as the downward API would, and loopback for its HTTP port. When a pod is
deleted (scale down, stop, Workflow deletion) the process gets SIGTERM, as a
container would, and drains. Nothing dials a pod.

Given an image `Runtime` (tests/image/buildah.py), the container runs from the built image instead of the
virtualenv, as the pod's user: `buildah run` in one working container of the image, the pod's /tmp and its
spec files mounted, its kubeconfig (certificates inlined) readable by that user only. The pods then run what a
real cluster would run. Not the default: each start costs a chroot and a second or two more on a loaded
2-core machine, and the tier's timings were tuned for the virtualenv.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.image.buildah import Container as ImageContainer
from tests.image.buildah import Runtime, chown_tree

log = logging.getLogger(__name__)
WORKER_SELECTOR = "syncplane.io/workflow"
SPEC_MOUNT = "/etc/syncplane/"
STOP_SECONDS = 30.0


@dataclass
class Container:
    pod: str
    proc: subprocess.Popen[bytes]
    log: Any
    image: ImageContainer | None = None   # run from the image: signals go to the process inside the chroot

    def signal(self, sig: signal.Signals) -> None:
        if self.image is not None:
            self.image.signal(sig)
        else:
            self.proc.send_signal(sig)


def project_secrets(pod_spec: Any, read_secret: Callable[[str], dict[str, str] | None], root: Path) -> dict[str, str]:
    """What the kubelet does for a pod's Secret volumes: each mounted directory gets a file per key with the
    volume's defaultMode (an optional Secret that does not exist: an empty directory). ``read_secret`` gives
    a Secret's base64 data, or None if it does not exist. Returns mount path -> local directory."""
    def field(obj: Any, *names: str) -> Any:
        for n in names:
            value = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
            if value is not None:
                return value
        return None

    volumes = {field(v, "name"): v for v in field(pod_spec, "volumes") or []}
    mounts: dict[str, str] = {}
    container = (field(pod_spec, "containers") or [])[0]
    for mount in field(container, "volume_mounts", "volumeMounts") or []:
        secret = field(volumes[field(mount, "name")], "secret")
        if secret is None:
            continue
        name = field(secret, "secret_name", "secretName")
        mode = field(secret, "default_mode", "defaultMode") or 0o644
        local = root / name
        local.mkdir(parents=True, exist_ok=True)
        for key, value in (read_secret(name) or {}).items():
            path = local / key
            path.write_bytes(base64.b64decode(value))
            path.chmod(mode)
        path = str(field(mount, "mount_path", "mountPath")).rstrip("/")
        mounts[path] = str(local)
        if path.endswith("/" + name):   # <dir>/<secret>: the worker is given <dir> (--secrets-dir)
            mounts.setdefault(path[: -len(name) - 1], str(root))
    return mounts


def map_mounts(args: list[str], mounts: dict[str, str]) -> list[str]:
    """Container arguments with paths under a projected mount rewritten to the local directory."""
    out = []
    for arg in args:
        for mount, local in mounts.items():
            if arg == mount or arg.startswith(mount + "/"):
                arg = local + arg[len(mount):]
        out.append(arg)
    return out


class FakeKubelet:
    def __init__(self, namespace: str, kubeconfig: Path, workdir: Path, interval: float = 0.2,
                 runtime: Runtime | None = None) -> None:
        self.namespace, self.kubeconfig, self.workdir, self.interval = namespace, kubeconfig, workdir, interval
        self.runtime = runtime
        self.containers: dict[str, Container] = {}
        self.hold_starts = False   # True: new pods wait (a node slow to start containers)
        self._task: asyncio.Task[None] | None = None
        self._api_client: Any = None

    async def __aenter__(self) -> FakeKubelet:
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        await config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
        self._api_client = client.ApiClient(configuration)
        self._core = client.CoreV1Api(self._api_client)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        await asyncio.gather(*(asyncio.to_thread(self._stop, c) for c in list(self.containers.values())))
        self.containers.clear()
        await self._api_client.close()

    async def pods(self, selector: str) -> list[Any]:
        return list((await self._core.list_namespaced_pod(self.namespace, label_selector=selector)).items)

    async def leases(self, selector: str) -> list[Any]:
        from kubernetes_asyncio import client

        api = client.CoordinationV1Api(self._api_client)
        return list((await api.list_namespaced_lease(self.namespace, label_selector=selector)).items)

    def running(self) -> list[str]:
        """The pods whose container (worker process) is alive."""
        return sorted(pod for pod, c in self.containers.items() if c.proc.poll() is None)

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an API hiccup: the next round sees the same pods again
                log.warning("fake kubelet: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(self.interval)

    async def sync(self) -> None:
        pods = await self._core.list_namespaced_pod(self.namespace, label_selector=WORKER_SELECTOR)
        live = {p.metadata.name: p for p in pods.items if p.metadata.deletion_timestamp is None}
        for name in [n for n in self.containers if n not in live]:
            container = self.containers.pop(name)
            await asyncio.to_thread(self._stop, container)
        for name, pod in live.items():
            if name not in self.containers and not self.hold_starts:
                self.containers[name] = await self._start(pod)

    async def _start(self, pod: Any) -> Container:
        name = pod.metadata.name
        spec = pod.spec.containers[0]
        volumes = {v.name: v for v in pod.spec.volumes or []}
        mounts = {m.mount_path.rstrip("/") + "/": volumes[m.name] for m in spec.volume_mounts or []}
        args = list(spec.args)
        for i, arg in enumerate(args):
            if arg.startswith(SPEC_MOUNT):
                cm_name = mounts[SPEC_MOUNT].config_map.name
                cm = await self._core.read_namespaced_config_map(cm_name, self.namespace)
                key = arg.removeprefix(SPEC_MOUNT)
                local = self.workdir / f"{name}-{key}"
                local.write_text(cm.data[key])
                args[i] = str(local)
            elif i > 0 and args[i - 1] == "--listen":
                args[i] = "127.0.0.1:0"   # the pod's port, on loopback
        secrets: dict[str, dict[str, str] | None] = {}
        for v in pod.spec.volumes or []:
            if v.secret is not None:
                try:
                    secrets[v.secret.secret_name] = (await self._core.read_namespaced_secret(
                        v.secret.secret_name, self.namespace)).data
                except Exception:   # absent: an optional Secret volume is an empty directory
                    secrets[v.secret.secret_name] = None
        args = map_mounts(args, project_secrets(pod.spec, secrets.get, self.workdir / f"{name}-secrets"))
        # The pod's own /tmp (an emptyDir in the Deployment): the worker's local state is never shared.
        tmp = self.workdir / f"{name}-tmp"
        tmp.mkdir(exist_ok=True)
        if self.runtime is not None:
            return self._run_image(pod, args, tmp)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "POD_NAME": name, "POD_UID": pod.metadata.uid,
               "TMPDIR": str(tmp)}
        return self._spawn(name, args, env)

    def _run_image(self, pod: Any, args: list[str], tmp: Path) -> Container:
        assert self.runtime is not None
        name = pod.metadata.name
        security = pod.spec.security_context
        uid, gid = security.run_as_user, security.run_as_group or security.run_as_user
        kubeconfig = self.workdir / f"{name}-kubeconfig"
        kubeconfig.write_text(json.dumps(inline_certificates(json.loads(self.kubeconfig.read_text()))))
        kubeconfig.chmod(0o600)
        chown_tree(tmp, uid, gid)
        os.chown(kubeconfig, uid, gid)
        # A real kubelet gives projected Secret files the pod's fsGroup (mode 0440), so the pod's user reads them.
        secrets = self.workdir / f"{name}-secrets"
        if secrets.exists():
            chown_tree(secrets, 0, security.fs_group or gid)
        env = {"KUBECONFIG": str(kubeconfig), "POD_NAME": name, "POD_UID": pod.metadata.uid, "TMPDIR": "/tmp"}
        log_path = self.workdir / f"{name}.log"
        started = self.runtime.start(args, log_path, volumes={self.workdir: str(self.workdir), tmp: "/tmp"},
                                     env=env, user=f"{uid}:{gid}")
        log.info("fake kubelet: started %s from %s: %s", name, self.runtime.image.ref, json.dumps(args))
        return Container(name, started.proc, started.out, image=started)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Container:
        out = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed in _stop)
        proc = subprocess.Popen([sys.executable, "-m", "syncplane", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        log.info("fake kubelet: started %s (pid %d): %s", name, proc.pid, json.dumps(args))
        return Container(name, proc, out)

    @staticmethod
    def _stop(container: Container) -> None:
        proc = container.proc
        if proc.poll() is None:
            container.signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                container.signal(signal.SIGKILL)   # a grace period ran out, as the kubelet would
                proc.kill()
                proc.wait()
        container.log.close()


def inline_certificates(kubeconfig: dict[str, Any]) -> dict[str, Any]:
    """The kubeconfig with its certificate and key files inlined as *-data (a pod sees no host path)."""
    files = {"certificate-authority", "client-certificate", "client-key"}
    for section, key in (("clusters", "cluster"), ("users", "user")):
        for entry in kubeconfig.get(section, []):
            body = entry[key]
            for field in files & body.keys():
                body[f"{field}-data"] = base64.b64encode(Path(body.pop(field)).read_bytes()).decode()
    return kubeconfig
