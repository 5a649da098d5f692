"""Checkpoints on Kubernetes: `ConfigMapCheckpoints` against the real test cluster's API
server, and the operator's `<workflow>-checkpoints` ConfigMap (owned by the Workflow).

Workers are played by local processes using the store, as the fake pods' containers would."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from syncplane.contract.names import checkpoint_configmap_name
from syncplane.state.kube_checkpoints import CheckpointError, ConfigMapCheckpoints, Retry, stream_key
from tests.k8s.test_chart import token_kubeconfig
from tests.k8s.test_operator import create_workflow, get, patch, start_until_available, wait

pytestmark = pytest.mark.k8s


@pytest.fixture
def kubeconfig(k8s_cluster, monkeypatch) -> Path:
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    return Path(k8s_cluster.kubeconfig)


def configmap(cluster: Any, namespace: str, workflow: str) -> dict[str, Any] | None:
    res = cluster.kubectl("get", "configmap", checkpoint_configmap_name(workflow), "-n", namespace, "-o", "json",
                          check=False)
    if res.returncode != 0:
        assert "NotFound" in res.stderr, res.stderr
        return None
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def in_a_process(cluster: Any, namespace: str, pod: str, code: str) -> str:
    """Run store code in a separate Python process (a pod's container): `store` and `wf` are bound."""
    script = ("import asyncio, sys\n"
              "from syncplane.state.kube_checkpoints import ConfigMapCheckpoints\n"
              "async def main(store, wf):\n"
              + "".join(f"    {line}\n" for line in code.splitlines())
              + "async def run():\n"
              f"    async with ConfigMapCheckpoints({namespace!r}) as store:\n"
              "        await main(store, sys.argv[1])\n"
              "asyncio.run(run())\n")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "POD_NAME": pod}
    res = subprocess.run([sys.executable, "-c", script, "contacts-ingress"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def worker_pods(cluster: Any, namespace: str, workflow: str) -> list[str]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", f"syncplane.io/workflow={workflow}",
                                      "-o", "json").stdout)["items"]
    return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]


async def test_commit_and_load_round_trip(k8s_cluster, namespace, kubeconfig):
    async with ConfigMapCheckpoints(namespace) as store:
        assert await store.aload("orders", "contact") is None       # no ConfigMap yet
        await store.acommit("orders", "contact", "https://crm.example/delta?token=1")
        await store.acommit("orders", "optinout:crm", "2024-01-01T00:00:00Z")  # not a valid key as is
        assert await store.aload("orders", "contact") == "https://crm.example/delta?token=1"
        await store.acommit("orders", "contact", "https://crm.example/delta?token=2")
        assert await store.aload("orders", "contact") == "https://crm.example/delta?token=2"
        assert await store.aload("orders", "optinout:crm") == "2024-01-01T00:00:00Z"
        assert await store.aload("orders", "account") is None
        assert await store.aload_all("orders") == {"contact": "https://crm.example/delta?token=2",
                                                   "optinout:crm": "2024-01-01T00:00:00Z"}
    cm = configmap(k8s_cluster, namespace, "orders")
    assert cm is not None
    assert cm["data"] == {"contact": "https://crm.example/delta?token=2",
                          stream_key("optinout:crm"): "2024-01-01T00:00:00Z"}
    # Created by a worker (the operator had not): labelled, without an owner.
    assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "syncplane",
                                        "app.kubernetes.io/component": "checkpoints",
                                        "syncplane.io/workflow": "orders"}
    assert "ownerReferences" not in cm["metadata"]


async def test_concurrent_committers_on_different_streams_both_survive(k8s_cluster, namespace, kubeconfig):
    """Two workers (two API clients), starting together on a missing ConfigMap: both race to
    create it, then interleave merge patches; neither overwrites the other's key."""
    rounds = 25

    async def committer(stream: str) -> None:
        async with ConfigMapCheckpoints(namespace) as store:
            for i in range(rounds):
                await store.acommit("shared", stream, f"{stream}-{i}")

    streams = ["contact", "account", "optinout:campaign"]
    await asyncio.gather(*(committer(s) for s in streams))
    async with ConfigMapCheckpoints(namespace) as store:
        assert await store.aload_all("shared") == {s: f"{s}-{rounds - 1}" for s in streams}


