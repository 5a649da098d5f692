"""Workflows one worker at a time does (egress: one event feed; opt-in/out: one contact table)
with ``workers: 2`` on the test cluster. The pods of a Deployment have no index (each runs as
worker 0), so each would run the whole feed: the one holding the claim ``runner@owner`` in the
`<workflow>-checkpoints` ConfigMap does it, the other stands by and takes over when the holder's
pod is deleted with grace 0 (its claim expires). Checked at the sandbox (every event its
activity, one each) and on the Workflow's counters: each event written once, not once per pod."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from syncplane.state.kube_checkpoints import stream_key
from syncplane.worker.engine import ClaimedRunner
from syncplane.worker.split import CLAIM_TTL
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.backends import eventually
from tests.k8s.kubelet import FakeKubelet
from tests.k8s.test_worker_data import POLL, apply_workflow, checkpoints, create_secrets, kubectl, set_desired, workflow

pytestmark = pytest.mark.k8s
EVENTS = 1_000
OWNER = stream_key(f"{ClaimedRunner.CLAIM}@owner")


def activity_ids(sb: Any) -> list[str]:
    return [a["new_eventid"] for a in sb.d365.table("new_emailevents").rows.values()]


def wanted(sb: Any) -> set[str]:
    """The events the default egress spec writes (every type; a soft bounce is not written)."""
    return {e["eventId"] for e in sb.acs.events.rows.values()
            if e["eventType"] != "bounce" or e["bounceType"] == "hard"}


@pytest.mark.timeout(900)
async def test_egress_with_two_pods_runs_on_the_claim_holder_and_fails_over(k8s_cluster, namespace, operator,
                                                                              tmp_path):
    sb = await start_sandbox(seed=SeedSpec(contacts=200, events=EVENTS, seed=18))
    try:
        await create_secrets(k8s_cluster, namespace, sb)
        name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "20-email-events-egress.yaml",
                                    workers=2, batchSize=100)
        async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers") as kubelet:
            try:
                await set_desired(k8s_cluster, namespace, name, "RUNNING")
                status: dict[str, Any] = {}

                async def delivered(n: int) -> bool:
                    nonlocal status
                    status = (await workflow(k8s_cluster, namespace, name)).get("status") or {}
                    return (set(activity_ids(sb)) == wanted(sb) and len(kubelet.running()) == 2
                            and int((status.get("counters") or {}).get("written") or 0) >= n)

                first = len(wanted(sb))
                await eventually(lambda: delivered(first), lambda: f"{first} activities and counters.written "
                                 f"(activities {len(activity_ids(sb))}; status {status}; worker logs in "
                                 f"{tmp_path / 'containers'})", 300, POLL)
                ids = activity_ids(sb)
                assert len(ids) == len(set(ids)), "duplicate activities"
                # Written once, by one pod: both pods running the feed counted every event twice.
                assert int(status["counters"]["written"]) == first, status["counters"]
                holder = json.loads((await checkpoints(k8s_cluster, namespace, name))[OWNER])["holder"]
                assert holder in kubelet.running(), (holder, kubelet.running())

                # The holder's pod deleted with grace 0 (its container killed, as on a lost node):
                # the other pod takes the claim once it expires and delivers the new events.
                container = kubelet.containers[holder]
                container.signal(signal.SIGKILL)
                await asyncio.to_thread(container.proc.wait, 30)
                await kubectl(k8s_cluster, "delete", "pod", holder, "-n", namespace, "--grace-period=0", "--force")
                sb.generate_events(300, seed=5)
                later = len(wanted(sb))

                async def taken_over() -> bool:
                    data = await checkpoints(k8s_cluster, namespace, name)
                    return (set(activity_ids(sb)) == wanted(sb)
                            and json.loads(data[OWNER])["holder"] != holder)

                await eventually(taken_over, lambda: f"{later} activities after the holder's pod went "
                                 f"(activities {len(activity_ids(sb))})", 120 + CLAIM_TTL, POLL)
                ids = activity_ids(sb)
                assert len(ids) == len(set(ids)) == later, "duplicate or missing activities"
            finally:
                await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)
    finally:
        await sb.stop()
