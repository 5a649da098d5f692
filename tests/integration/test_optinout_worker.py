"""Opt-in/out through the real worker process and the control plane (the sync itself is
tested pass by pass in test_optinout.py): both directions converge while flips happen on
both sides, and the worker's writes stay bounded by the real changes."""

from __future__ import annotations

import random

import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane_sandbox import SeedSpec
from tests.embedded_plane import CRASH_TOLERANT, ControlPlane
from tests.integration.ingress_env import converge, prepared_sandbox, status_until
from tests.integration.optinout_env import (
    PAIRS,
    create_profiles,
    disagreements,
    marks,
    optinout_spec,
    profile,
    set_campaign,
    set_crm,
    start_worker,
    write_count,
)
from tests.integration.sandbox_fixtures import running_sandbox
from tests.integration.test_ingress import start
from tests.integration.verify_env import verified

pytestmark = pytest.mark.supervisor(CRASH_TOLERANT)


async def test_bidirectional_worker_converges_without_ping_pong(plane: ControlPlane) -> None:
    async with running_sandbox(SeedSpec(contacts=500, seed=31, opt_out_ratio=0.2)) as sb:
        keys = await start_worker(plane.stub, plane.data_dir, sb, "BIDIRECTIONAL")
        await status_until(plane.stub, "optio", lambda s: s.phase == pb.PHASE_RUNNING, 60)
        await converge(lambda: not disagreements(sb, keys), 120, lambda: f"first sync: {disagreements(sb, keys)[:3]}")

        rng = random.Random(7)
        acs_mark, parts_mark = marks(sb)
        flips = 0
        for key in rng.sample(keys, 200):
            acs_field, crm_field = rng.choice(PAIRS)
            if rng.random() < 0.5:
                row = sb.d365.table("contacts").get(key)
                assert row is not None
                set_crm(sb, key, **{crm_field: not row[crm_field]})
            else:
                pk = sb.acs.profiles.find(key)
                assert pk is not None
                set_campaign(sb, key, **{acs_field: not sb.acs.profiles.rows[pk][acs_field]})
            flips += 1
        await converge(lambda: not disagreements(sb, keys), 120, lambda: f"after flips: {disagreements(sb, keys)[:3]}")
        writes_after_convergence = write_count(sb, acs_mark, parts_mark)
        assert writes_after_convergence <= flips, "more writes than real changes"
        # and it stays quiet: a few more passes write nothing (no echo)
        seen = len(sb.requests.records())
        await converge(lambda: len([r for r in sb.requests.records(since=seen, server="d365")
                                    if "$deltatoken" in r.path]) >= 3, 60, "three more passes")
        assert write_count(sb, acs_mark, parts_mark) == writes_after_convergence
        await verified(plane.stub, "optio")


async def test_an_unsubscribe_in_campaign_sticks_when_the_workflow_is_created_again(plane: ControlPlane) -> None:
    """Issue 12, fault 6: CRM → marketing; a contact unsubscribes in Campaign while the CRM still
    says donotemail false. The workflow is deleted and created again (all its state, echo memory
    included, is forgotten): its first full read must not write blackList false."""
    from syncplane.proto.v1 import workflow_service_pb2 as svc
    from tests.integration.test_ingress import stop

    async with prepared_sandbox(SeedSpec(contacts=200, seed=5, opt_out_ratio=0.0), plane.data_dir) as sb:
        keys = sorted(sb.d365.table("contacts").rows)
        create_profiles(sb, keys)
        spec = optinout_spec(sb, "CRM_TO_MARKETING")
        spec.poll_interval.seconds = 1
        await start(plane, "optio", spec)
        probe = keys[-1]
        set_crm(sb, probe, donotemail=True)
        await converge(lambda: profile(sb, probe)["blackList"] is True, 120, "the first sync")
        unsubscribed = keys[:5]
        for k in unsubscribed:
            set_campaign(sb, k, blackList=True)
        await stop(plane, "optio")
        await plane.stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name="workflows/optio"))
        # Created again: it reads both sides in full, with no memory. A CRM change made meanwhile
        # tells when that read has been written.
        probe = keys[-2]
        set_crm(sb, probe, donotemail=True)
        await start(plane, "optio", spec)
        await converge(lambda: profile(sb, probe)["blackList"] is True, 120, "the new workflow's read")
        assert [profile(sb, k)["blackList"] for k in unsubscribed] == [True] * 5
        # Only a change seen at the source after the opt-out may clear it.
        probe = keys[-3]
        set_crm(sb, unsubscribed[0], donotemail=True)
        set_crm(sb, probe, donotemail=True)
        await converge(lambda: profile(sb, probe)["blackList"] is True, 120, "a pass reading the opt-out")
        set_crm(sb, unsubscribed[0], donotemail=False)
        await converge(lambda: profile(sb, unsubscribed[0])["blackList"] is False, 120,
                       "a re-subscription made in the CRM")
        # CRM → marketing keeps a Campaign unsubscribe: exactly the other four pairs differ, settled
        resp = await verified(plane.stub, "optio", {"optinout": (0, 0, 4)})
        assert list(resp.streams[0].different_keys) == sorted(unsubscribed[1:])