async def test_checkpoint_survives_the_worker_pod_and_a_stop(k8s_cluster, namespace, operator, tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)
    start_until_available(k8s_cluster, namespace, name)
    [pod] = worker_pods(k8s_cluster, namespace, name)
    in_a_process(k8s_cluster, namespace, pod, "await store.acommit(wf, 'contact', 'cursor-from-the-first-pod')")

    # The pod goes (node drained, evicted, …); its Deployment replaces it, and the new one resumes.
    k8s_cluster.kubectl("delete", "pod", pod, "-n", namespace, "--wait=true")
    k8s_cluster.wait_until("a replacement worker pod",
                           lambda: bool(set(worker_pods(k8s_cluster, namespace, name)) - {pod}))
    [replacement] = worker_pods(k8s_cluster, namespace, name)
    loaded = in_a_process(k8s_cluster, namespace, replacement, "print(await store.aload(wf, 'contact'))")
    assert loaded == "cursor-from-the-first-pod"

    # Stop, then start again: nobody deletes or empties it.
    patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")
    cm = configmap(k8s_cluster, namespace, name)
    assert cm is not None and cm["data"] == {"contact": "cursor-from-the-first-pod"}
    start_until_available(k8s_cluster, namespace, name)
    async with ConfigMapCheckpoints(namespace) as store:
        assert await store.aload(name, "contact") == "cursor-from-the-first-pod"
    patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED")


