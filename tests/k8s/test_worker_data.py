"""Workers on Kubernetes with data: checkpoints and held records live in cluster objects, so they
survive pod deletion.

The operator (KopfRunner) reconciles an ingress Workflow whose endpoints are the in-process
sandbox; the fake kubelet runs the worker pod's container as a local process that syncs real
records (credentials from Secrets, cursors in `<workflow>-checkpoints`). Deleting the pod mid-load
makes the ReplicaSet create another one, whose worker must resume from the ConfigMap's cursor.

The sandbox shares this event loop, so every kubectl call runs in a thread. Checks are on the
sandbox's request log and destination rows (counted by key), and on the Workflow's status."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncplane.contract.names import HELD, checkpoint_configmap_name, record_shard
from syncplane.model.kube import merged
from syncplane.optinout.sync import CAMPAIGN_STREAM, CRM_STREAM
from syncplane.state.kube_checkpoints import stream_key
from syncplane.state.kube_records import records_of
from syncplane_sandbox import Sandbox, SeedSpec
from tests.backends import eventually
from tests.factories import literals
from tests.integration.ingress_env import (
    actual_profiles,
    diff,
    expected_profiles,
    profile_key_count,
    profiles_match,
)
from tests.integration.optinout_env import create_profiles
from tests.integration.sandbox_fixtures import running_sandbox
from tests.k8s.kubelet import Container, FakeKubelet
from tests.k8s.test_operator import DEFAULTS

pytestmark = pytest.mark.k8s
CONTACTS = 30_000
WRITTEN_BEFORE_DELETE = 3_000
STREAM = "contact"
POLL = 0.5  # seconds between checks: kubectl runs in threads, the sandbox on this event loop


async def kubectl(cluster: Any, *args: str, check: bool = True) -> str:
    res = await asyncio.to_thread(cluster.kubectl, *args, check=check)
    return str(res.stdout)


async def workflow(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(await kubectl(cluster, "get", "workflow", name, "-n", namespace, "-o", "json"))
    return doc


async def checkpoints(cluster: Any, namespace: str, workflow_name: str) -> dict[str, str]:
    """The `<workflow>-checkpoints` ConfigMap's data (ConfigMap key -> cursor); empty if there is none."""
    out = await kubectl(cluster, "get", "configmap", checkpoint_configmap_name(workflow_name), "-n", namespace,
                        "-o", "json", check=False)
    data: dict[str, str] = (json.loads(out).get("data") or {}) if out else {}
    return data


async def checkpoint(cluster: Any, namespace: str, workflow_name: str) -> dict[str, Any] | None:
    """The committed checkpoint of the contact stream, or None (no ConfigMap or no key yet)."""
    value = (await checkpoints(cluster, namespace, workflow_name)).get(stream_key(STREAM))
    if value is None:
        return None
    doc: dict[str, Any] = json.loads(value)
    return doc


