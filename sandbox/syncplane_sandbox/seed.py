"""Deterministic seed data: contacts (some inactive, some opted out, some with first
names longer than Campaign's 30 characters), loyalty cards, pre-existing Campaign
profiles not created by the integration, and mixed email events."""

from __future__ import annotations

import functools
import random
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from syncplane_sandbox.acs_state import AcsState, format_acs_time
from syncplane_sandbox.d365_state import D365State, format_datetime, target_key

FIRST_NAMES = ("Ada", "Alan", "Grace", "Linus", "Margaret", "Edsger", "Barbara", "Donald", "Frances", "Ken",
               "Radia", "Dennis", "Katherine", "John", "Hedy", "Tim", "Zoë", "José", "Søren", "Chloé", "Mei",
               "Arjun", "Fatima", "Olusegun", "Björn", "Ana", "Noah", "Lena", "Hiroshi", "Priya")
LAST_NAMES = ("Lovelace", "Turing", "Hopper", "Torvalds", "Hamilton", "Dijkstra", "Liskov", "Knuth", "Allen",
              "Thompson", "Perlman", "Ritchie", "Johnson", "Backus", "Lamarr", "Berners-Lee", "Müller", "García",
              "Kierkegaard", "Dubois", "Wang", "Patel", "Haddad", "Obasanjo", "Lindqvist", "Silva", "Smith",
              "Novak", "Tanaka", "Sharma")
TIERS = ("bronze", "silver", "gold", "platinum")
EVENT_TYPES = (("send", 0.4), ("open", 0.3), ("click", 0.2), ("bounce", 0.1))


@dataclass(frozen=True)
class SeedSpec:
    """What to seed. Everything is derived from ``seed``: the same spec gives the same data."""

    contacts: int = 0
    loyalty_cards: int = 0  # D365 new_loyaltycards rows, each linked to a seeded contact
    events: int = 0  # Campaign email events, referring to seeded contacts' ids as externalId
    acs_profiles: int = 0  # Campaign profiles that exist before the integration (createdBy marketing-user)
    seed: int = 42
    inactive_ratio: float = 0.1
    long_name_ratio: float = 0.02  # first names of 31..50 characters (Campaign firstName holds 30)
    opt_out_ratio: float = 0.05


@functools.lru_cache(maxsize=4096)
def _ascii(text: str) -> str:
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower().replace(" ", "")


def _guid(rng: random.Random) -> str:
    """A random (version 4) GUID from ``rng``."""
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def _stamp_pool(now: float, span: float, size: int = 8192) -> list[str]:
    """Sorted, shared timestamp strings over the last ``span`` seconds (cheap and compact)."""
    step = span / size
    return [format_datetime_ts(now - span + i * step) for i in range(size)]


def _long_first_name(rng: random.Random) -> str:
    parts: list[str] = []
    while len("-".join(parts)) <= 30:
        parts.append(rng.choice(FIRST_NAMES))
    return "-".join(parts)[:50]


def seed_owners_and_accounts(state: D365State, n_accounts: int, rng: random.Random) -> None:
    """What contacts' Owner and Customer lookups point to: users, teams and accounts."""
    if len(state.table("systemusers")):
        return
    state.table("systemusers").bulk_load([{"systemuserid": _guid(rng), "fullname": f"{f} {last}"}
                                          for f, last in zip(FIRST_NAMES[:5], LAST_NAMES[:5], strict=True)])
    state.table("teams").bulk_load([{"teamid": _guid(rng), "name": name} for name in ("Sales", "Marketing")])
    state.table("accounts").bulk_load([{"accountid": _guid(rng), "name": f"{rng.choice(LAST_NAMES)} & Co {i}"}
                                       for i in range(n_accounts)])


def _moment(rng: random.Random, zone: str) -> str:
    return (f"{rng.randrange(2020, 2026)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
            f"T{rng.randrange(0, 24):02d}:{rng.randrange(0, 60):02d}:00{zone}")


