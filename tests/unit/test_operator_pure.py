"""The operator's pure parts: builders, observation, CR conversion."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from syncplane.contract.report import WorkerReport
from syncplane.lifecycle import spec_hash
from syncplane.model.convert import spec_from_dict, spec_to_dict, to_resource
from syncplane.model.kube import status_patch, workflow_from_body
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.worker.platform.kubernetes import lease_body
from syncplane_operator.builders import build_spec_configmap, build_worker_deployment
from syncplane_operator.observe import observe
from syncplane_operator.reconciler import Transition, applied_view_resource, draining, transition
from tests.factories import workflow

NOW = datetime(2026, 11, 28, 12, tzinfo=UTC)


def test_configmap_is_immutable_and_named_by_hash_and_the_generation_of_its_run():
    cm = build_spec_configmap("wf", "ns", {"batchSize": 5}, "abcdef0123456789", 3)
    assert cm["immutable"] is True
    assert cm["metadata"]["name"] == "wf-spec-abcdef0123-3"
    assert json.loads(cm["data"]["spec.json"]) == {"batchSize": 5}


def test_worker_deployment_is_locked_down():
    d = build_worker_deployment("wf", "ns", "abcdef0123456789", 4, 2)
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert d["spec"]["replicas"] == 2 and d["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"]
    assert c["securityContext"] == {"runAsNonRoot": True, "readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert "--generation" in c["args"] and c["args"][c["args"].index("--generation") + 1] == "4"
    assert pod["volumes"][0]["configMap"]["name"] == "wf-spec-abcdef0123-4"
    assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert "secretkeyref" not in json.dumps(c).lower()   # no credential in the environment
    assert "--workflow-uid" not in c["args"]   # no uid known: nothing passed


def test_the_referenced_secrets_are_mounted_not_read():
    """Issue 13 item 2: the kubelet mounts the workflow's Secrets (read-only, 0440, optional so that a
    missing one is the worker's BAD_CREDENTIALS report); the worker's identity needs no Secret access."""
    d = build_worker_deployment("wf", "ns", "h", 1, 1, secrets=["d365-creds", "acs-creds"])
    pod = d["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"] if "secret" in volumes[m["name"]]}
    assert {path: v["secret"] for path, v in mounted.items()} == {
        "/etc/syncplane-secrets/d365-creds": {"secretName": "d365-creds", "optional": True, "defaultMode": 0o440},
        "/etc/syncplane-secrets/acs-creds": {"secretName": "acs-creds", "optional": True, "defaultMode": 0o440}}
    assert all(m["readOnly"] for m in c["volumeMounts"] if m["mountPath"].startswith("/etc/syncplane-secrets/"))
    assert c["args"][c["args"].index("--secrets-dir") + 1] == "/etc/syncplane-secrets"
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


def test_worker_deployment_passes_the_workflows_uid_on():
    (c,) = build_worker_deployment("wf", "ns", "h", 1, 1, uid="1234-abcd")["spec"]["template"]["spec"]["containers"]
    assert c["args"][c["args"].index("--workflow-uid") + 1] == "1234-abcd"


def lease(ready: bool, generation: int, age: float = 1.0, fatal: dict | None = None) -> dict:
    report = WorkerReport(workflow="wf", index=0, generation=generation, ready=ready, backlog=5)
    report.fatal = fatal
    return lease_body("wf-pod", "wf", report, NOW - timedelta(seconds=age))


def deployment(available: int, replicas: int = 1, conditions: list | None = None) -> dict:
    return {"spec": {"replicas": replicas},
            "status": {"replicas": replicas, "availableReplicas": available, "conditions": conditions or []}}


def test_ready_needs_available_pods_and_heartbeats():
    assert observe(deployment(1), [{}], [], 2, NOW).ready == 0
    assert observe(deployment(0), [{}], [lease(True, 2)], 2, NOW).ready == 0
    obs = observe(deployment(1), [{}], [lease(True, 2)], 2, NOW)
    assert (obs.ready, obs.live, obs.backlog) == (1, 1, 5)
    assert observe(deployment(1), [{}], [lease(True, 1)], 2, NOW).ready == 0  # old generation


def test_failures():
    stalled = deployment(0, conditions=[{"type": "Progressing", "status": "False",
                                         "reason": "ProgressDeadlineExceeded", "message": "timed out"}])
    assert observe(stalled, [], [], 1, NOW).failure.reason == "ROLLOUT_STALLED"  # type: ignore[union-attr]
    rejected = deployment(0, conditions=[{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                                          "message": 'serviceaccount "syncplane-worker" not found'}])
    assert observe(rejected, [], [], 1, NOW).failure.reason == "WORKER_PODS_REJECTED"  # type: ignore[union-attr]
    pod = {"metadata": {"name": "p"}, "status": {"containerStatuses": [
        {"restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}}
    assert observe(deployment(0), [pod], [], 1, NOW).failure.reason == "CRASH_LOOP"  # type: ignore[union-attr]
    bad = lease(False, 1, fatal={"reason": "BAD_CREDENTIALS", "message": "401 from the token endpoint"})
    assert observe(deployment(1), [{}], [bad], 1, NOW).failure.reason == "BAD_CREDENTIALS"  # type: ignore[union-attr]
    stale = observe(deployment(1), [{}], [lease(True, 1, age=120)], 1, NOW)
    assert stale.failure is not None and stale.failure.reason == "HEARTBEAT_STALE" and stale.ready == 0


def test_cr_round_trip_and_status_patch():
    wf = workflow()
    wf.status.applied_spec_hash = spec_hash(wf.spec)
    body = to_resource(wf)
    body["metadata"].update({"resourceVersion": "77", "generation": 4})
    back = workflow_from_body(body)
    assert back.spec == wf.spec and back.generation == 4
    assert back.etag.startswith("4-")
    body["metadata"]["resourceVersion"] = "78"
    assert workflow_from_body(body).etag == back.etag, "status writes do not change the etag"
    body["metadata"]["labels"] = {"team": "crm"}
    assert workflow_from_body(body).etag != back.etag
    assert back.status.applied_spec_hash == wf.status.applied_spec_hash
    new = pb.WorkflowStatus()
    new.CopyFrom(back.status)
    new.phase = pb.PHASE_RUNNING
    printed = {"backlog": 0, "drift": {"detected": False}}   # the printer columns' values, always written
    patch = status_patch({**body["status"], **printed}, new)
    assert patch == {"phase": "RUNNING"}
    assert status_patch({"phase": "STOPPED", "backlog": 3, "drift": {"detected": False}},
                        pb.WorkflowStatus(phase=pb.PHASE_STOPPED)) == {"backlog": 0}


def test_a_heartbeat_carries_failing_links_and_waiting_records_to_the_decision():
    """What the Lease annotation says of the links and the backlog reaches lifecycle.Observed, so the
    operator derives Degraded as the embedded supervisor does."""
    from syncplane.connectors.http import LinkHealth

    report = WorkerReport(workflow="wf", index=0, generation=2, ready=True, backlog=7)
    health = LinkHealth()
    health.failed("GET /contacts: HTTP 429", 429)
    report.links = {"source": LinkHealth(), "destination": health}
    report.waiting_since = 1234.0
    obs = observe(deployment(1), [{}], [lease_body("wf-pod", "wf", report, NOW)], 2, NOW)
    assert obs.trouble is not None and obs.trouble.reason == "DESTINATION_THROTTLED"
    assert obs.waiting_since == 1234.0


def test_the_operator_reads_its_status_thresholds_from_the_environment(monkeypatch):
    from syncplane_operator.handlers import policy_from_environment

    monkeypatch.setenv("SYNCPLANE_DEGRADED_AFTER", "7")
    monkeypatch.setenv("SYNCPLANE_RESTART_BACKOFF_CAP", "42")
    policy = policy_from_environment()
    assert (policy.degraded_after, policy.restart_backoff, policy.restart_backoff_cap) == (7.0, 5.0, 42.0)


def test_status_patch_clears_a_nested_field_back_to_zero():
    """records/s back to 0 (omitted by proto JSON) must be written as null inside counters: a merge
    patch keeps whatever a nested object does not mention."""
    status = pb.WorkflowStatus(phase=pb.PHASE_RUNNING)
    status.counters.read = 3
    old = {"phase": "PHASE_RUNNING", "counters": {"read": 3, "recordsPerSecond": 120.5},
           "degradation": {"reason": "STALLED"}}
    patch = status_patch(old, status)
    assert patch["counters"] == {"recordsPerSecond": None}
    assert patch["degradation"] is None


# -- errors that must reach the status or the log, not vanish -------------------------------------

def test_a_worker_that_exits_fatal_says_why_through_its_termination_message():
    """A worker whose heartbeat Lease is refused cannot report; its termination message can."""
    from syncplane.contract.names import EXIT_FATAL

    message = "HEARTBEAT_REJECTED: cannot write heartbeat Lease ns/wf-0: HTTP 403 Forbidden"
    for where in ("state", "lastState"):
        pod = {"metadata": {"name": "wf-0"},
               "status": {"containerStatuses": [{"restartCount": 1, where: {"terminated": {
                   "exitCode": EXIT_FATAL, "message": message}}}]}}
        failure = observe(None, [pod], [], 1, datetime.now(UTC)).failure
        assert failure is not None and failure.reason == "HEARTBEAT_REJECTED"
        assert failure.message == message.partition(": ")[2]
    ordinary = {"metadata": {"name": "wf-0"}, "status": {"containerStatuses": [
        {"restartCount": 1, "lastState": {"terminated": {"exitCode": 137, "message": "OOMKilled"}}}]}}
    assert observe(None, [ordinary], [], 1, datetime.now(UTC)).failure is None


async def test_operator_cleanup_after_a_startup_that_failed_part_way():
    import kopf

    from syncplane_operator.handlers import close

    await close(memo=kopf.Memo())  # type: ignore[call-arg,misc]  # startup failed before making the API client


async def test_reconcile_of_a_body_without_a_namespace_is_a_permanent_error():
    import logging

    import kopf

    from syncplane_operator.reconciler import reconcile

    with pytest.raises(kopf.PermanentError, match="without a name or namespace"):
        await reconcile(kopf.Body({"metadata": {"name": "wf"}}), logging.getLogger(),
                        None, None, [], [], [])  # type: ignore[arg-type]


@pytest.mark.parametrize("start", [{"traceParent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
                                   {"traceParent": ""}, {}])
def test_the_applied_snapshot_keeps_the_runs_trace_context_and_no_other_lifecycle_field(start):
    """issue 17 item 5: the workers read their trace context from the snapshot (the ConfigMap's spec.json)."""
    spec = spec_from_dict({**spec_to_dict(workflow().spec), "desiredState": "RUNNING", "restartNonce": 3,
                           **start})
    snapshot = applied_view_resource(spec)
    assert "desiredState" not in snapshot and "restartNonce" not in snapshot
    assert snapshot.get("traceParent", "") == start.get("traceParent", "")
    assert spec_from_dict(snapshot).trace_parent == spec.trace_parent


@pytest.mark.parametrize(("status", "holds_up"), [
    ({"phase": "Pending"}, True),
    ({"phase": "Running"}, True),
    ({"phase": "Unknown"}, True),      # a lost node: it may still be running
    ({}, True),                        # no status yet
    ({"phase": "Succeeded"}, False),
    ({"phase": "Failed", "reason": "Evicted"}, False),   # never deleted by scaling to 0
    ({"phase": "Failed", "reason": "Terminated"}, False),  # a node's graceful shutdown
])
def test_only_a_worker_pod_that_may_still_run_holds_up_its_workflows_deletion(status: dict[str, str],
                                                                               holds_up: bool) -> None:
    assert draining({"metadata": {"name": "w"}, "status": status}) is holds_up


ERR = pb.WorkflowError(reason="AUTH_FAILED", message="401 from the token endpoint")


@pytest.mark.parametrize(("before", "after", "event"), [
    # no status yet: the Workflow is STOPPED (it has no workers); its first status STOPPED is no transition
    (pb.PHASE_UNSPECIFIED, pb.WorkflowStatus(phase=pb.PHASE_STOPPED), None),
    (pb.PHASE_UNSPECIFIED, pb.WorkflowStatus(phase=pb.PHASE_STARTING),
     Transition("Normal", "Starting", "STOPPED -> STARTING")),
    (pb.PHASE_UNSPECIFIED, pb.WorkflowStatus(phase=pb.PHASE_ERROR, last_error=ERR),
     Transition("Warning", "Error", "STOPPED -> ERROR: AUTH_FAILED: 401 from the token endpoint")),
    (pb.PHASE_STOPPED, pb.WorkflowStatus(phase=pb.PHASE_STOPPED), None),
    (pb.PHASE_RUNNING, pb.WorkflowStatus(phase=pb.PHASE_RUNNING), None),
    (pb.PHASE_ERROR, pb.WorkflowStatus(phase=pb.PHASE_ERROR, last_error=ERR), None),
    (pb.PHASE_STOPPED, pb.WorkflowStatus(phase=pb.PHASE_STARTING), Transition("Normal", "Starting",
                                                                            "STOPPED -> STARTING")),
    (pb.PHASE_RUNNING, pb.WorkflowStatus(phase=pb.PHASE_STOPPING), Transition("Normal", "Stopping",
                                                                            "RUNNING -> STOPPING")),
    (pb.PHASE_STOPPING, pb.WorkflowStatus(phase=pb.PHASE_STOPPED), Transition("Normal", "Stopped",
                                                                            "STOPPING -> STOPPED")),
    (pb.PHASE_RUNNING, pb.WorkflowStatus(phase=pb.PHASE_ERROR, last_error=ERR),
     Transition("Warning", "Error", "RUNNING -> ERROR: AUTH_FAILED: 401 from the token endpoint")),
])
def test_an_event_for_each_phase_change_and_none_for_a_workflows_first_status_stopped(before, after, event):
    """issue 17: one Event per transition; a Workflow created STOPPED starts STOPPED, which is no change
    (a cold start over 1,000 of them wrote 1,000 "created: STOPPED" Events)."""
    assert transition(before, after) == event


def _children() -> dict[str, dict]:
    from syncplane_operator.builders import build_checkpoint_configmap, build_worker_identity

    account, binding, role, own_binding = build_worker_identity("wf", "ns", "syncplane-worker")
    return {"ServiceAccount": account, "RoleBinding": binding, "Role": role, "own RoleBinding": own_binding,
            "ConfigMap": build_checkpoint_configmap("wf", "ns"),
            "Deployment": build_worker_deployment("wf", "ns", "abcdef0123456789", 4, 1, secrets=["a", "b"])}


def _as_stored(body: dict) -> dict:
    """``body`` as the API server gives it back: defaults filled in, bookkeeping added."""
    stored = json.loads(json.dumps(body))
    stored["metadata"].update(uid="u-1", resourceVersion="7", creationTimestamp="2026-11-30T10:00:00Z")
    stored["metadata"].setdefault("annotations", {})["deployment.kubernetes.io/revision"] = "1"
    stored["metadata"].setdefault("labels", {})["someone-else"] = "theirs"
    if stored["kind"] == "Deployment":
        spec = stored["spec"]
        spec.update(revisionHistoryLimit=10)
        pod = spec["template"]["spec"]
        pod.update(restartPolicy="Always", dnsPolicy="ClusterFirst", schedulerName="default-scheduler")
        (c,) = pod["containers"]
        c.update(terminationMessagePath="/dev/termination-log", terminationMessagePolicy="File")
        c["ports"][0]["protocol"] = "TCP"
        c["env"][0]["valueFrom"]["fieldRef"]["apiVersion"] = "v1"
        c["readinessProbe"].update(successThreshold=1, failureThreshold=3)
        c["readinessProbe"]["httpGet"]["scheme"] = "HTTP"
        pod["volumes"][0]["configMap"]["defaultMode"] = 420
    return stored


def _drop_last_name(body: dict) -> None:
    body["rules"][0]["resourceNames"] = body["rules"][0]["resourceNames"][:-1]


def _other_role(body: dict) -> None:
    body["roleRef"]["name"] = "another-role"


def _other_subject(body: dict) -> None:
    body["subjects"][0]["name"] = "someone"


def _lost_label(body: dict) -> None:
    del body["metadata"]["labels"]["syncplane.io/workflow"]


def _other_image(body: dict) -> None:
    body["spec"]["template"]["spec"]["containers"][0]["image"] = "elsewhere/other:1"


def _a_mount_less(body: dict) -> None:
    pod = body["spec"]["template"]["spec"]
    pod["volumes"].pop()
    pod["containers"][0]["volumeMounts"].pop()


def _other_account(body: dict) -> None:
    body["spec"]["template"]["spec"]["serviceAccountName"] = "default"


def _scaled(body: dict) -> None:
    body["spec"]["replicas"] = 3


@pytest.mark.parametrize(("child", "change", "patched"), [
    ("Role", _drop_last_name, {"rules"}),
    ("RoleBinding", _other_role, {"roleRef"}),
    ("own RoleBinding", _other_subject, {"subjects"}),
    ("ServiceAccount", _lost_label, {"metadata"}),
    ("ConfigMap", _lost_label, {"metadata"}),
    ("Deployment", _other_image, {"spec"}),
    ("Deployment", _a_mount_less, {"spec"}),
    ("Deployment", _other_account, {"spec"}),
    ("Deployment", _scaled, {"spec"}),
    ("Deployment", _lost_label, {"metadata"}),
])
def test_a_child_that_differs_from_its_builder_is_patched_back_and_one_that_holds_it_is_not(child, change, patched):
    """issue s7-bugs 1: a child the operator made once (Role, RoleBindings, ServiceAccount, checkpoints
    ConfigMap, worker Deployment) converges to the builder's output: what the API server defaulted in or
    someone else added is no difference; any field of the builder's that differs is."""
    from syncplane_operator.builders import unconverged

    want = _children()[child]
    stored = _as_stored(want)
    assert unconverged(want, stored) == {}          # as created, with the server's defaults: nothing to write
    change(stored)
    patch = unconverged(want, stored)
    assert set(patch) == patched
    for key in patched - {"metadata"}:
        assert patch[key] == want[key]              # a merge patch of the builder's whole field
    if "metadata" in patch:
        assert patch["metadata"] == {"labels": {"syncplane.io/workflow": "wf"}}   # theirs kept, not removed


def test_the_whole_name_list_of_an_old_role_is_written_back():
    from syncplane.contract.names import worker_configmap_names
    from syncplane_operator.builders import unconverged

    role = _children()["Role"]
    old = _as_stored(role)
    old["rules"][0]["resourceNames"] = ["wf-checkpoints"]   # an operator before the shards
    assert unconverged(role, old)["rules"][0]["resourceNames"] == worker_configmap_names("wf")


def _mutated(body: dict) -> None:
    """What a mutating admission policy does to every write of it (e.g. imagePullPolicy: Always)."""
    body["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Always"


def _generation(n: int) -> Callable[[dict], None]:
    def set_generation(body: dict) -> None:
        body["metadata"]["generation"] = n
    return set_generation


@pytest.mark.parametrize(("case", "written", "changes", "new_want", "replaced"), [
    ("holds the builder's output", None, [], False, False),
    ("differs, nothing written by this process yet (an operator restart)", None, [_mutated], False, True),
    ("differs after our own write: admission mutated it", "same", [_mutated, _generation(5)], False, False),
    ("a stale view of our own write (the watch behind)", "same", [_mutated, _generation(4)], False, False),
    ("edited by hand after our write (generation moved)", "same", [_other_image, _generation(6)], False, True),
    ("the builder's output changed since (new spec, scale)", "same", [_mutated, _generation(5)], True, True),
])
def test_the_worker_deployment_is_replaced_only_for_a_difference_our_write_did_not_leave(
        case, written, changes, new_want, replaced):
    """Review of 629c010: under a mutating admission policy (reproduced: imagePullPolicy Always) the stored
    Deployment never equals the builder's output, and replacing it on each difference wrote it ~10 times a
    second, forever. A difference is acted on once: when ``want`` changed since this process wrote it, or
    someone changed the Deployment after (its generation moved past the one our write left)."""
    from syncplane_operator.builders import built_digest, deployment_to_replace

    want = _children()["Deployment"]
    have = _as_stored(want)
    have["metadata"]["generation"] = 5
    for change in changes:
        change(have)
    record = None if written is None else (built_digest(want), 5)
    if new_want:
        want = build_worker_deployment("wf", "ns", "0123456789abcdef", 5, 1, secrets=["a", "b"])
    assert deployment_to_replace(want, have, record) is replaced, case