async def test_operator_creates_it_owned_by_the_workflow_and_deletion_removes_it(k8s_cluster, namespace, operator,
                                                                                 tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)
    assert configmap(k8s_cluster, namespace, name) is None      # created on start, not on apply
    start_until_available(k8s_cluster, namespace, name)
    cm = configmap(k8s_cluster, namespace, name)
    assert cm is not None and not cm.get("data")
    workflow = get(k8s_cluster, namespace, "workflow", name)
    [owner] = cm["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Workflow", name, workflow["metadata"]["uid"])
    assert owner["apiVersion"] == "syncplane.io/v1"
    labels = cm["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "syncplane" and labels["syncplane.io/workflow"] == name
    [pod] = worker_pods(k8s_cluster, namespace, name)
    in_a_process(k8s_cluster, namespace, pod, "await store.acommit(wf, 'contact', 'c1')")
    cm = configmap(k8s_cluster, namespace, name)
    assert cm is not None and cm["data"] == {"contact": "c1"}
    assert cm["metadata"]["ownerReferences"] == [owner]        # a commit leaves the owner alone

    k8s_cluster.kubectl("delete", "workflow", name, "-n", namespace, "--wait=false")
    wait(k8s_cluster, namespace, target, "delete")
    k8s_cluster.wait_until("the garbage collector to delete the checkpoints ConfigMap",
                           lambda: configmap(k8s_cluster, namespace, name) is None)


async def test_forbidden_and_missing_namespace_are_clear_errors(k8s_cluster, namespace, kubeconfig, tmp_path):
    from kubernetes_asyncio import client, config

    # A ServiceAccount without any Role: every call is refused.
    k8s_cluster.kubectl("create", "serviceaccount", "no-rights", "-n", namespace)
    path = token_kubeconfig(k8s_cluster, namespace, "no-rights", tmp_path / "no-rights.kubeconfig")
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        store = ConfigMapCheckpoints(namespace, api_client=api)
        with pytest.raises(CheckpointError) as exc:
            await store.acommit("wf", "contact", "c")
        assert "forbidden" in str(exc.value) and "configmaps" in str(exc.value) and namespace in str(exc.value)
        assert not exc.value.transient and exc.value.reason == "STATE_STORE_REJECTED"
        with pytest.raises(CheckpointError, match="forbidden"):
            await store.aload("wf", "contact")

    missing = f"gone-{uuid.uuid4().hex[:8]}"
    async with ConfigMapCheckpoints(missing) as store:
        with pytest.raises(CheckpointError) as exc:
            await store.acommit("wf", "contact", "c")
        assert f"namespace {missing!r} does not exist" in str(exc.value)


async def test_commit_retries_through_an_api_server_restart(k8s_cluster, namespace, kubeconfig, caplog):
    caplog.set_level(logging.WARNING, logger="syncplane.state.kube_checkpoints")
    async with ConfigMapCheckpoints(namespace, retry=Retry(attempts=60, base=0.1, cap=1.0)) as store:
        await store.acommit("wf", "contact", "before")
        restarted = threading.Event()
        failure: list[BaseException] = []

        def restart() -> None:
            try:
                k8s_cluster.restart("kube-apiserver")
            except BaseException as exc:  # reported below
                failure.append(exc)
            finally:
                restarted.set()

        def down() -> bool:
            try:
                k8s_cluster.api("GET", "/readyz", timeout=2)
            except TimeoutError:   # slow, not gone
                return False
            except OSError:        # refused or reset: the old API server is gone
                return True
            return restarted.is_set()

        thread = threading.Thread(target=restart)
        thread.start()
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not down():                  # the old API server is gone (or already back)
                assert loop.time() < deadline, "the API server never went down"
                await asyncio.sleep(0.05)
            await store.acommit("wf", "contact", "during")
        finally:
            await asyncio.to_thread(thread.join, 120)
        assert not failure, failure
        assert await store.aload("wf", "contact") == "during"
    assert any("retrying" in r.getMessage() for r in caplog.records), "the commit never had to retry"


class _CommitRunner:
    """A runner whose every pass commits a cursor (what a pipeline does after each page)."""

    writing = False

    def __init__(self, store: ConfigMapCheckpoints) -> None:
        self.store, self.passes = store, 0

    def links(self) -> dict[str, Any]:
        return {}

    async def prepare(self) -> None:
        pass

    async def run_once(self, stop: asyncio.Event) -> None:
        await self.store.acommit("wf", "contact", f"pass-{self.passes}")
        self.passes += 1

    async def classify(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def _engine() -> Any:
    from google.protobuf.duration_pb2 import Duration

    from syncplane.contract.report import WorkerReport
    from syncplane.proto.v1 import workflow_pb2 as pb
    from syncplane.worker.engine import Engine

    spec = pb.WorkflowSpec(poll_interval=Duration(nanos=100_000_000))
    return Engine("wf", spec, {}, None, WorkerReport("wf", 0, 1))  # type: ignore[arg-type]


async def test_an_api_server_outage_is_transient_and_the_engine_recovers(k8s_cluster, namespace, kubeconfig):
    """An outage longer than the store's own retries: the pass fails as STATE_STORE_UNAVAILABLE
    (the state_store link failing, so Degraded), the engine keeps retrying, and commits again
    once the API server is back; it never becomes a fatal error."""
    engine = _engine()
    stop = asyncio.Event()
    async with ConfigMapCheckpoints(namespace, retry=Retry(attempts=1)) as store:
        runner = _CommitRunner(store)
        engine.report.links = {"state_store": engine.state_link}
        loop_task = asyncio.create_task(engine._loop(stop, runner))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while runner.passes < 1:
                assert not loop_task.done(), loop_task
                assert loop.time() < deadline, "no pass committed"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(k8s_cluster.restart, "kube-apiserver")
            deadline = loop.time() + 120
            while (engine.report.last_error or {}).get("reason") != "STATE_STORE_UNAVAILABLE":
                assert not loop_task.done(), loop_task
                assert loop.time() < deadline, "the outage was never reported"
                await asyncio.sleep(0.05)
            assert "cannot commit the checkpoint of wf/contact" in engine.report.last_error["message"]
            failed_at = runner.passes
            deadline = loop.time() + 120
            while runner.passes <= failed_at or engine.state_link.failing_since is not None:
                assert not loop_task.done(), loop_task  # a FatalError would end the loop
                assert loop.time() < deadline, f"never recovered: {engine.report.last_error}"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.wait_for(loop_task, 30)
        assert await store.aload("wf", "contact") == f"pass-{runner.passes - 1}"


async def test_forbidden_state_store_is_fatal_with_the_rbac_hint(k8s_cluster, namespace, kubeconfig, tmp_path):
    """A 403 is not an outage: the engine stops with a fatal error whose message names what the
    ServiceAccount needs (not a bare type name)."""
    from kubernetes_asyncio import client, config

    from syncplane.worker.engine import FatalError

    k8s_cluster.kubectl("create", "serviceaccount", "no-state", "-n", namespace)
    path = token_kubeconfig(k8s_cluster, namespace, "no-state", tmp_path / "no-state.kubeconfig")
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(path), client_configuration=configuration)
    engine = _engine()
    async with client.ApiClient(configuration) as api:
        runner = _CommitRunner(ConfigMapCheckpoints(namespace, api_client=api))
        with pytest.raises(FatalError) as exc:
            await asyncio.wait_for(engine._loop(asyncio.Event(), runner), 60)
    assert exc.value.reason == "STATE_STORE_REJECTED"
    assert "forbidden" in str(exc.value) and "configmaps" in str(exc.value) and namespace in str(exc.value)


# The compare-and-set the split first load claims by (`ConfigMapCheckpoints.aswap`): another worker
# (a second API client) writes between the swap's read and its write, so the write carries a stale
# resourceVersion (or creates a ConfigMap that now exists): the API server answers 409 and the swap
# reads again. (before: the key's value, or None for no ConfigMap; between: what the other worker
# commits after the swap's first read, or None; expected: what the swap expects; won: its result;
# after: the data keys at the end.)
SWAP_RACES = [
    ("no race", {"contact": "a"}, None, "a", True, {"contact": "b"}),
    ("stale resourceVersion: the same key changed", {"contact": "a"}, ("contact", "theirs"), "a", False,
     {"contact": "theirs"}),
    ("stale resourceVersion: another key changed", {"contact": "a"}, ("account", "x"), "a", True,
     {"contact": "b", "account": "x"}),
    ("not what it holds", {"contact": "a"}, None, "other", False, {"contact": "a"}),
    ("404 creates", None, None, None, True, {"contact": "b"}),
    ("404 with a value expected", None, None, "a", False, None),
    ("404, then created by another worker with another key", None, ("account", "x"), None, True,
     {"contact": "b", "account": "x"}),
    ("404, then created by another worker with this key", None, ("contact", "theirs"), None, False,
     {"contact": "theirs"}),
]


@pytest.mark.parametrize(("case", "before", "between", "expected", "won", "after"), SWAP_RACES,
                         ids=[r[0] for r in SWAP_RACES])
async def test_aswap_against_a_racing_writer(k8s_cluster, namespace, kubeconfig, case, before, between, expected,
                                             won, after):
    wf = f"swap-{uuid.uuid4().hex[:8]}"
    async with ConfigMapCheckpoints(namespace) as store, ConfigMapCheckpoints(namespace) as other:
        for k, v in (before or {}).items():
            await other.acommit(wf, k, v)
        api = await store._api()
        real_read, reads = api.read_namespaced_config_map, []

        async def read_then_race(*args: Any, **kwargs: Any) -> Any:
            # The kubernetes client's read (a library call, not ours), then the other worker's write.
            try:
                return await real_read(*args, **kwargs)
            finally:
                reads.append(1)
                if len(reads) == 1 and between is not None:
                    await other.acommit(wf, *between)

        api.read_namespaced_config_map = read_then_race
        assert await store.aswap(wf, "contact", expected, "b") is won
        if between is not None:
            assert len(reads) == 2, "the 409 made the swap read again"
        cm = configmap(k8s_cluster, namespace, wf)
        if after is None:
            assert cm is None
        else:
            assert cm is not None and cm["data"] == after
            assert cm["metadata"]["labels"]["syncplane.io/workflow"] == wf
