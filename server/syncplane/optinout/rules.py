"""Opt-in/out decisions, PURE (no I/O): which value wins, which side is written, what is an echo.

Vocabulary. For one contact (key) and one field pair (Campaign ``blackList*``/``ccpaOptOut``
↔ Dynamics ``donot*``):

* *observed*: the side's value read from its change feed in this pass (``None``: the side
  did not report this record in this pass);
* *known* (the echo memory): the value the sync last knew to be on that side — the value it
  wrote there (once acknowledged) or last observed there;
* a side *changed* the pair when it was observed with a value different from its known one.
  An observation equal to the known value is an **echo** (our own write read back, or an edit
  of some other column of the record) and carries no change.

The decision table, per pair (``BIDIRECTIONAL``):

=============================================  ===========================================
both sides hold the same value                 nothing to write
one side's value unknown (never seen)          the other side's *change* is written to it
no baseline on a side that reports a value     opt-out (True) wins: a guess never opts in
only one side changed                          that side wins (it is the latest edit of the
                                               pair: the other side's value predates the
                                               last sync, whatever its record stamp says)
both changed, to different values             the side modified more recently wins, at
                                               whole-second precision (Dataverse's
                                               ``modifiedon`` has no more); tie → True wins
neither changed (the sides disagree already)   nothing: no news (e.g. a write that was
                                               refused and dead-lettered is not retried
                                               on every unrelated edit)
=============================================  ===========================================

With booleans, "both changed to different values" means the two sides' known values
differed (after a one-way period, a refused write). Changes are detected by value, not by
record stamps: a record stamp moves on any column's edit (ingress rewriting ``firstName``),
and an unrelated edit must never undo an opt-out. A pair flipped and flipped back between
two passes is therefore no change.

One-way modes propagate *changes* of the source side only; the target's own edits are left
alone until the source changes the pair again.

In every mode an opt-in (False) is written to a side only as a change observed on the other
side from a known value (its echo memory holds the value before). A read with no memory of that
side (the first read of a workflow, one deleted and created again, a new pod whose echo memory
was lost) never clears an opt-out: it can only add them. So the rule holds without the memory;
the memory only saves writes (echoes) and lets genuine re-subscriptions through.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

CRM = "crm"
CAMPAIGN = "campaign"


class Direction(enum.Enum):
    DISABLED = "DISABLED"
    CRM_TO_MARKETING = "CRM_TO_MARKETING"
    MARKETING_TO_CRM = "MARKETING_TO_CRM"
    BIDIRECTIONAL = "BIDIRECTIONAL"


@dataclass(frozen=True)
class FieldPair:
    campaign: str  # e.g. blackListEmail
    crm: str       # e.g. donotbulkemail


@dataclass(frozen=True)
class Observed:
    """One side's record as read from its change feed."""

    values: Mapping[str, Any]    # by that side's own field names
    modified: float | None       # epoch seconds (Dataverse modifiedon / Campaign lastModified)


@dataclass
class Plan:
    """What to do for one key. ``to_*``: values to write to that side (empty: no write)."""

    to_crm: dict[str, bool] = field(default_factory=dict)
    to_campaign: dict[str, bool] = field(default_factory=dict)
    crm_echo: bool = False        # CRM reported the record, but none of its pairs changed
    campaign_echo: bool = False
    conflicts: int = 0            # pairs decided by the modification times
    first_sight: int = 0          # pairs decided by "no baseline: opt-out wins"

    @property
    def writes(self) -> bool:
        return bool(self.to_crm or self.to_campaign)


def flag(value: Any) -> bool:
    """An opt-out flag as a boolean: an unset (null) flag is not an opt-out."""
    return bool(value) if value is not None else False


