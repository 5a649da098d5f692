"""A status that never hides a stall, on the Kubernetes backend: the operator (KopfRunner)
against the real API server, worker pods run by the fake kubelet as local processes syncing
the in-process sandbox over real HTTP. The same scenarios as tests/integration/test_status.py:

- a source answering 503 to everything, or refusing connections: RUNNING, Degraded with
  SOURCE_UNAVAILABLE (the Workflow's status.degradation and its Degraded condition); clears;
- a stall with a backlog: Degraded STALLED;
- a mapped field that does not exist: STARTING → ERROR FIELD_NOT_FOUND;
- a missing Secret created afterwards: automatic restarts, then RUNNING without a restart.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from syncplane_sandbox import Sandbox, SeedSpec
from tests.backends import eventually
from tests.integration.sandbox_fixtures import running_sandbox
from tests.k8s.kubelet import FakeKubelet
from tests.k8s.test_worker_data import apply_workflow, create_secrets, kubectl, set_desired, workflow
from tests.source_faults import SOURCE_FAULTS, break_source, heal_source

pytestmark = pytest.mark.k8s
POLL = 0.5
CONTACTS = 300


@pytest.fixture(autouse=True)
def fast_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds in seconds for the operator (before the `operator` fixture starts it)."""
    monkeypatch.setenv("SYNCPLANE_DEGRADED_AFTER", "2")
    monkeypatch.setenv("SYNCPLANE_RESTART_BACKOFF", "0.5")
    monkeypatch.setenv("SYNCPLANE_RESTART_BACKOFF_CAP", "2")


@pytest.fixture
async def sb() -> AsyncIterator[Sandbox]:
    async with running_sandbox(SeedSpec(contacts=CONTACTS, seed=11)) as sandbox:
        yield sandbox


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), {})


def counter(status: dict[str, Any], name: str) -> int:
    return int((status.get("counters") or {}).get(name) or 0)


async def status_until(cluster: Any, namespace: str, name: str, check: Callable[[dict[str, Any]], bool],
                       what: str, timeout: float = 180.0) -> dict[str, Any]:
    last: dict[str, Any] = {}

    async def ok() -> bool:
        nonlocal last
        last = (await workflow(cluster, namespace, name)).get("status") or {}
        return bool(check(last))

    await eventually(ok, lambda: f"{what}; last status: {json.dumps(last)[:3000]}", timeout, POLL)
    return last


async def ingress_with_secrets(cluster: Any, namespace: str, sb: Sandbox, tmp: Path) -> str:
    """The contacts ingress workflow on the sandbox, stopped, and the Secrets it references; returns its name."""
    await create_secrets(cluster, namespace, sb)
    return await apply_workflow(cluster, namespace, sb, tmp, "10-contacts-ingress.yaml")


async def running_and_loaded(cluster: Any, namespace: str, sb: Sandbox, tmp: Path, name: str) -> None:
    await set_desired(cluster, namespace, name, "RUNNING")
    await status_until(cluster, namespace, name, lambda s: s.get("phase") == "RUNNING"
                       and counter(s, "written") == CONTACTS and int(s.get("backlog") or 0) == 0,
                       f"the first load (worker logs in {tmp / 'containers'})")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("fault", SOURCE_FAULTS)
async def test_a_source_that_stops_answering_is_degraded_while_running(k8s_cluster, namespace, operator, tmp_path,
                                                                       sb, fault):
    name = await ingress_with_secrets(k8s_cluster, namespace, sb, tmp_path)
    async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers"):
        try:
            await running_and_loaded(k8s_cluster, namespace, sb, tmp_path, name)
            await break_source(sb, fault)  # everything, token endpoint included; or connections refused
            s = await status_until(k8s_cluster, namespace, name,
                                   lambda s: condition(s, "Degraded").get("status") == "True", "Degraded")
            assert s["phase"] == "RUNNING"
            assert condition(s, "Degraded")["reason"] == s["degradation"]["reason"] == "SOURCE_UNAVAILABLE"
            assert s["degradation"]["message"] and s["degradation"]["time"]
            table = await kubectl(k8s_cluster, "get", "workflow", name, "-n", namespace)
            assert "SOURCE_UNAVAILABLE" in table  # the Degraded printer column
            await status_until(k8s_cluster, namespace, name,
                               lambda s: float((s.get("counters") or {}).get("recordsPerSecond") or 0) == 0,
                               "records/s to fall to 0")
            await heal_source(sb, fault)
            s = await status_until(k8s_cluster, namespace, name,
                                   lambda s: condition(s, "Degraded").get("status") == "False"
                                   and counter(s, "written") > CONTACTS, "Degraded to clear")
            assert not s.get("degradation")
        finally:
            await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)


