"""The first load of one table split across 3 worker pods (issue 18 item 4) on the test cluster.

The pods of a Deployment have no index: each claims a key range in the `<workflow>-checkpoints`
ConfigMap (compare-and-set on its resourceVersion), and one claims the stream to read on from the
delta token taken at the start. Rows are changed, created and deleted during the load, and the pod
reading a range not yet done is deleted with grace 0 mid-range (its container killed, as on a lost
node; Campaign holds every write meanwhile, so no range can end before the kill whatever the
machine's speed): its claim expires and another pod resumes the range from its committed progress. The destination ends
equal to the source, counted by key at the sandbox (no duplicate, no loss)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from syncplane.state.kube_checkpoints import stream_key
from syncplane_sandbox import SeedSpec
from tests.backends import eventually
from tests.integration.ingress_env import (
    actual_profiles,
    change_during_load,
    diff,
    expected_profiles,
    profile_key_count,
    profiles_match,
)
from tests.k8s.kubelet import FakeKubelet
from tests.k8s.test_worker_data import POLL, apply_workflow, checkpoints, kubectl, sandbox_with_secrets, set_desired

pytestmark = pytest.mark.k8s
CONTACTS = 12_000
PODS = 3


@pytest.mark.timeout(900)
async def test_three_worker_pods_split_the_first_load_through_a_pod_deleted_mid_range(k8s_cluster, namespace, operator,
                                                                                      tmp_path):
    async with sandbox_with_secrets(k8s_cluster, namespace, SeedSpec(contacts=CONTACTS, seed=18)) as sb:
        name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "10-contacts-ingress.yaml",
                                    batchSize=500, workers=PODS)
        async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers") as kubelet:
            try:
                await set_desired(k8s_cluster, namespace, name, "RUNNING")

                async def loading() -> bool:
                    return len(sb.acs.profiles.rows) >= CONTACTS // 4

                await eventually(loading, lambda: f"a quarter of the load ({len(sb.acs.profiles.rows)} profiles; "
                                 f"worker logs in {tmp_path / 'containers'})", 420, POLL)
                # Every write held from here until the kill: no range can end meanwhile.
                with sb.faults.acs.holding():
                    assert len(kubelet.running()) == PODS, kubelet.running()
                    # The pod reading a range not done, deleted with grace 0 mid-range.
                    data = await checkpoints(k8s_cluster, namespace, name)
                    cut = next((i for i in range(PODS) if stream_key(f"contact@claim-{i}") in data and json.loads(
                        data.get(stream_key(f"contact@range-{i}"), "{}")).get("cursor") != "range-done"), None)
                    assert cut is not None, f"every range claimed is done already: {sorted(data)}"
                    victim = json.loads(data[stream_key(f"contact@claim-{cut}")])["holder"]
                    container = kubelet.containers[victim]
                    container.signal(signal.SIGKILL)
                    await asyncio.to_thread(container.proc.wait, 30)
                await kubectl(k8s_cluster, "delete", "pod", victim, "-n", namespace, "--grace-period=0", "--force")
                table = sb.d365.table("contacts")
                change_during_load(sb, random.Random(3), changed=300, deleted=50, created=100)
                expected = len(table.rows)

                async def complete() -> bool:
                    return profiles_match(sb)

                await eventually(complete, lambda: "the split load on 3 pods: "
                                 + diff(expected_profiles(sb), actual_profiles(sb)), 600, POLL)
                assert profile_key_count(sb) == (expected, expected)  # no duplicate, none lost

                data = await checkpoints(k8s_cluster, namespace, name)
                ranges = {i: json.loads(data[stream_key(f"contact@range-{i}")]) for i in range(PODS)}
                assert all(r["cursor"] == "range-done" for r in ranges.values()), ranges
                assert sum(r["rows"] for r in ranges.values()) >= CONTACTS - 50
                holders: set[Any] = {json.loads(data[stream_key(f"contact@claim-{i}")])["holder"]
                                     for i in range(PODS)}
                assert holders <= set(kubelet.containers), holders  # claimed by pod names
                assert victim not in holders  # the cut range was resumed by another pod
                assert ranges[cut]["rows"] > 0
                main = json.loads(data[stream_key("contact")])
                assert str(main["cursor"]).startswith("delta ")
            finally:
                await set_desired(k8s_cluster, namespace, name, "STOPPED", check=False)
