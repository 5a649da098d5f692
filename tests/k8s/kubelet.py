"""Plays the kubelet's container runtime for the workers' fake pods.

KWOK makes pods Running without running anything. `FakeKubelet` watches the
namespace's worker pods and, for each live one, starts the container its pod
spec describes as a local process — the same `syncplane worker` arguments,
with the spec file written from the pod's ConfigMap volume, POD_NAME/POD_UID
set as the downward API would, and loopback for its HTTP port. When a pod is
deleted (scale down, stop, Workflow deletion) the process gets SIGTERM, as a
container would, and drains. Nothing dials a pod.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
WORKER_SELECTOR = "syncplane.io/workflow"
SPEC_MOUNT = "/etc/syncplane/"
STOP_SECONDS = 30.0


@dataclass
class Container:
    pod: str
    proc: subprocess.Popen[bytes]
    log: Any


class FakeKubelet:
    def __init__(self, namespace: str, kubeconfig: Path, workdir: Path, interval: float = 0.2) -> None:
        self.namespace, self.kubeconfig, self.workdir, self.interval = namespace, kubeconfig, workdir, interval
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
        # The pod's own /tmp (an emptyDir in the Deployment): the worker's local state is never shared.
        tmp = self.workdir / f"{name}-tmp"
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "POD_NAME": name, "POD_UID": pod.metadata.uid,
               "TMPDIR": str(tmp)}
        return self._spawn(name, args, env)

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
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()   # a grace period ran out, as the kubelet would
                proc.wait()
        container.log.close()
