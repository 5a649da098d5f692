"""issue 17: the operator is driven by watch events (its resync set to 10 minutes here), and writes
exactly one Event per phase transition."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import yaml

from tests.k8s.cluster import free_ports
from tests.k8s.test_operator import (
    AVAILABLE,
    DEFAULTS,
    LocalWorker,
    create_workflow,
    get,
    operator_process,
    operator_reconciles,
    patch,
    wait,
)

pytestmark = pytest.mark.k8s


def _transitions(cluster: Any, namespace: str, name: str) -> Counter[str]:
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                                        f"involvedObject.name={name}", "-o", "json").stdout)["items"]
    return Counter(f"{e['reason']}: {e['message']}" for e in events for _ in range(int(e.get("count") or 1)))


def _renewals(cluster: Any, namespace: str, pod: str, times: int) -> None:
    """Until the worker's heartbeat Lease has been renewed ``times`` more times: each renewal is a watch
    event that wakes the Workflow's reconcile."""
    seen: list[str] = []

    def renewed() -> bool:
        lease = get(cluster, namespace, "lease", pod)
        if not seen or lease["spec"].get("renewTime") != seen[-1]:
            seen.append(lease["spec"].get("renewTime"))
        return len(seen) > times

    cluster.wait_until(f"{times} renewals of the heartbeat Lease {pod}", renewed, 60)


def _written_by_the_operator(cluster: Any, namespace: str, name: str) -> set[str]:
    """The fields of the Workflow, its status aside, owned (managedFields) by a manager that is not
    kubectl: what the operator wrote there, as ``metadata.finalizers``-style paths two levels deep."""
    body = json.loads(cluster.kubectl("get", "workflow", name, "-n", namespace, "-o", "json",
                                      "--show-managed-fields").stdout)
    return {f"{top[2:]}.{field[2:]}" for entry in body["metadata"]["managedFields"]
            if not entry["manager"].startswith("kubectl") and entry.get("subresource") != "status"
            for top, fields in entry["fieldsV1"].items() if top.startswith("f:")
            for field in fields if field.startswith("f:")}


@pytest.mark.operator_resync(600)
def test_lifecycle_from_watch_events_alone_with_one_event_per_transition(k8s_cluster, namespace, operator,
                                                                         tmp_path):
    name, target = create_workflow(k8s_cluster, namespace, tmp_path)
    # created STOPPED: its first status is the phase it starts in, no transition and no Event
    expected: Counter[str] = Counter()
    # never started: the operator wrote its status alone (no finalizer: that comes with its first workers)
    assert _written_by_the_operator(k8s_cluster, namespace, name) == set()
    # `kubectl get workflows` shows a backlog of 0 and no drift as 0 and false, not blanks
    row = k8s_cluster.kubectl("get", "workflow", name, "-n", namespace, "--no-headers").stdout.split()
    assert row[1:4] == ["INGRESS", "STOPPED", "STOPPED"] and row[-3:-1] == ["0", "false"], row  # DEGRADED: empty

    # A change that is no transition (a label) wakes a reconcile that writes nothing.
    k8s_cluster.kubectl("label", "workflow", name, "-n", namespace, "team=a")

    # start: STARTING, then RUNNING once the Deployment is Available and the worker's Lease says ready;
    # with a 10-minute resync only the watch events (Workflow, Deployment, pods, Lease) get it there.
    patch(k8s_cluster, namespace, name, {"desiredState": "RUNNING"})
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STARTING", timeout=60)
    wait(k8s_cluster, namespace, f"deployment/{name}-worker", AVAILABLE, timeout=60)
    worker = LocalWorker(k8s_cluster, namespace, name, tmp_path)
    try:
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=RUNNING", timeout=60)
        expected += Counter({"Starting: STOPPED -> STARTING": 1, "Running: STARTING -> RUNNING": 1})

        # edit while running: drift, no transition
        patch(k8s_cluster, namespace, name, {"batchSize": 250})
        wait(k8s_cluster, namespace, target, "jsonpath={.status.drift.detected}=true", timeout=60)
        _renewals(k8s_cluster, namespace, worker.pod, 2)
        # Of a started Workflow itself the operator writes its finalizer alone: no diff-base annotation (a
        # PATCH of every Workflow at its first sight and at each edit, a copy of its spec in every body).
        assert _written_by_the_operator(k8s_cluster, namespace, name) == {"metadata.finalizers"}

        # stop: STOPPING, then STOPPED once the worker is gone
        patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
        wait(k8s_cluster, namespace, f"deployment/{name}-worker", "jsonpath={.spec.replicas}=0", timeout=60)
        wait(k8s_cluster, namespace, f"pod/{worker.pod}", "delete", timeout=60)
    finally:
        worker.stop()
    wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=STOPPED", timeout=60)
    expected += Counter({"Stopping: RUNNING -> STOPPING": 1, "Stopped: STOPPING -> STOPPED": 1})

    # start again
    patch(k8s_cluster, namespace, name, {"desiredState": "RUNNING"})
    wait(k8s_cluster, namespace, f"deployment/{name}-worker", AVAILABLE, timeout=60)
    worker = LocalWorker(k8s_cluster, namespace, name, tmp_path)
    try:
        wait(k8s_cluster, namespace, target, "jsonpath={.status.phase}=RUNNING", timeout=60)
        expected += Counter({"Starting: STOPPED -> STARTING": 1, "Running: STARTING -> RUNNING": 1})
        # kopf posts Events from a queue: wait for them all, then let a few more heartbeats wake reconciles
        k8s_cluster.wait_until("the transitions' Events", lambda: _transitions(k8s_cluster, namespace, name).total()
                               >= expected.total(), 60)
        assert _transitions(k8s_cluster, namespace, name) == expected
        _renewals(k8s_cluster, namespace, worker.pod, 2)
        assert _transitions(k8s_cluster, namespace, name) == expected
    finally:
        patch(k8s_cluster, namespace, name, {"desiredState": "STOPPED"})
        worker.stop()


