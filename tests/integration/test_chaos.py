"""The chaos run: a first load of 20,000 contacts under 429/503 storms, three `kill -9` of the
worker, an expired delta token with deletes, edits and inserts made while it was expired. It
must end with `syncplane verify` finding 0 differences and Campaign holding no key twice.

The control plane runs in-process, the worker is a real process (killed for real), the sandbox
answers over real HTTP; the end state is read from the sandbox and from VerifyWorkflow."""

from __future__ import annotations

import os
import random
import signal
import uuid

import pytest

from syncplane_sandbox import Sandbox, SeedSpec, start_sandbox
from tests.embedded_plane import CRASH_TOLERANT, ControlPlane
from tests.integration.ingress_env import (
    converge,
    ingress_spec,
    prepare,
    profile_key_count,
    profiles_converge,
)
from tests.integration.test_ingress import start, worker_pid
from tests.integration.verify_env import counts, verify

pytestmark = pytest.mark.supervisor(CRASH_TOLERANT)

# Background throttling all along, and storms: bursts of consecutive 429s and 503s (Retry-After: 1)
# on both APIs. A Retry-After holds every request of a client, so a burst stalls it for seconds.
CALM = {"rate_429": 0.01, "rate_503": 0.005, "retry_after_s": 1}


def storm(sb: Sandbox) -> None:
    for emulator in (sb.faults.d365, sb.faults.acs):
        emulator.queue(429, 12)
        emulator.queue(503, 8)


def kill_worker(plane: ControlPlane) -> None:
    pid = worker_pid(plane)
    assert pid is not None, "a worker to kill"
    os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(1800)
async def test_chaos_ends_with_verify_at_zero_and_no_duplicate_key(plane: ControlPlane) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=20_000, seed=2026))
    try:
        prepare(sb, plane.data_dir)
        sb.faults.set(**CALM)
        await start(plane, "chaos", ingress_spec(sb, batch_size=500))
        profiles = sb.acs.profiles.rows

        # First load: a storm, a kill, another storm, another kill.
        await converge(lambda: len(profiles) >= 3_000 and worker_pid(plane) is not None, 600, "3,000 profiles")
        storm(sb)
        await converge(lambda: len(profiles) >= 6_000 and worker_pid(plane) is not None, 600,
                       "6,000 profiles through the storm")
        kill_worker(plane)  # 1
        # verify runs while the first load runs: what is not written yet is reported, all in flight
        mid = (await verify(plane.stub, "chaos")).result.counts
        assert mid.missing > 0 and mid.in_flight == mid.missing + mid.extra + mid.different, mid
        await converge(lambda: len(profiles) >= 12_000 and worker_pid(plane) is not None, 600, "12,000 profiles")
        storm(sb)
        kill_worker(plane)  # 2
        await converge(lambda: len(profiles) >= 15_000, 600, "15,000 profiles through the storm")
        await profiles_converge(sb, 900, "the first load")

        # The delta token expires; meanwhile contacts are deleted, edited and inserted. No await in
        # between: the worker (served by this event loop) cannot poll in the middle of it.
        contacts = sb.d365.table("contacts")
        rng = random.Random(7)
        ids = sorted(contacts.rows)
        sb.expire_delta_tokens()
        storm(sb)
        for rid in rng.sample(ids, 150):
            contacts.delete(rid)
        for rid in rng.sample(sorted(contacts.rows), 300):
            contacts.upsert(rid, lastname="Edited")
        for i in range(200):
            contacts.upsert(str(uuid.uuid4()), firstname="New", lastname=f"Contact {i}",
                            emailaddress1=f"new{i}@example.com")
        seq = max((r.seq for r in sb.requests.records()), default=0)

        # The third kill, during the full re-read the expired token forces.
        def rereading() -> bool:  # the expired token refused (400), then a next page of the full read
            log = sb.requests.records(since=seq, server="d365")
            refused = next((r.seq for r in log if r.status == 400 and "$deltatoken" in r.path), None)
            return worker_pid(plane) is not None and refused is not None and any(
                r.seq > refused and "/contacts?" in r.path and "$skiptoken" in r.path for r in log)

        await converge(rereading, 300, "the full re-read after the expired delta token")
        kill_worker(plane)  # 3
        await profiles_converge(sb, 900, "after the expired token")

        rows, keys = profile_key_count(sb)
        assert rows == keys == len(contacts.rows), "no duplicate key, none lost"
        resp = await verify(plane.stub, "chaos")  # under the calm faults still: it honours them too
        assert counts(resp) == {"contact": (0, 0, 0)}, resp
        assert resp.streams[0].counts.compared == len(contacts.rows)
        assert sum(1 for r in sb.requests.records() if r.status == 429) >= 36
        assert sum(1 for r in sb.requests.records() if r.status == 503) >= 24
    finally:
        await sb.stop()