async def configmaps(cluster: Any, namespace: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(await kubectl(cluster, "get", "configmaps", "-n", namespace, "-l",
                                                           selector, "-o", "json"))["items"]
    return items


async def records(cluster: Any, namespace: str, selector: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(shard ConfigMap, record) of every dead letter, held record or repair the selector's shards hold."""
    return [(cm, doc) for cm in await configmaps(cluster, namespace, selector)
            for _, doc, _ in records_of(cm.get("data") or {})]


async def set_desired(cluster: Any, namespace: str, name: str, state: str, check: bool = True) -> None:
    await kubectl(cluster, "patch", "workflow", name, "-n", namespace, "--type", "merge",
                  "-p", json.dumps({"spec": {"desiredState": state}}), check=check)


async def create_secrets(cluster: Any, namespace: str, sb: Sandbox) -> None:
    """What the user creates: the referenced Secrets (the operator makes each workflow's ServiceAccount)."""
    for name, data in sb.secrets().items():
        await kubectl(cluster, "create", "secret", "generic", name, "-n", namespace, *literals(data))


@asynccontextmanager
async def sandbox_with_secrets(cluster: Any, namespace: str, seed: SeedSpec) -> AsyncIterator[Sandbox]:
    """A running sandbox seeded with ``seed``, its client Secrets created in ``namespace`` (what the user
    creates); the sandbox is stopped on the way out."""
    async with running_sandbox(seed) as sb:
        await create_secrets(cluster, namespace, sb)
        yield sb


async def apply_workflow(cluster: Any, namespace: str, sb: Sandbox, tmp: Path, default: str, **spec: Any) -> str:
    """A default workflow, its endpoints on the sandbox, polling every second; stopped. ``spec`` is
    merged into the default's spec as a JSON merge patch (RFC 7386: nested objects merge key by
    key, so ``destination={"maxConcurrency": 2}`` keeps the destination's other fields)."""
    doc = yaml.safe_load((DEFAULTS / default).read_text())
    for side in ("source", "destination"):
        conn = doc["spec"][side]
        conn["endpoint"] = sb.d365_url if conn["kind"] == "DYNAMICS365" else sb.acs_url
    doc["spec"] = merged(doc["spec"], {"pollInterval": "1s", "desiredState": "STOPPED", **spec})
    path = tmp / "wf.yaml"
    path.write_text(yaml.safe_dump(doc))
    await kubectl(cluster, "apply", "-n", namespace, "-f", str(path))
    name: str = doc["metadata"]["name"]
    await kubectl(cluster, "wait", "--for=jsonpath={.status.phase}=STOPPED", f"workflow/{name}", "-n", namespace,
                  "--timeout=90s")
    return name


def token(url: str) -> str | None:
    """The $skiptoken or $deltatoken of a Dataverse URL (or path + query), decoded."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    for key in ("$skiptoken", "$deltatoken"):
        if key in query:
            return query[key][0]
    return None


@pytest.mark.timeout(900)
async def test_checkpoints_survive_pod_deletion(k8s_cluster, namespace, operator, tmp_path):
    async with sandbox_with_secrets(k8s_cluster, namespace, SeedSpec(contacts=CONTACTS, seed=13)) as sb:
        name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "10-contacts-ingress.yaml",
                                    batchSize=500, workers=1)
        selector = f"syncplane.io/workflow={name}"
        async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers") as kubelet:
            try:
                await set_desired(k8s_cluster, namespace, name, "RUNNING")

                # 1. the first pod's worker syncs real records and commits a cursor to the ConfigMap
                cursor: dict[str, Any] | None = None

                async def loading() -> bool:
                    nonlocal cursor
                    if len(sb.acs.profiles.rows) < WRITTEN_BEFORE_DELETE:
                        return False
                    cursor = await checkpoint(k8s_cluster, namespace, name)
                    return bool(cursor and cursor.get("cursor"))

                await eventually(loading, lambda: f"{WRITTEN_BEFORE_DELETE} profiles and a committed cursor "
                                 f"({len(sb.acs.profiles.rows)} profiles; worker logs in {tmp_path / 'containers'})",
                                 300, POLL)
                # Campaign holds every write until the pod is told to stop: the load is mid-way
                # when it is deleted, whatever the machine's speed.
                with sb.faults.acs.holding():  # released at the block's end: the writes in flight end, it drains
                    running = kubelet.running()
                    assert len(running) == 1, running
                    old_pod = running[0]
                    old: Container = kubelet.containers[old_pod]
                    assert len(sb.acs.profiles.rows) < CONTACTS, "the load finished before the pod could be deleted"

                    # 2. delete the pod: its container drains and exits; the ReplicaSet makes a new pod, whose
                    # container waits until the old pod's last commit has been read here
                    kubelet.hold_starts = True
                    await kubectl(k8s_cluster, "delete", "pod", old_pod, "-n", namespace, "--wait=false")

                    async def stopping() -> bool:
                        return old_pod not in kubelet.containers  # the fake kubelet sends it SIGTERM

                    await eventually(stopping, "the fake kubelet to stop the deleted pod's container", 90,
                                     interval=0.1)
                code = await asyncio.to_thread(old.proc.wait, 90)
                assert code == 0, f"the deleted pod's worker exited with {code}"
                seq = max((r.seq for r in sb.requests.records()), default=0)
                written_before = len(sb.acs.profiles.rows)
                assert written_before < CONTACTS, "the load finished before the deleted pod's worker stopped"
                committed = await checkpoint(k8s_cluster, namespace, name)
                assert committed is not None and committed.get("cursor"), committed
                resume_from = token(str(committed["cursor"]))
                assert resume_from and "$skiptoken=" in str(committed["cursor"]), \
                    f"no mid-load cursor was committed: {committed}"
                assert "drained and stopped" in (tmp_path / "containers" / f"{old_pod}.log").read_text()
                kubelet.hold_starts = False   # every request from here on comes from the new pod's worker

                async def replaced() -> bool:
                    return any(p != old_pod for p in kubelet.running())

                await eventually(replaced, "a new worker pod, run by the fake kubelet", 120, interval=0.2)
                new_pod = next(p for p in kubelet.running() if p != old_pod)
                pods = json.loads(await kubectl(k8s_cluster, "get", "pods", "-n", namespace, "-l", selector,
                                                "-o", "json"))["items"]
                owners = {p["metadata"]["name"]: p["metadata"]["ownerReferences"][0]["kind"] for p in pods}
                assert owners.get(new_pod) == "ReplicaSet", owners

                # 3. the new worker resumes from the ConfigMap's cursor, and the destination completes
                expected = expected_profiles(sb)

                async def complete() -> bool:
                    return profiles_match(sb)

                await eventually(complete, lambda: "completion after the pod deletion: "
                                 + diff(expected, actual_profiles(sb)), 420, POLL)
                reads = [r for r in sb.requests.records(since=seq, server="d365") if "/contacts" in r.path]
                assert reads, "the new worker never read contacts"
                first = reads[0].path
                assert "$skiptoken=" in first, f"the new worker read from the start, not from the checkpoint: {first}"
                assert token(first) == resume_from, (first, committed)
                keys, distinct = profile_key_count(sb)
                assert keys == distinct == len(expected) == CONTACTS, (keys, distinct, len(expected))
                posts = [r for r in sb.requests.records(since=seq, server="acs") if r.method == "POST"]
                assert len(posts) < CONTACTS - written_before + 2_000, "records before the checkpoint were re-sent"

                # 4. the Workflow's status: RUNNING, with what the workers wrote
                status: dict[str, Any] = {}

                async def reported() -> bool:
                    nonlocal status
                    status = (await workflow(k8s_cluster, namespace, name)).get("status") or {}
                    return status.get("phase") == "RUNNING" and int(
                        (status.get("counters") or {}).get("written") or 0) > 0

                await eventually(reported, lambda: f"phase RUNNING and counters.written > 0; last status: {status}",
                                 90, POLL)
            finally:
                await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)


HELD_SELECTOR = "syncplane.io/record=held"


@pytest.mark.timeout(1200)   # worker_image builds the image when make image has not
async def test_held_records_survive_pod_deletion(k8s_cluster, namespace, operator, tmp_path, worker_image):
    """An event whose contact is not in the CRM yet is held in a ConfigMap (its shard), not in the pod:
    the pod is deleted, the contact arrives, and the new pod's worker delivers the event.

    The fake kubelet runs these pods from the built image, as the pod's user: what a real cluster runs."""
    async with sandbox_with_secrets(k8s_cluster, namespace, SeedSpec(contacts=10, seed=4)) as sb:
        late = str(uuid.uuid4())
        sb.acs.events.create({"eventId": "evt-held", "eventType": "send", "externalId": late, "campaignId": "OP0001",
                              "campaignName": "c", "deliveryId": "DM000101", "deliveryName": "d",
                              "date": "2026-11-28 10:00:00.000Z", "mirrorPageUrl": "https://m.example.com/x"},
                             created_by="campaign")
        sb.acs.events.create({"eventId": "evt-ok", "eventType": "send",
                              "externalId": next(iter(sb.d365.table("contacts").rows)), "campaignId": "OP0001",
                              "campaignName": "c", "deliveryId": "DM000101", "deliveryName": "d",
                              "date": "2026-11-28 10:00:00.000Z", "mirrorPageUrl": "https://m.example.com/y"},
                             created_by="campaign")
        name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "20-email-events-egress.yaml")

        def delivered() -> set[str]:
            return {a["new_eventid"] for a in sb.d365.table("new_emailevents").rows.values()}

        async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers",
                               runtime=worker_image) as kubelet:
            try:
                await set_desired(k8s_cluster, namespace, name, "RUNNING")
                held: list[tuple[dict[str, Any], dict[str, Any]]] = []

                async def holding() -> bool:
                    nonlocal held
                    held = await records(k8s_cluster, namespace, HELD_SELECTOR)
                    return delivered() == {"evt-ok"} and len(held) == 1

                await eventually(holding, lambda: f"evt-ok delivered and evt-held held (delivered "
                                 f"{delivered()}, held {held}; worker logs in {tmp_path / 'containers'})", 180, POLL)
                shard, record = held[0]
                assert record["key"] == "evt-held" and record["status"] == 404
                assert shard["metadata"]["name"] == record_shard(name, HELD, record["stream"], "evt-held")[0]
                uid = (await workflow(k8s_cluster, namespace, name))["metadata"]["uid"]
                assert [o["uid"] for o in shard["metadata"]["ownerReferences"]] == [uid]

                # the pod goes; the held record stays; the contact arrives; the new pod delivers the event
                (old_pod,) = kubelet.running()
                old = kubelet.containers[old_pod]
                assert old.image is not None and (entry := old.image.entrypoint()) is not None
                assert entry.uids().real == 10001, "the pod's container runs from the image as the pod's user"
                await kubectl(k8s_cluster, "delete", "pod", old_pod, "-n", namespace, "--wait=false")
                assert await asyncio.to_thread(old.proc.wait, 90) == 0
                assert len(await records(k8s_cluster, namespace, HELD_SELECTOR)) == 1
                sb.d365.table("contacts").upsert(late, lastname="Late", emailaddress1="late@example.com")

                async def released() -> bool:
                    return (delivered() == {"evt-ok", "evt-held"} and any(p != old_pod for p in kubelet.running())
                            and not await records(k8s_cluster, namespace, HELD_SELECTOR))

                await eventually(released, lambda: f"evt-held delivered by the new pod, its record gone (delivered "
                                 f"{delivered()})", 180, POLL)
            finally:
                await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)