def test_an_operator_started_again_over_workflows_with_a_phase_writes_nothing(k8s_cluster, workflow_crd, namespace,
                                                                             monkeypatch, tmp_path):
    """issue 17, an operator's real cold start (an upgrade, a rescheduled pod): its Workflows have a phase
    already, so each reconcile is a no-op: no status PATCH, no Event, nothing written on the Workflow.
    Counted by the API server itself (apiserver_request_total): the test cluster serves this test alone."""
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    monkeypatch.setenv("SYNCPLANE_OPERATOR_RESYNC", "600")
    doc = yaml.safe_load((DEFAULTS / "10-contacts-ingress.yaml").read_text())
    names = [f"at-rest-{i}" for i in range(3)]
    docs = [{**doc, "metadata": {"name": name}} for name in names]
    with open(tmp_path / "operator.log", "wb") as log:
        first = operator_process(namespace, log)
        try:
            k8s_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
            for name in names:
                wait(k8s_cluster, namespace, f"workflow/{name}", "jsonpath={.status.phase}=STOPPED")
        finally:
            first.terminate()
            first.wait(timeout=60)
        statuses = {name: get(k8s_cluster, namespace, "workflow", name)["status"] for name in names}
        events = {name: _transitions(k8s_cluster, namespace, name) for name in names}
        before = k8s_cluster.requests_by_kind()
        port = free_ports(1)[0]
        second = operator_process(namespace, log, metrics_port=port)
        try:
            k8s_cluster.wait_until("a reconcile of each Workflow", lambda: operator_reconciles(port) >= len(names), 60)
            # A label wakes each one again: its second reconcile runs only once its first (and any write of
            # it) is over, so the counts below are complete.
            k8s_cluster.kubectl("label", "workflows", "--all", "-n", namespace, "restarted=yes")
            k8s_cluster.wait_until("a second reconcile of each Workflow",
                                   lambda: operator_reconciles(port) >= 2 * len(names), 60)
        finally:
            second.terminate()
            second.wait(timeout=60)
    after = k8s_cluster.requests_by_kind()
    kinds = (("PATCH", "workflows/status"), ("POST", "events"), ("PUT", "workflows/status"))
    made = {kind: after.get(kind, 0) - before.get(kind, 0) for kind in kinds}
    assert made == {("PATCH", "workflows/status"): 0, ("POST", "events"): 0, ("PUT", "workflows/status"): 0}
    assert {name: get(k8s_cluster, namespace, "workflow", name)["status"] for name in names} == statuses
    assert {name: _transitions(k8s_cluster, namespace, name) for name in names} == events == \
        {name: Counter() for name in names}
    for name in names:
        assert _written_by_the_operator(k8s_cluster, namespace, name) == set()