def parse_time(text: str | None) -> float | None:
    """Dataverse ``2024-05-01T12:34:56Z`` and Campaign ``2024-05-01 12:34:56.789Z`` → epoch seconds."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def newer_wins(crm_value: bool, crm_modified: float | None, campaign_value: bool,
               campaign_modified: float | None) -> bool:
    """The conflict rule: the side modified more recently wins; on a tie, opt-out (True) wins.

    Compared at whole seconds, the precision of Dataverse's ``modifiedon``: a Campaign stamp
    of 12:00:00.900 and a Dataverse one of 12:00:00 are a tie, not a Campaign win. An
    unknown stamp is older than any known one."""
    crm_s = math.floor(crm_modified) if crm_modified is not None else None
    acs_s = math.floor(campaign_modified) if campaign_modified is not None else None
    if crm_s == acs_s:
        return crm_value or campaign_value
    if acs_s is None or (crm_s is not None and crm_s > acs_s):
        return crm_value
    return campaign_value


def is_echo(observed: Mapping[str, Any], known: Mapping[str, bool], fields: Sequence[str]) -> bool:
    """True when every paired field of an observation equals what the sync knew (wrote) there."""
    return all(f in known and flag(observed.get(f)) == known[f] for f in fields)


def plan(pairs: Sequence[FieldPair], direction: Direction, crm: Observed | None, campaign: Observed | None,
         crm_known: Mapping[str, bool], campaign_known: Mapping[str, bool]) -> Plan:
    """Decide one key. ``*_known``: the echo memory of each side (by its own field names)."""
    out = Plan()
    if direction == Direction.DISABLED:
        return out
    if crm is not None:
        out.crm_echo = is_echo(crm.values, crm_known, [p.crm for p in pairs])
    if campaign is not None:
        out.campaign_echo = is_echo(campaign.values, campaign_known, [p.campaign for p in pairs])
    for p in pairs:
        d_obs = flag(crm.values.get(p.crm)) if crm is not None else None
        a_obs = flag(campaign.values.get(p.campaign)) if campaign is not None else None
        d_mem, a_mem = crm_known.get(p.crm), campaign_known.get(p.campaign)
        d = d_obs if d_obs is not None else d_mem
        a = a_obs if a_obs is not None else a_mem
        d_changed = d_obs is not None and d_obs != d_mem
        a_changed = a_obs is not None and a_obs != a_mem
        target, value = _decide(direction, d, a, d_obs, a_obs, d_mem, a_mem, d_changed, a_changed, crm, campaign,
                                out)
        if value is False and (a_mem if target == CRM else d_mem) is None:
            # A guess never opts in: with no memory of the source side (a first read, a workflow
            # created again, a new pod without the echo memory), its False is not a change seen
            # after an opt-out, and must not clear one on the other side.
            continue
        if target == CRM and value is not None:
            out.to_crm[p.crm] = value
        elif target == CAMPAIGN and value is not None:
            out.to_campaign[p.campaign] = value
    return out


def _decide(direction: Direction, d: bool | None, a: bool | None, d_obs: bool | None, a_obs: bool | None,
            d_mem: bool | None, a_mem: bool | None, d_changed: bool, a_changed: bool, crm: Observed | None,
            campaign: Observed | None, out: Plan) -> tuple[str | None, bool | None]:
    if d is not None and d == a:
        return None, None
    if direction == Direction.CRM_TO_MARKETING:
        return (CAMPAIGN, d_obs) if d_changed else (None, None)
    if direction == Direction.MARKETING_TO_CRM:
        return (CRM, a_obs) if a_changed else (None, None)
    # BIDIRECTIONAL
    if a is None:
        return (CAMPAIGN, d_obs) if d_changed else (None, None)
    if d is None:
        return (CRM, a_obs) if a_changed else (None, None)
    if (d_obs is not None and d_mem is None) or (a_obs is not None and a_mem is None):
        out.first_sight += 1
        winner = True
    elif d_changed and not a_changed:
        winner = d
    elif a_changed and not d_changed:
        winner = a
    elif not d_changed and not a_changed:
        return None, None  # no news: a disagreement already decided (e.g. a write refused) stays put
    else:
        out.conflicts += 1
        winner = newer_wins(d, crm.modified if crm is not None else None, a,
                            campaign.modified if campaign is not None else None)
    return (CAMPAIGN, winner) if a != winner else (CRM, winner)


def repair_plan(pairs: Sequence[FieldPair], direction: Direction, crm: Mapping[str, Any],
                campaign: Mapping[str, Any]) -> Plan:
    """What ``syncplane verify --repair`` writes for one key whose pairs differ, from both sides'
    current values (by their own field names): the plan of a pass with no memory of either side.
    So opt-out (True) wins, written only in the directions the workflow writes, and a repair never
    clears an opt-out (a Campaign unsubscribe kept by CRM_TO_MARKETING stays, and is reported)."""
    return plan(pairs, direction, Observed(crm, None), Observed(campaign, None), {}, {})


def pairs_of(raw: Sequence[Any]) -> list[FieldPair]:
    """``spec.opt_in_out.field_pairs`` → :class:`FieldPair` (anything with campaign_field/crm_field)."""
    return [FieldPair(str(p.campaign_field), str(p.crm_field)) for p in raw]