def _typed_columns(pools: tuple[list[str], list[str], list[str]], rng: random.Random,
                   earlier: str | None) -> dict[str, Any]:
    """The contact's other typed columns (lookups with the table they point to, each DateTime
    behaviour, Money, Integer, Double, a choice), from their own random stream."""
    users, teams, accounts = pools
    owner_team = rng.random() < 0.2
    row: dict[str, Any] = {
        "ownerid": rng.choice(teams if owner_team else users),
        target_key("ownerid"): "team" if owner_team else "systemuser",
        "preferredcontactmethodcode": 1 if rng.random() < 0.6 else rng.randrange(1, 6),
    }
    r = rng.random()
    if r < 0.3 and accounts:
        row["parentcustomerid"], row[target_key("parentcustomerid")] = rng.choice(accounts), "account"
    elif r < 0.35 and earlier:
        row["parentcustomerid"], row[target_key("parentcustomerid")] = earlier, "contact"
    if rng.random() < 0.4:
        row["birthdate"] = f"{rng.randrange(1940, 2006)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    if rng.random() < 0.1:  # a UserLocal date-only column: midnight of the user's zone, in UTC
        row["anniversary"] = f"{rng.randrange(1990, 2025)}-{rng.randrange(1, 13):02d}-" \
                             f"{rng.randrange(1, 29):02d}T{rng.choice(('22', '23', '00', '05'))}:00:00Z"
    if rng.random() < 0.2:
        row["lastusedincampaign"] = _moment(rng, "Z")
    if rng.random() < 0.05:
        row["new_appointmentat"] = _moment(rng, "Z")  # a wall time: the Z means no zone
    if rng.random() < 0.3:
        row["creditlimit"] = round(rng.uniform(0, 50_000), 2)
    if rng.random() < 0.3:
        row["numberofchildren"] = rng.randrange(0, 6)
    if rng.random() < 0.2:
        row["address1_latitude"] = round(rng.uniform(-90, 90), 6)
    return row


