"""The opt-in/out decision table (pure): newer wins each way, a tie goes to opt-out, echoes are
skipped, one-way modes, and properties over random histories."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.optinout.rules import (
    Direction,
    FieldPair,
    Observed,
    flag,
    is_echo,
    newer_wins,
    parse_time,
    plan,
    repair_plan,
)

P = FieldPair("blackList", "donotemail")
PAIRS = [P]
BI = Direction.BIDIRECTIONAL
T0 = 1_700_000_000.0


def crm(v: bool | None, t: float | None = T0) -> Observed:
    return Observed({"donotemail": v, "contactid": "k", "firstname": "x"}, t)


def acs(v: bool | None, t: float | None = T0) -> Observed:
    return Observed({"blackList": v, "externalId": "k"}, t)


def mem_crm(v: bool) -> dict[str, bool]:
    return {"donotemail": v}


def mem_acs(v: bool) -> dict[str, bool]:
    return {"blackList": v}


# ---------------------------------------------------------------------------- the conflict rule


@pytest.mark.parametrize(("crm_v", "crm_t", "acs_v", "acs_t", "winner"), [
    (True, T0 + 10, False, T0, True),      # CRM newer: CRM wins (opt-out)
    (False, T0 + 10, True, T0, False),     # CRM newer: CRM wins (opt-in)
    (True, T0, False, T0 + 10, False),     # Campaign newer: Campaign wins (opt-in)
    (False, T0, True, T0 + 10, True),      # Campaign newer: Campaign wins (opt-out)
    (True, T0, False, T0, True),           # tie: opt-out wins
    (False, T0, True, T0, True),           # tie: opt-out wins
    (False, T0, False, T0, False),
    (False, T0, True, T0 + 0.9, True),     # same whole second (modifiedon has no ms): a tie
    (True, T0 + 0.2, False, T0 + 0.9, True),
    (False, T0 + 1.0, True, T0 + 0.999, False),  # the next second: CRM newer
    (True, None, False, T0, False),        # an unknown stamp is older
    (False, T0, True, None, False),
    (False, None, True, None, True),       # both unknown: a tie
])
def test_newer_wins_and_tie_goes_to_opt_out(crm_v: bool, crm_t: float | None, acs_v: bool, acs_t: float | None,
                                            winner: bool) -> None:
    assert newer_wins(crm_v, crm_t, acs_v, acs_t) is winner


@pytest.mark.parametrize(("crm_t", "acs_t", "crm_value", "want_to_crm", "want_to_acs"), [
    (T0 + 10, T0, True, {}, {"blackList": True}),     # CRM newer: Campaign is written
    (T0, T0 + 10, True, {"donotemail": False}, {}),   # Campaign newer: the CRM is written
    (T0, T0, True, {}, {"blackList": True}),          # tie: opt-out wins, written where it is missing
    (T0, T0, False, {"donotemail": True}, {}),
])
def test_plan_both_changed_is_a_conflict(crm_t: float, acs_t: float, crm_value: bool,
                                          want_to_crm: dict[str, bool], want_to_acs: dict[str, bool]) -> None:
    # The two sides' known values differ (e.g. after a one-way period); both changed since.
    p = plan(PAIRS, BI, crm(crm_value, crm_t), acs(not crm_value, acs_t), mem_crm(not crm_value),
             mem_acs(crm_value))
    assert p.to_crm == want_to_crm and p.to_campaign == want_to_acs
    assert p.conflicts == 1


# ---------------------------------------------------------------------------- one side changed


@pytest.mark.parametrize("value", [True, False])
def test_only_crm_changed_wins_whatever_the_stamps(value: bool) -> None:
    # Campaign's record is newer (an unrelated edit: ingress wrote firstName) but its pair did not change
    p = plan(PAIRS, BI, crm(value, T0), acs(not value, T0 + 100), mem_crm(not value), mem_acs(not value))
    assert p.to_campaign == {"blackList": value} and p.to_crm == {}
    assert p.campaign_echo and not p.crm_echo and p.conflicts == 0


@pytest.mark.parametrize("value", [True, False])
def test_only_campaign_changed_wins_whatever_the_stamps(value: bool) -> None:
    p = plan(PAIRS, BI, crm(not value, T0 + 100), acs(value, T0), mem_crm(not value), mem_acs(not value))
    assert p.to_crm == {"donotemail": value} and p.to_campaign == {}


def test_change_on_one_side_other_side_not_reported() -> None:
    p = plan(PAIRS, BI, crm(True), None, mem_crm(False), mem_acs(False))
    assert p.to_campaign == {"blackList": True}
    p = plan(PAIRS, BI, None, acs(True), mem_crm(False), mem_acs(False))
    assert p.to_crm == {"donotemail": True}


def test_other_side_never_seen_gets_the_change() -> None:
    assert plan(PAIRS, BI, crm(True), None, {}, {}).to_campaign == {"blackList": True}
    assert plan(PAIRS, BI, None, acs(True), {}, {}).to_crm == {"donotemail": True}
    # ... but an opt-in is no change without a baseline: it never clears what the CRM may hold
    assert not plan(PAIRS, BI, None, acs(False), {}, {}).writes


# ---------------------------------------------------------------------------- echoes


@pytest.mark.parametrize("value", [True, False])
def test_echo_of_our_write_is_skipped(value: bool) -> None:
    # we wrote `value` to Campaign; its feed returns the profile with a newer stamp
    p = plan(PAIRS, BI, None, acs(value, T0 + 50), mem_crm(value), mem_acs(value))
    assert not p.writes and p.campaign_echo
    p = plan(PAIRS, BI, crm(value, T0 + 50), None, mem_crm(value), mem_acs(value))
    assert not p.writes and p.crm_echo


def test_echo_does_not_win_against_a_real_change() -> None:
    # we wrote True to Campaign (echo, newer stamp); meanwhile the CRM user opted back in
    p = plan(PAIRS, BI, crm(False, T0), acs(True, T0 + 50), mem_crm(True), mem_acs(True))
    assert p.to_campaign == {"blackList": False} and p.to_crm == {}


def test_is_echo() -> None:
    assert is_echo({"blackList": True, "x": 1}, {"blackList": True}, ["blackList"])
    assert not is_echo({"blackList": False}, {"blackList": True}, ["blackList"])
    assert not is_echo({"blackList": True}, {}, ["blackList"])  # never seen: not an echo
    assert is_echo({"blackList": None}, {"blackList": False}, ["blackList"])  # null = not opted out


def test_same_values_nothing_to_write() -> None:
    for v in (True, False):
        assert not plan(PAIRS, BI, crm(v), acs(v), {}, {}).writes


def test_no_news_leaves_a_known_disagreement() -> None:
    # a refused write (a profile someone else created): retried only on a real change
    p = plan(PAIRS, BI, crm(True, T0 + 9), acs(False, T0), mem_crm(True), mem_acs(False))
    assert not p.writes


# ---------------------------------------------------------------------------- first sight


@pytest.mark.parametrize(("crm_t", "acs_t"), [(T0 + 10, T0), (T0, T0 + 10), (T0, T0)])
def test_no_baseline_opt_out_wins(crm_t: float, acs_t: float) -> None:
    p = plan(PAIRS, BI, crm(True, crm_t), acs(False, acs_t), {}, {})
    assert p.to_campaign == {"blackList": True} and p.first_sight == 1
    p = plan(PAIRS, BI, crm(False, crm_t), acs(True, acs_t), {}, {})
    assert p.to_crm == {"donotemail": True}


def test_new_profile_does_not_undo_a_crm_opt_out() -> None:
    # ingress just created the profile (opt-outs false, newest stamp); the CRM opted out long ago
    p = plan(PAIRS, BI, None, acs(False, T0 + 1000), mem_crm(True), {})
    assert p.to_campaign == {"blackList": True} and p.to_crm == {}


# ---------------------------------------------------------------------------- one-way modes


def test_crm_to_marketing_propagates_crm_changes_only() -> None:
    d = Direction.CRM_TO_MARKETING
    assert plan(PAIRS, d, crm(True), acs(False), mem_crm(False), mem_acs(False)).to_campaign == {"blackList": True}
    p = plan(PAIRS, d, crm(False), acs(True), mem_crm(False), mem_acs(False))  # a marketer's edit
    assert not p.writes
    assert plan(PAIRS, d, crm(True), None, {}, {}).to_campaign == {"blackList": True}  # first run
    assert not plan(PAIRS, d, crm(True), None, mem_crm(False), mem_acs(True)).writes  # already there


def test_marketing_to_crm_propagates_campaign_changes_only() -> None:
    d = Direction.MARKETING_TO_CRM
    assert plan(PAIRS, d, crm(False), acs(True), mem_crm(False), mem_acs(False)).to_crm == {"donotemail": True}
    assert not plan(PAIRS, d, crm(True), acs(False), mem_crm(False), mem_acs(False)).writes
    assert plan(PAIRS, d, None, acs(True), {}, {}).to_crm == {"donotemail": True}  # first run: opt-outs flow
    assert not plan(PAIRS, d, crm(True), acs(False), {}, {}).writes  # ... but never clear one


@settings(max_examples=400, deadline=None)
@given(d=st.one_of(st.none(), st.booleans()), a=st.one_of(st.none(), st.booleans()),
       md=st.one_of(st.none(), st.booleans()), ma=st.one_of(st.none(), st.booleans()),
       td=st.one_of(st.none(), st.floats(min_value=T0, max_value=T0 + 100, allow_nan=False)),
       ta=st.one_of(st.none(), st.floats(min_value=T0, max_value=T0 + 100, allow_nan=False)),
       direction=st.sampled_from(list(Direction)))
def test_a_read_without_memory_of_the_source_never_clears_an_opt_out(
        d: bool | None, a: bool | None, md: bool | None, ma: bool | None, td: float | None, ta: float | None,
        direction: Direction) -> None:
    """Issue 12, fault 6: False reaches a side only as a change seen from a known value."""
    p = plan(PAIRS, direction, crm(d, td) if d is not None else None, acs(a, ta) if a is not None else None,
             {} if md is None else mem_crm(md), {} if ma is None else mem_acs(ma))
    if md is None:
        assert p.to_campaign.get("blackList") is not False
    if ma is None:
        assert p.to_crm.get("donotemail") is not False


def test_disabled_does_nothing() -> None:
    assert not plan(PAIRS, Direction.DISABLED, crm(True), acs(False), {}, {}).writes


def test_several_pairs_are_independent() -> None:
    pairs = [P, FieldPair("blackListEmail", "donotbulkemail")]
    p = plan(pairs, BI, Observed({"donotemail": True, "donotbulkemail": False}, T0),
             Observed({"blackList": False, "blackListEmail": True}, T0),
             {"donotemail": False, "donotbulkemail": False}, {"blackList": False, "blackListEmail": False})
    assert p.to_campaign == {"blackList": True} and p.to_crm == {"donotbulkemail": True}


def test_parse_time_and_flag() -> None:
    assert parse_time("2024-05-01T12:00:00Z") == parse_time("2024-05-01 12:00:00.000Z")
    base = parse_time("2024-05-01T12:00:00Z")
    assert base is not None and parse_time("2024-05-01 12:00:00.900Z") == pytest.approx(base + 0.9)
    assert parse_time(None) is None and parse_time("garbage") is None
    assert flag(None) is False and flag(True) is True


# ---------------------------------------------------------------------------- properties

VALUE = st.booleans()
STAMP = st.one_of(st.none(), st.floats(min_value=T0, max_value=T0 + 100, allow_nan=False))


@settings(max_examples=400, deadline=None)
@given(d=st.one_of(st.none(), VALUE), a=st.one_of(st.none(), VALUE), md=st.one_of(st.none(), VALUE),
       ma=st.one_of(st.none(), VALUE), td=STAMP, ta=STAMP,
       direction=st.sampled_from(list(Direction)))
def test_properties(d: bool | None, a: bool | None, md: bool | None, ma: bool | None, td: float | None,
                    ta: float | None, direction: Direction) -> None:
    c = crm(d, td) if d is not None else None
    m = acs(a, ta) if a is not None else None
    known_crm: dict[str, Any] = {} if md is None else mem_crm(md)
    known_acs: dict[str, Any] = {} if ma is None else mem_acs(ma)
    p = plan(PAIRS, direction, c, m, known_crm, known_acs)
    # a pair is written to at most one side, and only to a side whose value differs
    assert not (p.to_crm and p.to_campaign)
    now_crm = d if d is not None else md
    now_acs = a if a is not None else ma
    if p.to_crm:
        assert direction in (Direction.BIDIRECTIONAL, Direction.MARKETING_TO_CRM)
        assert p.to_crm["donotemail"] != now_crm
    if p.to_campaign:
        assert direction in (Direction.BIDIRECTIONAL, Direction.CRM_TO_MARKETING)
        assert p.to_campaign["blackList"] != now_acs
    # an echo (every reported value equals the memory) never causes a write on its own
    crm_echo_or_absent = c is None or (md is not None and d == md)
    acs_echo_or_absent = m is None or (ma is not None and a == ma)
    if crm_echo_or_absent and acs_echo_or_absent:
        assert not p.writes
    # after the writes, replaying the same observations against the updated memory is a no-op
    if direction != Direction.DISABLED and (c is not None or m is not None):
        new_crm = {**known_crm, **({"donotemail": d} if d is not None else {}), **p.to_crm}
        new_acs = {**known_acs, **({"blackList": a} if a is not None else {}), **p.to_campaign}
        echo_c = crm(new_crm["donotemail"], td) if p.to_crm else None
        echo_a = acs(new_acs["blackList"], ta) if p.to_campaign else None
        assert not plan(PAIRS, direction, echo_c, echo_a, new_crm, new_acs).writes
    # bidirectional: when the sides end up written, both hold the same value, and an opt-out
    # is never lost to a guess: without a baseline a disagreement resolves to True
    if direction == Direction.BIDIRECTIONAL and p.writes:
        final_crm = p.to_crm.get("donotemail", now_crm)
        final_acs = p.to_campaign.get("blackList", now_acs)
        if final_crm is not None and final_acs is not None:
            assert final_crm == final_acs
        if p.first_sight:
            assert True in (p.to_crm.get("donotemail"), p.to_campaign.get("blackList"))


# ---------------------------------------------------------------------------- verify --repair

@pytest.mark.parametrize(("direction", "crm_v", "acs_v", "writes"), [
    # opt-out wins, written only where the workflow writes; an opt-out is never cleared
    (Direction.BIDIRECTIONAL, True, False, ("campaign", True)),
    (Direction.BIDIRECTIONAL, False, True, ("crm", True)),
    (Direction.CRM_TO_MARKETING, True, False, ("campaign", True)),
    (Direction.CRM_TO_MARKETING, False, True, None),  # a Campaign unsubscribe, kept one way: reported only
    (Direction.MARKETING_TO_CRM, False, True, ("crm", True)),
    (Direction.MARKETING_TO_CRM, True, False, None),  # a CRM opt-out, kept one way
    (Direction.DISABLED, True, False, None),
    (Direction.BIDIRECTIONAL, True, True, None),      # no difference: nothing
    (Direction.BIDIRECTIONAL, False, False, None),
])
def test_repair_plan_table(direction: Direction, crm_v: bool, acs_v: bool, writes: tuple[str, bool] | None) -> None:
    p = repair_plan(PAIRS, direction, {"donotemail": crm_v}, {"blackList": acs_v})
    got = (("crm", p.to_crm["donotemail"]) if p.to_crm else ("campaign", p.to_campaign["blackList"])
           if p.to_campaign else None)
    assert got == writes


@given(d=VALUE, a=VALUE, direction=st.sampled_from(list(Direction)))
def test_a_repair_never_clears_an_opt_out_and_leaves_the_pair_equal_or_kept(d: bool, a: bool,
                                                                            direction: Direction) -> None:
    p = repair_plan(PAIRS, direction, {"donotemail": d}, {"blackList": a})
    assert False not in (*p.to_crm.values(), *p.to_campaign.values())
    final_crm, final_acs = p.to_crm.get("donotemail", d), p.to_campaign.get("blackList", a)
    assert final_crm == final_acs or not p.writes
    assert not p.writes or d != a