@pytest.mark.timeout(600)
async def test_a_backlog_with_nothing_written_is_stalled(k8s_cluster, namespace, operator, tmp_path, sb):
    name = await ingress_with_secrets(k8s_cluster, namespace, sb, tmp_path)
    async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers"):
        try:
            await running_and_loaded(k8s_cluster, namespace, sb, tmp_path, name)
            with sb.faults.acs.holding():  # every write held until the stall has been seen, whatever the speed
                contacts = sb.d365.table("contacts")
                for rid in list(contacts.rows)[:50]:
                    contacts.upsert(rid, lastname="Waiting")
                s = await status_until(k8s_cluster, namespace, name,
                                       lambda s: condition(s, "Degraded").get("status") == "True", "STALLED")
                assert s["phase"] == "RUNNING" and int(s["backlog"]) > 0
                assert s["degradation"]["reason"] == "STALLED"
            await status_until(k8s_cluster, namespace, name,
                               lambda s: condition(s, "Degraded").get("status") == "False"
                               and int(s.get("backlog") or 0) == 0, "the stall to clear")
        finally:
            await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)


@pytest.mark.timeout(600)
async def test_a_mapped_field_that_does_not_exist_fails_the_start(k8s_cluster, namespace, operator, tmp_path, sb):
    name = await ingress_with_secrets(k8s_cluster, namespace, sb, tmp_path)
    doc = await workflow(k8s_cluster, namespace, name)
    entities = doc["spec"]["ingress"]["entities"]
    entities[0]["fields"].append({"source": "new_nosuchfield", "destination": "middleName"})
    await kubectl(k8s_cluster, "patch", "workflow", name, "-n", namespace, "--type", "merge",
                  "-p", json.dumps({"spec": {"ingress": {"entities": entities}}}))
    async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers"):
        try:
            await set_desired(k8s_cluster, namespace, name, "RUNNING")
            phases: list[str] = []

            def failed(s: dict[str, Any]) -> bool:
                if s.get("phase") and (not phases or phases[-1] != s["phase"]):
                    phases.append(s["phase"])
                return s.get("phase") == "ERROR"

            s = await status_until(k8s_cluster, namespace, name, failed, "ERROR")
            assert "RUNNING" not in phases, phases
            assert s["lastError"]["reason"] == "FIELD_NOT_FOUND"
            assert "'contact'" in s["lastError"]["message"] and "'new_nosuchfield'" in s["lastError"]["message"]
            assert not s.get("autoRestart")
        finally:
            await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)


@pytest.mark.timeout(600)
async def test_a_secret_created_afterwards_recovers_without_a_restart(k8s_cluster, namespace, operator, tmp_path,
                                                                      sb):
    name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "10-contacts-ingress.yaml")
    generation = (await workflow(k8s_cluster, namespace, name))["metadata"]["generation"]
    async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers"):
        try:
            await set_desired(k8s_cluster, namespace, name, "RUNNING")
            s = await status_until(k8s_cluster, namespace, name,
                                   lambda s: s.get("phase") == "ERROR"
                                   and int((s.get("autoRestart") or {}).get("count") or 0) >= 1
                                   and bool((s.get("autoRestart") or {}).get("nextRestartTime")),
                                   "automatic restarts while the Secret is missing")
            assert s["lastError"]["reason"] == "BAD_CREDENTIALS" and "d365-sandbox" in s["lastError"]["message"]

            await create_secrets(k8s_cluster, namespace, sb)
            s = await status_until(k8s_cluster, namespace, name, lambda s: s.get("phase") == "RUNNING"
                                   and counter(s, "written") == CONTACTS, "recovery once the Secret exists")
            wf = await workflow(k8s_cluster, namespace, name)
            assert wf["metadata"]["generation"] == generation + 1  # only our desiredState patch: no restart
            assert not s.get("autoRestart")
        finally:
            await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)