def seed_contacts(state: D365State, n: int, rng: random.Random, spec: SeedSpec | None = None) -> list[str]:
    """Add ``n`` contacts (unique emails); returns their ids."""
    spec = spec or SeedSpec()
    # The typed columns come from a stream of their own: the base columns stay what they were.
    typed = random.Random(spec.seed * 7919 + 1)
    seed_owners_and_accounts(state, max(1, n // 20), typed)
    pools = (list(state.table("systemusers").rows), list(state.table("teams").rows),
             list(state.table("accounts").rows))
    table = state.table("contacts")
    stamps = _stamp_pool(state.clock.time() - 60, 3 * 365 * 86400)
    start = len(table)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        first = _long_first_name(rng) if rng.random() < spec.long_name_ratio else rng.choice(FIRST_NAMES)
        last = rng.choice(LAST_NAMES)
        created = rng.randrange(len(stamps))
        modified = rng.randrange(created, len(stamps))
        opted_out = rng.random() < spec.opt_out_ratio
        rows.append({
            "contactid": _guid(rng),
            "firstname": first,
            "lastname": last,
            "emailaddress1": f"{_ascii(first)[:20]}.{_ascii(last)[:20]}.{start + i}@example.com",
            "donotbulkemail": opted_out,
            "donotemail": opted_out and rng.random() < 0.5,
            "donotphone": rng.random() < 0.1,
            "statecode": 1 if rng.random() < spec.inactive_ratio else 0,
            "createdon": stamps[created],
            "modifiedon": stamps[modified],
        })
        rows[-1].update(_typed_columns(pools, typed, rows[-2]["contactid"] if i else None))
    table.bulk_load(rows)
    return [r["contactid"] for r in rows]


def format_datetime_ts(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def seed_loyalty_cards(state: D365State, n: int, rng: random.Random, contact_ids: Sequence[str]) -> list[str]:
    table = state.table("new_loyaltycards")
    start = len(table)
    now = state.clock.time()
    rows: list[dict[str, Any]] = []
    for i in range(n):
        stamp = format_datetime_ts(now - rng.uniform(0, 365 * 86400))
        rows.append({
            "new_loyaltycardid": _guid(rng),
            "new_cardnumber": f"LC{start + i:010d}",
            "new_tier": rng.choice(TIERS),
            "new_points": rng.randrange(0, 100_000),
            "new_contactid": rng.choice(contact_ids) if contact_ids else None,
            "statecode": 0,
            "createdon": stamp,
            "modifiedon": stamp,
        })
    table.bulk_load(rows)
    return [r["new_loyaltycardid"] for r in rows]


def seed_acs_profiles(acs: AcsState, n: int, rng: random.Random) -> list[str]:
    """Profiles a marketer created in Campaign (no externalId): the integration must not touch them."""
    profiles = acs.profiles
    out = []
    for stamp in acs.reserve_past(n):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        values = {"firstName": first, "lastName": last,
                  "email": f"{_ascii(first)}.{_ascii(last)}.{rng.getrandbits(40):x}@marketing.example.org",
                  "blackListEmail": rng.random() < 0.05}
        out.append(profiles.create(values, ts=stamp))
    return out


def generate_events(acs: AcsState, n: int, rng: random.Random, external_ids: Sequence[str],
                    historical: bool = False) -> int:
    """Append ``n`` mixed send/open/click/bounce events (bounces hard or soft). ``historical``
    stamps them in the recent past (seeding); otherwise ``lastModified`` is now onwards."""
    events = acs.events
    stamps: list[float | None] = list(acs.reserve_past(n)) if historical else [None] * n
    kinds = [k for k, _ in EVENT_TYPES]
    weights = [w for _, w in EVENT_TYPES]
    now = acs.clock.time()
    for i, stamp in enumerate(stamps):
        kind = rng.choices(kinds, weights)[0]
        campaign = rng.randrange(1, 40)
        delivery = campaign * 100 + rng.randrange(1, 5)
        event_id = f"evt-{rng.getrandbits(64):016x}"
        ext = rng.choice(external_ids) if external_ids else _guid(rng)
        when = (stamp if stamp is not None else now) - rng.uniform(0, 3600) - (n - i) * 0.5
        values: dict[str, Any] = {
            "eventId": event_id,
            "eventType": kind,
            "bounceType": (("hard" if rng.random() < 0.6 else "soft") if kind == "bounce" else None),
            "externalId": ext,
            "campaignId": f"OP{campaign:04d}",
            "campaignName": f"Spring newsletter {campaign}",
            "deliveryId": f"DM{delivery:06d}",
            "deliveryName": f"Newsletter wave {delivery}",
            "date": format_acs_time(when),
            "trackingUrl": f"https://t.example.com/r/?id={event_id}&url=https%3A%2F%2Fshop.example.com%2F{campaign}"
                           if kind == "click" else None,
            "mirrorPageUrl": f"https://m.example.com/mirror/{delivery}/{event_id}",
        }
        events.create(values, created_by="campaign", ts=stamp)
    return n


def apply_seed(d365: D365State, acs: AcsState, spec: SeedSpec) -> dict[str, int]:
    rng = random.Random(spec.seed)
    contact_ids = seed_contacts(d365, spec.contacts, rng, spec) if spec.contacts else []
    if spec.loyalty_cards:
        pool = contact_ids or list(d365.table("contacts").rows)
        seed_loyalty_cards(d365, spec.loyalty_cards, rng, pool)
    if spec.acs_profiles:
        seed_acs_profiles(acs, spec.acs_profiles, rng)
    if spec.events:
        pool = contact_ids or list(d365.table("contacts").rows)
        generate_events(acs, spec.events, rng, pool, historical=True)
    return {"contacts": len(d365.table("contacts")), "loyalty_cards": len(d365.table("new_loyaltycards")),
            "acs_profiles": len(acs.profiles), "events": len(acs.events)}
