"""The opt-in/out sync in-process against the sandbox emulators over real HTTP: the four modes,
conflicts, flips during the sync, 2,000 random flips with no ping-pong, restarts."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncplane.optinout.sync import CAMPAIGN_STREAM
from syncplane_sandbox import Sandbox, SeedSpec, start_sandbox
from tests.integration.optinout_env import (
    PAIRS,
    Harness,
    create_profiles,
    crm_row,
    disagreements,
    flip,
    marks,
    profile,
    set_campaign,
    set_crm,
    write_count,
)
from tests.integration.sandbox_fixtures import running_sandbox


@pytest.fixture
async def sb() -> AsyncIterator[Sandbox]:
    async with running_sandbox(SeedSpec(contacts=300, seed=11, opt_out_ratio=0.3)) as sandbox:
        yield sandbox


def contact_keys(sb: Sandbox) -> list[str]:
    return sorted(sb.d365.table("contacts").rows)


@pytest.fixture
def keys(sb: Sandbox) -> list[str]:
    """Every contact but the last 20 has a profile the integration created."""
    ks = contact_keys(sb)
    create_profiles(sb, ks[:-20])
    return ks[:-20]


async def harness(sb: Sandbox, tmp_path: Path, direction: str) -> Harness:
    return Harness(sb, tmp_path, direction)


async def flip_one_each_side(sb: Sandbox, h: Harness, crm_key: str, campaign_key: str) -> tuple[int, int]:
    """Flip ``crm_key``'s e-mail opt-out in the CRM and ``campaign_key``'s in Campaign, then sync until
    quiet; returns the request-log marks from before the sync (for write_count)."""
    set_crm(sb, crm_key, donotemail=not crm_row(sb, crm_key)["donotemail"])
    set_campaign(sb, campaign_key, blackListEmail=not profile(sb, campaign_key)["blackListEmail"])
    m = marks(sb)
    await h.converge()
    return m


async def test_disabled_reads_and_writes_nothing(sb: Sandbox, keys: list[str], tmp_path: Path) -> None:
    h = await harness(sb, tmp_path, "DISABLED")
    try:
        before = len(sb.requests)
        set_crm(sb, keys[0], donotemail=True)
        await h.sync.run_once(asyncio.Event())
        assert len(sb.requests) == before
        assert profile(sb, keys[0])["blackList"] is False
        assert (await h.verify()).compared == 0  # nothing is kept in sync: nothing compared
    finally:
        await h.aclose()


async def test_crm_to_marketing(sb: Sandbox, keys: list[str], tmp_path: Path) -> None:
    h = await harness(sb, tmp_path, "CRM_TO_MARKETING")
    try:
        assert await h.converge() == 2
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
        opted = [k for k in keys if crm_row(sb, k)["donotbulkemail"]]
        assert opted and all(profile(sb, k)["blackListEmail"] is True for k in opted)
        # only profiles that had to change were written; no profile was created
        assert len(sb.acs.profiles) == len(keys)
        # a CRM change flows; a Campaign change does not flow back
        a, b = keys[0], keys[1]
        crm_b = dict(crm_row(sb, b))
        m = await flip_one_each_side(sb, h, crm_key=a, campaign_key=b)
        assert profile(sb, a)["blackList"] == crm_row(sb, a)["donotemail"]
        assert crm_row(sb, b)["donotbulkemail"] == crm_b["donotbulkemail"]
        assert crm_row(sb, b)["modifiedon"] == crm_b["modifiedon"]  # the CRM was not written at all
        assert write_count(sb, *m) == 1
        d = await h.verify()  # the Campaign edit of b is left alone one way: exactly that pair differs
        assert (d.missing, d.extra, d.different, d.in_flight) == ([], [], [b], set())
    finally:
        await h.aclose()


async def test_marketing_to_crm(sb: Sandbox, keys: list[str], tmp_path: Path) -> None:
    h = await harness(sb, tmp_path, "MARKETING_TO_CRM")
    try:
        for k in keys[:30]:
            set_campaign(sb, k, blackList=True, blackListEmail=False)
        await h.converge()
        # Campaign is the master, but a first read has no memory: its opt-outs are now the CRM's,
        # and its false values clear no CRM opt-out (a guess never opts in)
        left = disagreements(sb, keys)
        assert left and all(crm_value is True and acs_value is False for _, _, crm_value, acs_value in left)
        d = await h.verify()  # verify counts exactly those pairs (per contact)
        assert d.different == sorted({k for k, *_ in left}) and not d.missing and not d.extra
        # the 20 contacts without a profile kept their values; no contact was created
        assert len(sb.d365.table("contacts")) == len(keys) + 20
        a, b = keys[40], keys[41]
        acs_b = dict(profile(sb, b))
        m = await flip_one_each_side(sb, h, crm_key=b, campaign_key=a)
        assert crm_row(sb, a)["donotbulkemail"] == profile(sb, a)["blackListEmail"]
        assert profile(sb, b)["lastModified"] == acs_b["lastModified"]  # Campaign untouched
        assert write_count(sb, *m) == 1
    finally:
        await h.aclose()


async def test_bidirectional_first_sync_opt_out_wins_then_changes_flow_both_ways(
        sb: Sandbox, keys: list[str], tmp_path: Path) -> None:
    for k in keys[:10]:  # opted out in Campaign only
        set_campaign(sb, k, blackList=True)
    crm_true = {k for k in keys if crm_row(sb, k)["donotemail"]}
    h = await harness(sb, tmp_path, "BIDIRECTIONAL")
    try:
        await h.converge()
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
        # no baseline yet: an opt-out on either side wins (a guess never re-subscribes anyone)
        assert {k for k in keys if profile(sb, k)["blackList"]} == crm_true | set(keys[:10])
        # now each side changes, between passes: every change lands on the other side
        a, b = keys[50], keys[51]
        set_crm(sb, a, donotbulkemail=not crm_row(sb, a)["donotbulkemail"])
        set_campaign(sb, b, blackList=not profile(sb, b)["blackList"])
        want_a, want_b = crm_row(sb, a)["donotbulkemail"], profile(sb, b)["blackList"]
        m = marks(sb)
        assert await h.converge() == 2  # one pass writes, the next only reads the echoes back
        assert profile(sb, a)["blackListEmail"] == want_a and crm_row(sb, b)["donotemail"] == want_b
        assert write_count(sb, *m) == 2
        # opting back in flows too (a real change from a known baseline)
        k = next(iter(crm_true))
        set_crm(sb, k, donotemail=False)
        await h.converge()
        assert profile(sb, k)["blackList"] is False
    finally:
        await h.aclose()


async def test_bidirectional_conflicts_newer_wins_tie_opt_out_wins(sb: Sandbox, keys: list[str],
                                                                     tmp_path: Path) -> None:
    """A true conflict: both sides changed a pair since the sync last knew it, to different
    values. With booleans that needs the two sides' known values to differ, as after a
    one-way period in which a marketer edited Campaign (not propagated back)."""
    h = await harness(sb, tmp_path, "CRM_TO_MARKETING")
    try:
        await h.converge()
        k1, k2, k3 = keys[60], keys[61], keys[62]
        for k in (k1, k2, k3):
            set_crm(sb, k, donotbulkemail=False)
            await h.converge()
            set_campaign(sb, k, blackListEmail=True)  # the marketer's edit: stays in Campaign
        await h.converge()
        assert all(crm_row(sb, k)["donotbulkemail"] is False for k in (k1, k2, k3))
        await h.restart("BIDIRECTIONAL")
        # k1: the CRM opts out, then, 5 s later, Campaign opts in: Campaign is newer and wins
        set_crm(sb, k1, donotbulkemail=True)
        sb.clock.advance(5)
        set_campaign(sb, k1, blackListEmail=False)
        # k2: the other way round: Campaign opts in, the CRM opts out 5 s later and wins
        set_campaign(sb, k2, blackListEmail=False)
        sb.clock.advance(5)
        set_crm(sb, k2, donotbulkemail=True)
        # k3: both in the same second (Campaign opts in, the CRM opts out): a tie, opt-out wins
        sb.clock.advance(5)
        set_crm(sb, k3, donotbulkemail=True)
        sb.clock.advance(1.0 - sb.clock.time() % 1.0 + 0.05)  # both stamps in one whole second
        set_crm(sb, k3, donotbulkemail=True)
        set_campaign(sb, k3, blackListEmail=False)
        conflicts_before = h.sync.totals.conflicts
        await h.converge()
        assert crm_row(sb, k1)["donotbulkemail"] is False and profile(sb, k1)["blackListEmail"] is False
        assert crm_row(sb, k2)["donotbulkemail"] is True and profile(sb, k2)["blackListEmail"] is True
        assert crm_row(sb, k3)["donotbulkemail"] is True and profile(sb, k3)["blackListEmail"] is True
        assert h.sync.totals.conflicts - conflicts_before == 3
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
    finally:
        await h.aclose()


async def test_foreign_profiles_are_never_modified(sb: Sandbox, tmp_path: Path) -> None:
    ks = contact_keys(sb)
    foreign = set(ks[:15])
    create_profiles(sb, ks, foreign=foreign)
    for k in ks[:15]:
        set_crm(sb, k, donotemail=True)
        set_campaign(sb, k, blackListEmail=True)  # a marketer's opt-out in Campaign
    before = {k: dict(profile(sb, k)) for k in foreign}
    h = await harness(sb, tmp_path, "BIDIRECTIONAL")
    try:
        await h.converge()
        assert {k: profile(sb, k) for k in foreign} == before
        # the marketer's opt-outs still reach the CRM (reading Campaign modifies nothing there)
        assert all(crm_row(sb, k)["donotbulkemail"] is True for k in foreign)
        letters = h.state.dead_letters("opt-in-out")
        assert {d["key"] for d in letters} == foreign
        assert all(d["stream"] == CAMPAIGN_STREAM and d["status"] == 409 for d in letters)
        assert h.report.counters.dead_lettered == len(foreign)
        d = await h.verify()  # foreign profiles are counted, never compared
        assert d.foreign == len(foreign) and d.keys == []
    finally:
        await h.aclose()


async def test_bidirectional_flips_on_both_sides_while_the_sync_runs(sb: Sandbox, keys: list[str],
                                                                      tmp_path: Path) -> None:
    h = await harness(sb, tmp_path, "BIDIRECTIONAL")
    try:
        await h.converge()
        rng = random.Random(5)
        flips = 0
        done, passed = asyncio.Event(), asyncio.Event()

        async def flipper() -> None:
            nonlocal flips
            for i in range(400):
                flip(sb, rng, keys)
                flips += 1
                await asyncio.sleep(0)  # interleave with the sync's requests
                if i % 100 == 99:
                    # Spread the flips over several passes (the sync's SQLite calls run off the
                    # event loop, so one pass could otherwise see all of them).
                    passed.clear()
                    await passed.wait()
            done.set()

        m = marks(sb)
        task = asyncio.create_task(flipper())
        passes = 0
        while not done.is_set():
            await h.sync.run_once(asyncio.Event())
            passes += 1
            passed.set()
            assert passes < 500
        await task
        assert passes >= 2  # the flips really overlapped passes
        await h.converge()
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
        assert write_count(sb, *m) <= flips
    finally:
        await h.aclose()


@pytest.mark.timeout(600)
async def test_two_thousand_random_flips_converge_without_ping_pong(tmp_path: Path) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=1500, seed=23, opt_out_ratio=0.2))
    h = None
    try:
        keys = contact_keys(sb)
        create_profiles(sb, keys)
        h = await harness(sb, tmp_path, "BIDIRECTIONAL")
        await h.converge()
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
        rng = random.Random(99)
        m = marks(sb)
        flips = 0
        changed: set[tuple[str, str]] = set()
        for _ in range(20):  # 20 waves of 100 flips, the sync running a pass after each
            for _ in range(100):
                key, _side, f = flip(sb, rng, keys)
                changed.add((key, f))
                flips += 1
            sb.clock.advance(1.1)  # waves a second apart: later changes carry later stamps
            await h.sync.run_once(asyncio.Event())
        passes = await h.converge()
        assert passes <= 3
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
        writes = write_count(sb, *m)
        assert flips == 2000
        assert 0 < writes <= flips, (writes, flips)
        # a restart reads nothing back as a change: the echo memory is durable
        await h.restart()
        m2 = marks(sb)
        await h.sync.run_once(asyncio.Event())
        assert write_count(sb, *m2) == 0
        # and a quiet pass reads nothing at all on either side
        await h.sync.run_once(asyncio.Event())
        assert h.sync.last.read_crm == h.sync.last.read_campaign == 0
    finally:
        if h is not None:
            await h.aclose()
        await sb.stop()


async def test_restart_mid_pass_does_not_ping_pong(sb: Sandbox, keys: list[str], tmp_path: Path) -> None:
    """Writes acknowledged, cursors not yet committed (a crash): the next run reads the same
    changes and its own writes back, and writes nothing more."""
    h = await harness(sb, tmp_path, "BIDIRECTIONAL")
    try:
        await h.converge()
        for k in keys[:40]:
            set_crm(sb, k, donotbulkemail=not crm_row(sb, k)["donotbulkemail"])
        for k in keys[40:80]:
            set_campaign(sb, k, blackList=not profile(sb, k)["blackList"])
        saved = {s: h.state.load("opt-in-out", s) for s in ("optinout:crm", "optinout:campaign")}
        await h.sync.run_once(asyncio.Event())
        assert h.sync.last.write_requests == 80
        for stream, cursor in saved.items():  # the crash: cursors back where they were
            assert cursor is not None
            h.state.commit("opt-in-out", stream, cursor)
        await h.restart()
        m = marks(sb)
        assert await h.converge() == 1
        assert write_count(sb, *m) == 0
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
    finally:
        await h.aclose()


async def test_stop_finishes_the_batch_and_resumes(sb: Sandbox, keys: list[str], tmp_path: Path) -> None:
    h = await harness(sb, tmp_path, "BIDIRECTIONAL")
    try:
        stop = asyncio.Event()
        stop.set()
        await h.sync.run_once(stop)  # stopped before anything: nothing written, nothing committed
        assert h.state.load("opt-in-out", CAMPAIGN_STREAM) is None
        await h.converge()
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
        assert h.report.backlog == 0
        assert h.report.counters.read >= 2 * len(keys)
    finally:
        await h.aclose()


def test_pairs_cover_the_default_spec() -> None:
    from tests.factories import spec

    s = spec("opt_in_out")
    assert {(p.campaign_field, p.crm_field) for p in s.opt_in_out.field_pairs} == set(PAIRS)


async def test_dead_letters_are_retried_unless_superseded(sb: Sandbox, keys: list[str], tmp_path: Path) -> None:
    """Writes Campaign rejects are dead-lettered (and counted in the report); a retry re-sends them
    if the source still holds those values, and drops them when the source changed since (the feed
    brings that change)."""
    h = await harness(sb, tmp_path, "CRM_TO_MARKETING")
    try:
        await h.converge()
        bad = keys[:3]
        sb.acs.poison_keys("profile", *bad, *(str(sb.acs.profiles.find(k)) for k in bad))
        for k in bad:
            set_crm(sb, k, donotemail=not crm_row(sb, k)["donotemail"])
        await h.sync.run_once(asyncio.Event())
        letters = {d["key"]: d for d in h.state.dead_letters("opt-in-out")}
        assert set(letters) == set(bad) and all(d["status"] == 400 for d in letters.values())
        assert h.report.dead_letters == 3

        # Retried while Campaign still rejects them: kept, one more attempt each.
        assert h.state.mark_for_retry("opt-in-out") == (3, [])
        await h.sync.run_once(asyncio.Event())
        again = {d["key"]: d for d in h.state.dead_letters("opt-in-out")}
        assert {k: d["attempts"] for k, d in again.items()} == dict.fromkeys(bad, 2)
        assert h.state.marked_for_retry("opt-in-out", CAMPAIGN_STREAM) == []

        # Accepted now. bad[2] was changed back in the CRM since: its dead letter is superseded (not
        # sent), and that change comes with the contacts feed (nothing to write: Campaign holds it).
        sb.acs.clear_poison()
        set_crm(sb, bad[2], donotemail=not crm_row(sb, bad[2])["donotemail"])
        h.state.mark_for_retry("opt-in-out")
        m = marks(sb)
        await h.sync.run_once(asyncio.Event())
        assert h.state.dead_letters("opt-in-out") == []
        assert h.report.dead_letters == 0
        assert disagreements(sb, keys) == []
        assert (await h.verify()).keys == []  # verify agrees: no pair differs
        assert write_count(sb, *m) == 2   # the two retried; the superseded one sent nothing
        assert await h.converge() == 1    # what the retry wrote does not come back as a change
    finally:
        await h.aclose()


async def test_a_lost_echo_memory_never_clears_an_opt_out(sb: Sandbox, keys: list[str], tmp_path: Path) -> None:
    """Issue 12, fault 6, the Kubernetes case: a new pod keeps the cursors (ConfigMap) but not the
    echo memory. A CRM edit of another column then brings the contact back with donotemail false
    and no baseline: the Campaign unsubscribe must stay."""
    import sqlite3

    h = await harness(sb, tmp_path, "CRM_TO_MARKETING")
    try:
        await h.converge()
        k = next(k for k in keys if not crm_row(sb, k)["donotemail"])
        set_campaign(sb, k, blackList=True)
        await h.converge()
        db = sqlite3.connect(str(tmp_path / "worker.db"))
        db.execute("DELETE FROM optinout_known")
        db.commit()
        db.close()
        await h.restart()
        sb.d365.table("contacts").upsert(k, firstname="Edited")
        await h.converge()
        assert profile(sb, k)["blackList"] is True
        assert (await h.verify()).different == [k]  # the unsubscribe is kept, one way: exactly that pair
    finally:
        await h.aclose()