@pytest.mark.timeout(600)
async def test_opt_in_out_keeps_cursors_and_dead_letters_in_configmaps(k8s_cluster, namespace, operator, tmp_path):
    """The opt-in/out worker on Kubernetes: its two cursors in `<workflow>-checkpoints`, a write the
    destination rejects in a dead-letter ConfigMap; a pod deleted after that loses neither."""
    async with sandbox_with_secrets(k8s_cluster, namespace, SeedSpec(contacts=50, seed=6)) as sb:
        keys = sorted(sb.d365.table("contacts").rows)
        create_profiles(sb, keys)
        bad = keys[0]
        sb.acs.poison_keys("profile", bad, str(sb.acs.profiles.find(bad)))
        name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "30-opt-in-out.yaml")
        letters_selector = "syncplane.io/record=dead-letter"

        async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers") as kubelet:
            try:
                await set_desired(k8s_cluster, namespace, name, "RUNNING")
                for k in keys[:2]:
                    sb.d365.table("contacts").upsert(k, donotemail=True)

                async def synced() -> bool:
                    letters = await records(k8s_cluster, namespace, letters_selector)
                    cursors = set(await checkpoints(k8s_cluster, namespace, name))
                    flipped = sb.acs.profiles.by_key(keys[1]) or {}
                    return (flipped.get("blackList") is True and len(letters) == 1
                            and {stream_key(CRM_STREAM), stream_key(CAMPAIGN_STREAM)} <= cursors)

                def writes() -> list[tuple[str, str, int | None]]:
                    return [(r.method, r.path, r.status) for r in sb.requests.records(server="acs")
                            if r.method == "PATCH"]

                await eventually(synced, lambda: f"the flip synced, the poisoned one dead-lettered, both cursors "
                                 f"committed (Campaign writes: {writes()}; worker logs in {tmp_path / 'containers'})",
                                 180, POLL)
                ((_, record),) = await records(k8s_cluster, namespace, letters_selector)
                assert (record["key"], record["stream"], record["status"]) == (bad, CAMPAIGN_STREAM, 400)

                # a new pod: the dead letter and the cursors are still there
                (old_pod,) = kubelet.running()
                old = kubelet.containers[old_pod]   # taken before the delete: the kubelet forgets a deleted pod
                await kubectl(k8s_cluster, "delete", "pod", old_pod, "-n", namespace, "--wait=false")
                assert await asyncio.to_thread(old.proc.wait, 90) == 0
                assert len(await records(k8s_cluster, namespace, letters_selector)) == 1
                cursors = set(await checkpoints(k8s_cluster, namespace, name))
                assert {stream_key(CRM_STREAM), stream_key(CAMPAIGN_STREAM)} <= cursors
            finally:
                await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)

