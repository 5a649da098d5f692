"""The sandbox emulators over real HTTP: every protocol detail a connector relies on."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from syncplane_sandbox import (
    DELTA_TOKEN_EXPIRED_CODE,
    DELTA_TOKEN_EXPIRED_STATUS,
    MARKETING_USER,
    POISON_CODE,
    QUERY_NOT_SUPPORTED_CODE,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    SANDBOX_HEADER,
    Sandbox,
    SandboxOptions,
    SeedSpec,
    ServiceProtectionLimits,
    start_sandbox,
)
from syncplane_sandbox.odata_batch import PartResponse, parse_batch_response
from tests.backends import eventually
from tests.integration.sandbox_fixtures import (
    Clients,
    Op,
    acs_token,
    build_batch,
    change_contacts,
    d365_token,
    open_clients,
    running_sandbox,
)


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with running_sandbox(SeedSpec(contacts=120, loyalty_cards=10, events=30, acs_profiles=5, seed=7)) as sb:
        yield sb


@pytest.fixture
async def clients(sandbox: Sandbox) -> AsyncIterator[Clients]:
    async for c in open_clients(sandbox):
        yield c


def odata_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


def odata_message(r: httpx.Response) -> str:
    return str(r.json()["error"]["message"])


# ============================================================================ Dynamics 365: auth


async def test_d365_token_flow_and_401s(sandbox: Sandbox) -> None:
    async with httpx.AsyncClient() as http:
        form = {"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET,
                "grant_type": "client_credentials", "scope": sandbox.d365_scope}
        r = await http.post(sandbox.d365_token_url, data=form)
        assert r.status_code == 200
        body = r.json()
        assert body["token_type"] == "Bearer" and body["expires_in"] == 3600 and body["access_token"]
        assert r.headers[SANDBOX_HEADER] == "emulator"

        bad = await http.post(sandbox.d365_token_url, data={**form, "client_secret": "wrong"})
        assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"
        assert "wrong" not in bad.text
        unknown = await http.post(sandbox.d365_token_url, data={**form, "client_id": "someone-else"})
        assert unknown.status_code == 401 and unknown.json()["error"] == "invalid_client"
        scope = await http.post(sandbox.d365_token_url, data={**form, "scope": "contacts.read"})
        assert scope.status_code == 400 and scope.json()["error"] == "invalid_scope"

        ok = await http.get(sandbox.d365_url + "WhoAmI", headers={"Authorization": f"Bearer {body['access_token']}"})
        assert ok.status_code == 200 and ok.headers["OData-Version"] == "4.0" and ok.json()["UserId"]
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}):
            r = await http.get(sandbox.d365_url + "contacts", headers=headers)
            assert r.status_code == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.headers[SANDBOX_HEADER] == "emulator"


async def test_d365_token_expires_mid_run(clients: Clients) -> None:
    sb = clients.sb
    assert (await clients.d365("GET", "contacts", prefer="odata.maxpagesize=1")).status_code == 200
    sb.clock.advance(3601)  # the default lifetime is 3600 s
    assert (await clients.d365("GET", "contacts")).status_code == 401
    fresh = await d365_token(clients.http, sb)
    clients.d365_headers["Authorization"] = f"Bearer {fresh}"
    assert (await clients.d365("GET", "contacts", prefer="odata.maxpagesize=1")).status_code == 200

    sb.d365_tokens.lifetime = 5  # short tokens from now on
    r = await clients.http.post(sb.d365_token_url, data={"client_id": SANDBOX_CLIENT_ID, "grant_type":
                                "client_credentials", "client_secret": SANDBOX_CLIENT_SECRET, "scope": sb.d365_scope})
    assert r.json()["expires_in"] == 5

    # forced expiry over the control API
    r = await clients.http.post(sb.d365_origin + "/_sandbox/tokens/expire")
    assert r.status_code == 200 and r.json()["expired"] >= 1
    assert (await clients.d365("GET", "contacts")).status_code == 401


# ============================================================================ Dynamics 365: paging


async def test_d365_paging_next_link_no_loss_no_duplicates(clients: Clients) -> None:
    rows, pages = await clients.read_all("contacts?$select=firstname,lastname,statecode", "odata.maxpagesize=25")
    ids = [r["contactid"] for r in rows]
    assert len(ids) == 120 and len(set(ids)) == 120
    assert set(ids) == set(clients.sb.d365.table("contacts").rows)
    assert [len(p["value"]) for p in pages] == [25, 25, 25, 25, 20]
    assert all("@odata.nextLink" in p for p in pages[:-1]) and "@odata.nextLink" not in pages[-1]
    assert "@odata.deltaLink" not in pages[-1]  # no track-changes asked
    assert set(rows[0]) == {"@odata.etag", "contactid", "firstname", "lastname", "statecode"}
    assert pages[0]["@odata.context"].endswith("$metadata#contacts(firstname,lastname,statecode)")
    # the link is opaque and absolute and keeps $select
    link = pages[0]["@odata.nextLink"]
    assert link.startswith(clients.sb.d365_url + "contacts?") and "$skiptoken=" in link and "$select=" in link
    # inactive rows are there too
    assert {r["statecode"] for r in rows} == {0, 1}


async def test_d365_rows_changing_while_paging_are_not_lost(clients: Clients) -> None:
    table = clients.sb.d365.table("contacts")
    first = await clients.d365("GET", "contacts", prefer="odata.maxpagesize=50")
    seen = {r["contactid"] for r in first.json()["value"]}
    new_id = table.upsert(firstname="Late", lastname="Arrival", emailaddress1="late@example.com")
    victim = next(rid for rid in table.rows if rid not in seen)
    table.delete(victim)
    _, pages = await clients.read_all(first.json()["@odata.nextLink"], "odata.maxpagesize=50")
    for page in pages:
        seen.update(r["contactid"] for r in page["value"])
    assert new_id in seen and victim not in seen and len(seen) == 120


async def test_d365_page_size_cap_default_and_skip_rejected(sandbox: Sandbox) -> None:
    sandbox.seed(SeedSpec(contacts=5200, seed=1))
    async for c in open_clients(sandbox):
        capped = await c.d365("GET", "contacts?$select=contactid", prefer="odata.maxpagesize=9000")
        assert capped.status_code == 200 and len(capped.json()["value"]) == 5000
        assert capped.headers["Preference-Applied"] == "odata.maxpagesize=5000"
        default = await c.d365("GET", "contacts?$select=contactid")
        assert len(default.json()["value"]) == 5000 and "@odata.nextLink" in default.json()
        rest = await c.d365("GET", default.json()["@odata.nextLink"])
        assert len(rest.json()["value"]) == 5320 - 5000 and "@odata.nextLink" not in rest.json()

        forged = await c.d365("GET", "contacts?$skiptoken=bm9wZQ")
        assert forged.status_code == 400
        v3 = await c.d365("GET", "contacts", headers={"OData-Version": "3.0"})
        assert v3.status_code == 400
        skip = await c.d365("GET", "contacts?$skip=10")
        assert skip.status_code == 400 and "$skip" in odata_message(skip)
        unknown = await c.d365("GET", "contacts?$select=nickname")
        assert unknown.status_code == 400 and "nickname" in odata_message(unknown)


# ============================================================================ Dynamics 365: change tracking


async def test_d365_track_changes_and_delta(clients: Clients) -> None:
    sb = clients.sb
    table = sb.d365.table("contacts")
    rows, pages = await clients.read_all("contacts?$select=firstname,modifiedon",
                                         "odata.track-changes, odata.maxpagesize=50")
    assert len(rows) == 120
    assert all("@odata.deltaLink" not in p for p in pages[:-1])
    delta_link = pages[-1]["@odata.deltaLink"]
    assert "$deltatoken=" in delta_link and "$select=firstname" in delta_link
    first = await clients.d365("GET", "contacts", prefer="odata.track-changes, odata.maxpagesize=50")
    assert "odata.track-changes" in first.headers["Preference-Applied"]

    # nothing changed yet
    empty = await clients.d365("GET", delta_link)
    assert empty.status_code == 200 and empty.json()["value"] == []
    assert empty.json()["@odata.deltaLink"]

    ids, created = change_contacts(sb)
    table.upsert(ids[0], firstname="Renamed twice")  # two updates, one entry

    r = await clients.d365("GET", delta_link)
    assert r.status_code == 200
    assert "odata.track-changes" in r.headers["Preference-Applied"]
    body = r.json()
    assert body["@odata.context"].endswith("/$delta")
    value = body["value"]
    changed = [v for v in value if "reason" not in v]
    deleted = [v for v in value if "reason" in v]
    assert value[: len(changed)] == changed, "new/updated rows come before deletions"
    assert {v["contactid"] for v in changed} == {ids[0], ids[1], created}
    assert next(v for v in changed if v["contactid"] == ids[0])["firstname"] == "Renamed twice"
    assert deleted == [{"@odata.context": f"{sb.d365_url}$metadata#contacts/$deletedEntity", "id": ids[2],
                        "reason": "deleted"}]
    modified = next(v for v in changed if v["contactid"] == ids[1])["modifiedon"]
    assert modified == sb.d365.now_text() and modified.endswith("Z")

    # the fresh delta link sees only later changes, including those made over the control API
    again = await clients.d365("GET", body["@odata.deltaLink"])
    assert again.json()["value"] == []
    r = await clients.http.put(f"{sb.d365_origin}/_sandbox/tables/contacts/rows/{ids[3]}", json={"lastname": "Ctl"})
    assert r.status_code == 200 and r.json()["lastname"] == "Ctl"
    assert (await clients.http.delete(f"{sb.d365_origin}/_sandbox/tables/contacts/rows/{ids[4]}")).status_code == 204
    value = (await clients.d365("GET", again.json()["@odata.deltaLink"])).json()["value"]
    assert [(v.get("contactid") or v["id"], "reason" in v) for v in value] == [(ids[3], False), (ids[4], True)]


async def test_d365_delta_is_paged_like_full_reads(clients: Clients) -> None:
    table = clients.sb.d365.table("contacts")
    _, pages = await clients.read_all("contacts", "odata.track-changes")
    link = pages[-1]["@odata.deltaLink"]
    ids = list(table.rows)[:25]
    for rid in ids:
        table.upsert(rid, donotbulkemail=True)
    rows, delta_pages = await clients.read_all(link, "odata.maxpagesize=10")
    assert [len(p["value"]) for p in delta_pages] == [10, 10, 5]
    assert sorted(r["contactid"] for r in rows) == sorted(ids)
    assert "@odata.deltaLink" in delta_pages[-1]
    assert all("@odata.deltaLink" not in p for p in delta_pages[:-1])


async def test_d365_paging_link_variants(clients: Clients) -> None:
    """Each documented-or-seen form of a tracked read's links, switched over the control API:
    no link on the last page, a next link to the page itself, a next link back to the first page."""
    sb, prefer = clients.sb, "odata.track-changes, odata.maxpagesize=50"  # 120 rows: pages of 50, 50, 20
    ctl = f"{sb.d365_origin}/_sandbox/variants/paging"
    bad = await clients.http.put(ctl, json={"default": "sometimes"})
    assert bad.status_code == 400 and "sometimes" in bad.text
    assert (await clients.http.put(ctl, json={"script": ["keep", "keep", "no-link"]})).status_code == 200
    _, pages = await clients.read_all("contacts", prefer)
    assert len(pages) == 3 and not any("@odata.deltaLink" in p or "@odata.nextLink" in p for p in pages[2:])

    await clients.http.put(ctl, json={"script": ["keep", "repeat"]})
    first = (await clients.d365("GET", "contacts", prefer=prefer)).json()
    second_url = first["@odata.nextLink"]
    second = (await clients.d365("GET", second_url, prefer=prefer)).json()
    assert second["@odata.nextLink"] == second_url

    await clients.http.put(ctl, json={"script": ["loop"]})
    looped = (await clients.d365("GET", "contacts?$select=firstname", prefer=prefer)).json()
    again = (await clients.d365("GET", looped["@odata.nextLink"], prefer=prefer)).json()
    assert [r["contactid"] for r in again["value"]] == [r["contactid"] for r in looped["value"]]

    # a delta read too; then back to the documented shape
    await clients.http.delete(f"{sb.d365_origin}/_sandbox/variants")
    _, pages = await clients.read_all("contacts", prefer)
    await clients.http.put(ctl, json={"default": "no-link"})
    delta = (await clients.d365("GET", pages[-1]["@odata.deltaLink"], prefer=prefer)).json()
    assert "@odata.deltaLink" not in delta and "@odata.nextLink" not in delta
    assert (await clients.http.get(f"{sb.d365_origin}/_sandbox/variants")).json()["paging"]["default"] == "no-link"


@pytest.mark.parametrize("option", ["$filter=statecode eq 0", "$orderby=lastname", "$expand=parentcustomerid",
                                    "$top=5"])
async def test_d365_track_changes_forbids_query_options(clients: Clients, option: str) -> None:
    r = await clients.d365("GET", f"contacts?{option}", prefer="odata.track-changes")
    assert r.status_code == 400
    assert odata_code(r) == QUERY_NOT_SUPPORTED_CODE
    assert option.split("=")[0] in odata_message(r)


async def test_d365_filter_and_top_without_track_changes(clients: Clients) -> None:
    r = await clients.d365("GET", "contacts?$select=statecode&$filter=statecode eq 1&$count=true")
    body = r.json()
    assert r.status_code == 200 and body["value"] and all(v["statecode"] == 1 for v in body["value"])
    assert body["@odata.count"] == len(body["value"])
    top = await clients.d365("GET", "contacts?$top=30", prefer="odata.maxpagesize=20")
    rows, _ = await clients.read_all(top.json()["@odata.nextLink"], "odata.maxpagesize=20")
    assert len(top.json()["value"]) + len(rows) == 30


async def test_d365_expired_delta_token(clients: Clients) -> None:
    sb = clients.sb
    _, pages = await clients.read_all("contacts", "odata.track-changes")
    link = pages[-1]["@odata.deltaLink"]
    sb.expire_delta_tokens()
    r = await clients.d365("GET", link)
    assert r.status_code == DELTA_TOKEN_EXPIRED_STATUS == 400
    assert odata_code(r) == DELTA_TOKEN_EXPIRED_CODE and "expired" in odata_message(r)

    # a full resync gives a working token again; it expires by age after 7 days
    _, pages = await clients.read_all("contacts", "odata.track-changes")
    link = pages[-1]["@odata.deltaLink"]
    assert (await clients.d365("GET", link)).status_code == 200
    sb.clock.advance(7 * 24 * 3600 + 60)
    await clients.d365("GET", "WhoAmI")  # token lifetime is 1 h: refresh it
    clients.d365_headers["Authorization"] = f"Bearer {await d365_token(clients.http, sb)}"
    r = await clients.d365("GET", link)
    assert r.status_code == 400 and odata_code(r) == DELTA_TOKEN_EXPIRED_CODE

    # and over the control API
    _, pages = await clients.read_all("contacts", "odata.track-changes")
    link = pages[-1]["@odata.deltaLink"]
    assert (await clients.http.post(sb.d365_origin + "/_sandbox/delta-tokens/expire")).status_code == 200
    assert odata_code(await clients.d365("GET", link)) == DELTA_TOKEN_EXPIRED_CODE


async def test_d365_change_tracking_disabled(clients: Clients) -> None:
    r = await clients.http.put(clients.sb.d365_origin + "/_sandbox/tables/new_loyaltycards/change-tracking",
                               json={"enabled": False})
    assert r.status_code == 200
    r = await clients.d365("GET", "new_loyaltycards", prefer="odata.track-changes")
    assert r.status_code == 400 and "Change tracking" in odata_message(r)
    meta = await clients.d365("GET", "EntityDefinitions(LogicalName='new_loyaltycard')")
    assert meta.json()["ChangeTrackingEnabled"] is False


# ============================================================================ Dynamics 365: writes


async def test_d365_patch_upsert_semantics(clients: Clients) -> None:
    sb = clients.sb
    table = sb.d365.table("contacts")
    rid = str(uuid.uuid4())
    # If-Match: * = update only → 404 when absent
    r = await clients.d365("PATCH", f"contacts({rid})", json={"firstname": "A"}, headers={"If-Match": "*"})
    assert r.status_code == 404 and rid not in table.rows
    # plain PATCH creates
    r = await clients.d365("PATCH", f"contacts({rid})", json={"firstname": "Ada", "lastname": "Lovelace"})
    assert r.status_code == 204 and r.headers["OData-EntityId"] == f"{sb.d365_url}contacts({rid})"
    assert table.rows[rid]["firstname"] == "Ada"
    created_on = table.rows[rid]["modifiedon"]
    # If-None-Match: * = create only → 412 when present
    r = await clients.d365("PATCH", f"contacts({rid})", json={"firstname": "X"}, headers={"If-None-Match": "*"})
    assert r.status_code == 412 and table.rows[rid]["firstname"] == "Ada"
    # If-Match: * updates (merge: lastname kept), modifiedon moves
    sb.clock.advance(5)
    r = await clients.d365("PATCH", f"contacts({rid})", json={"firstname": "Augusta"}, headers={"If-Match": "*"})
    assert r.status_code == 204
    assert table.rows[rid]["firstname"] == "Augusta" and table.rows[rid]["lastname"] == "Lovelace"
    assert table.rows[rid]["modifiedon"] > created_on
    # If-None-Match: * on a new id creates
    other = str(uuid.uuid4())
    r = await clients.d365("PATCH", f"contacts({other})", json={"lastname": "Hopper"}, headers={"If-None-Match": "*"})
    assert r.status_code == 204 and other in table.rows
    # GET one, with an etag; optimistic concurrency with it
    got = await clients.d365("GET", f"contacts({rid})?$select=firstname")
    assert got.status_code == 200 and got.json()["firstname"] == "Augusta" and got.json()["contactid"] == rid
    etag = got.json()["@odata.etag"]
    stale = await clients.d365("PATCH", f"contacts({rid})", json={"firstname": "B"}, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412
    fresh = await clients.d365("PATCH", f"contacts({rid})", json={"firstname": "B"}, headers={"If-Match": etag})
    assert fresh.status_code == 204
    # representation on request
    rep = await clients.d365("PATCH", f"contacts({rid})", json={"lastname": "King"}, prefer="return=representation")
    assert rep.status_code == 200 and rep.json()["lastname"] == "King"
    # DELETE, then 404s
    assert (await clients.d365("DELETE", f"contacts({rid})")).status_code == 204
    assert (await clients.d365("DELETE", f"contacts({rid})")).status_code == 404
    missing = await clients.d365("GET", f"contacts({rid})")
    assert missing.status_code == 404 and rid in odata_message(missing)
    # POST creates with a generated id
    post = await clients.d365("POST", "contacts", json={"lastname": "Posted"})
    assert post.status_code == 204
    new_id = re.search(r"\(([0-9a-f-]{36})\)", post.headers["OData-EntityId"]).group(1)  # type: ignore[union-attr]
    assert table.rows[new_id]["lastname"] == "Posted"


async def test_d365_alternate_key_addressing(clients: Clients) -> None:
    table = clients.sb.d365.table("contacts")
    r = await clients.d365("PATCH", "contacts(emailaddress1='o''brien@example.com')", json={"lastname": "O'Brien"})
    assert r.status_code == 204
    rid = table.find_by_key({"emailaddress1": "o'brien@example.com"})
    assert rid is not None and table.rows[rid]["lastname"] == "O'Brien"
    assert r.headers["OData-EntityId"].endswith(f"contacts({rid})")
    # same key again updates the same row
    r = await clients.d365("PATCH", "contacts(emailaddress1='o''brien@example.com')", json={"firstname": "Pat"})
    assert r.status_code == 204 and table.rows[rid]["firstname"] == "Pat" and len(table) == 121
    got = await clients.d365("GET", "contacts(emailaddress1='o''brien@example.com')")
    assert got.status_code == 200 and got.json()["contactid"] == rid
    # If-Match on a missing key → 404; a key no alternate key defines → 400
    r = await clients.d365("PATCH", "contacts(emailaddress1='nobody@example.com')", json={"firstname": "N"},
                           headers={"If-Match": "*"})
    assert r.status_code == 404
    r = await clients.d365("PATCH", "contacts(lastname='Smith')", json={"firstname": "N"})
    assert r.status_code == 400
    # writing a duplicate alternate-key value onto another row → 412
    other = next(iter(table.rows))
    r = await clients.d365("PATCH", f"contacts({other})", json={"emailaddress1": "O'Brien@example.com"})
    assert r.status_code == 412


async def test_d365_validation_errors_name_the_column(clients: Clients) -> None:
    rid = str(uuid.uuid4())
    r = await clients.d365("PATCH", f"contacts({rid})", json={"nickname": "x"})
    assert r.status_code == 400 and "nickname" in odata_message(r)
    r = await clients.d365("PATCH", f"contacts({rid})", json={"lastname": "x" * 51})
    assert r.status_code == 400 and "'lastname'" in odata_message(r) and "50" in odata_message(r)
    r = await clients.d365("PATCH", f"contacts({rid})", json={"emailaddress1": "e" * 101})
    assert r.status_code == 400 and "emailaddress1" in odata_message(r)
    r = await clients.d365("PATCH", f"contacts({rid})", json={"donotemail": "yes"})
    assert r.status_code == 400 and "donotemail" in odata_message(r)
    r = await clients.d365("PATCH", f"contacts({rid})", json={"statecode": 7})
    assert r.status_code == 400 and "statecode" in odata_message(r)
    assert rid not in clients.sb.d365.table("contacts").rows
    r = await clients.d365("PATCH", "contacts(not-a-guid)", json={"lastname": "x"})
    assert r.status_code == 400


async def test_d365_poison_records(clients: Clients) -> None:
    sb = clients.sb
    bad, good = str(uuid.uuid4()), str(uuid.uuid4())
    sb.d365.poison_keys("contacts", bad, "poison@example.com")
    r = await clients.d365("PATCH", f"contacts({bad})", json={"lastname": "X"})
    assert r.status_code == 400 and odata_code(r) == POISON_CODE
    r = await clients.d365("PATCH", "contacts(emailaddress1='poison@example.com')", json={"lastname": "X"})
    assert r.status_code == 400 and odata_code(r) == POISON_CODE
    assert (await clients.d365("PATCH", f"contacts({good})", json={"lastname": "Y"})).status_code == 204
    # over HTTP too
    r = await clients.http.put(sb.d365_origin + "/_sandbox/poison", json={"table": "contacts", "keys": [good]})
    assert r.status_code == 200
    assert (await clients.d365("PATCH", f"contacts({good})", json={"lastname": "Z"})).status_code == 400
    await clients.http.delete(sb.d365_origin + "/_sandbox/poison")
    assert (await clients.d365("PATCH", f"contacts({good})", json={"lastname": "Z"})).status_code == 204


async def test_d365_lookup_binding_on_activity_table(clients: Clients) -> None:
    contact = next(iter(clients.sb.d365.table("contacts").rows))
    body = {"subject": "OP0001 DM000101", "new_eventtype": "click",
            "regardingobjectid_contact@odata.bind": f"/contacts({contact})",
            "new_eventdate": "2024-05-01T10:00:00Z", "new_trackingurl": "https://t.example.com/x"}
    r = await clients.d365("PATCH", "new_emailevents(new_eventid='evt-1')", json=body)
    assert r.status_code == 204
    again = await clients.d365("PATCH", "new_emailevents(new_eventid='evt-1')", json=body)  # idempotent by event id
    assert again.status_code == 204 and len(clients.sb.d365.table("new_emailevents")) == 1
    got = await clients.d365("GET", "new_emailevents(new_eventid='evt-1')")
    assert got.json()["_regardingobjectid_value"] == contact and got.json()["subject"] == "OP0001 DM000101"
    missing = {**body, "regardingobjectid_contact@odata.bind": f"/contacts({uuid.uuid4()})"}
    r = await clients.d365("PATCH", "new_emailevents(new_eventid='evt-2')", json=missing)
    assert r.status_code == 404


# ============================================================================ Dynamics 365: $batch


async def _batch(clients: Clients, items: list[Op | list[Op]], prefer: str | None = None,
                 ) -> tuple[httpx.Response, list[PartResponse | list[PartResponse]]]:
    ctype, body = build_batch(items)
    r = await clients.d365("POST", "$batch", prefer=prefer, content=body, headers={"Content-Type": ctype})
    assert r.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    return r, parse_batch_response(r.headers["Content-Type"], r.content)


async def test_d365_batch_change_set_and_get(clients: Clients) -> None:
    sb = clients.sb
    table = sb.d365.table("contacts")
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    existing = next(iter(table.rows))
    r, parts = await _batch(clients, [
        [Op("PATCH", f"{sb.d365_url}contacts({a})", {"lastname": "Alpha"}, "1"),
         Op("PATCH", f"/api/data/v9.2/contacts({b})", {"lastname": "Beta"}, "2"),
         Op("POST", "contacts", {"lastname": "Gamma"}, "3"),
         Op("PATCH", "$3", {"firstname": "Via reference"}, "4")],
        Op("GET", f"{sb.d365_url}contacts({existing})?$select=lastname", headers={"Accept": "application/json"}),
    ])
    assert r.status_code == 200
    changeset, get = parts
    assert isinstance(changeset, list) and isinstance(get, PartResponse)
    assert [p.status for p in changeset] == [204, 204, 204, 204]
    assert [p.content_id for p in changeset] == ["1", "2", "3", "4"]
    assert changeset[0].headers["odata-entityid"].endswith(f"contacts({a})")
    gamma = changeset[2].headers["odata-entityid"].rsplit("(", 1)[1].rstrip(")")
    assert table.rows[gamma]["firstname"] == "Via reference"
    assert table.rows[a]["lastname"] == "Alpha" and table.rows[b]["lastname"] == "Beta"
    assert get.status == 200 and b'"lastname"' in get.body


async def test_d365_batch_change_set_is_atomic(clients: Clients) -> None:
    table = clients.sb.d365.table("contacts")
    before = len(table)
    _, pages = await clients.read_all("contacts", "odata.track-changes")
    delta = pages[-1]["@odata.deltaLink"]
    existing = next(iter(table.rows))
    old_name = table.rows[existing]["lastname"]
    a = str(uuid.uuid4())
    r, parts = await _batch(clients, [[
        Op("PATCH", f"contacts({a})", {"lastname": "Rolled back"}, "1"),
        Op("PATCH", f"contacts({existing})", {"lastname": "Also rolled back"}, "2"),
        Op("PATCH", f"contacts({uuid.uuid4()})", {"lastname": "x" * 60}, "3"),
    ]])
    assert r.status_code == 400
    assert len(parts) == 1 and isinstance(parts[0], PartResponse)
    assert parts[0].status == 400 and parts[0].content_id == "3" and b"lastname" in parts[0].body
    assert a not in table.rows and len(table) == before and table.rows[existing]["lastname"] == old_name
    assert (await clients.d365("GET", delta)).json()["value"] == [], "a rolled-back change set leaves no changes"


async def test_d365_batch_stops_at_first_error_without_continue_on_error(clients: Clients) -> None:
    table = clients.sb.d365.table("contacts")
    ids = [str(uuid.uuid4()) for _ in range(3)]
    ops: list[Op | list[Op]] = [
        Op("PATCH", f"contacts({ids[0]})", {"lastname": "One"}),
        Op("PATCH", f"contacts({ids[1]})", {"unknowncolumn": 1}),
        Op("PATCH", f"contacts({ids[2]})", {"lastname": "Three"}),
    ]
    r, parts = await _batch(clients, ops)
    assert r.status_code == 400
    assert [p.status for p in parts if isinstance(p, PartResponse)] == [204, 400]
    assert ids[0] in table.rows and ids[2] not in table.rows

    ids2 = [str(uuid.uuid4()) for _ in range(3)]
    ops = [Op("PATCH", f"contacts({ids2[0]})", {"lastname": "One"}),
           Op("PATCH", f"contacts({ids2[1]})", {"unknowncolumn": 1}),
           [Op("PATCH", f"contacts({ids2[2]})", {"lastname": "Three"}, "9")]]
    r, parts = await _batch(clients, ops, prefer="odata.continue-on-error")
    assert r.status_code == 200 and r.headers["Preference-Applied"] == "odata.continue-on-error"
    assert isinstance(parts[1], PartResponse) and parts[1].status == 400 and b"unknowncolumn" in parts[1].body
    assert isinstance(parts[2], list) and parts[2][0].status == 204
    assert ids2[0] in table.rows and ids2[1] not in table.rows and ids2[2] in table.rows


@pytest.mark.parametrize(("form", "status", "answered"), [("honour", 200, 3), ("ignore-400", 400, 2),
                                                         ("ignore-200", 200, 2)])
async def test_d365_batch_continue_on_error_variants(clients: Clients, form: str, status: int, answered: int) -> None:
    """The switch makes the service honour continue-on-error or not (stopping at the first failure,
    answering 400 as Dataverse does or 200 as OData 4.0 allows); Content-IDs echoed or not."""
    sb = clients.sb
    ctl = f"{sb.d365_origin}/_sandbox/variants/batch"
    assert (await clients.http.put(ctl, json={"continue_on_error": "sometimes"})).status_code == 400
    r = await clients.http.put(ctl, json={"continue_on_error": form, "content_ids": False})
    assert r.status_code == 200 and r.json()["batch"] == {"continue_on_error": form, "content_ids": False}
    ids = [str(uuid.uuid4()) for _ in range(3)]
    ops: list[Op | list[Op]] = [Op("PATCH", f"contacts({ids[0]})", {"lastname": "One"}, "1"),
                                Op("PATCH", f"contacts({ids[1]})", {"unknowncolumn": 1}, "2"),
                                Op("PATCH", f"contacts({ids[2]})", {"lastname": "Three"}, "3")]
    r, parts = await _batch(clients, ops, prefer="odata.continue-on-error")
    assert r.status_code == status and len(parts) == answered
    assert all(isinstance(p, PartResponse) and p.content_id is None for p in parts)
    assert (ids[2] in sb.d365.table("contacts").rows) == (answered == 3)
    assert ("Preference-Applied" in r.headers) == (form == "honour")


async def test_d365_batch_limits_and_format_errors(clients: Clients) -> None:
    ops: list[Op | list[Op]] = [Op("PATCH", f"contacts({uuid.uuid4()})", {"lastname": "n"}) for _ in range(1001)]
    ctype, body = build_batch(ops)
    r = await clients.d365("POST", "$batch", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 400 and "1000" in odata_message(r)
    assert len(clients.sb.d365.table("contacts")) == 120

    r, parts = await _batch(clients, [Op("PATCH", f"contacts({uuid.uuid4()})", {"lastname": "n"})
                                      for _ in range(1000)])
    assert r.status_code == 200 and len(parts) == 1000

    r = await clients.d365("POST", "$batch", content=b"garbage", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    r, parts = await _batch(clients, [[Op("GET", "contacts")]])
    assert isinstance(parts[0], PartResponse) and parts[0].status == 400


# ============================================================================ Dynamics 365: throttling


async def test_d365_service_protection_429_with_retry_after() -> None:
    limits = ServiceProtectionLimits(max_requests=5, window_s=300, max_concurrent=None)
    sb = await start_sandbox(options=SandboxOptions(d365_limits=limits))
    try:
        async for c in open_clients(sb):
            statuses = [(await c.d365("GET", "WhoAmI")).status_code for _ in range(5)]
            assert statuses == [200] * 5
            r = await c.d365("GET", "WhoAmI")
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert odata_code(r) == "0x80072322" and "6000" not in odata_message(r)
            # the token endpoint is not throttled, another client has its own budget
            sb.d365_tokens.add_client("second-app", "second-secret")
            other = await d365_token(c.http, sb, "second-app", "second-secret")
            ok = await c.http.get(sb.d365_url + "WhoAmI", headers={"Authorization": f"Bearer {other}"})
            assert ok.status_code == 200
            # the window slides
            sb.clock.advance(301)
            assert (await c.d365("GET", "WhoAmI")).status_code == 200
            rec = [x for x in sb.requests.records(server="d365") if x.status == 429]
            assert rec and rec[0].retry_after is not None and rec[0].client == SANDBOX_CLIENT_ID
            assert rec[0].fault == "service-protection"
    finally:
        await sb.stop()


async def test_d365_concurrency_limit() -> None:
    limits = ServiceProtectionLimits(max_requests=None, max_concurrent=2)
    sb = await start_sandbox(options=SandboxOptions(d365_limits=limits))
    try:
        async for c in open_clients(sb):
            sb.faults.d365.set(latency_ms=600)
            results = await asyncio.gather(*(c.d365("GET", "WhoAmI") for _ in range(4)))
            codes = Counter(r.status_code for r in results)
            assert codes == {200: 2, 429: 2}
            throttled = next(r for r in results if r.status_code == 429)
            assert odata_code(throttled) == "0x80072326" and throttled.headers["Retry-After"] == "1"
    finally:
        await sb.stop()


# ============================================================================ faults and the request log


async def test_fault_queue_rates_and_determinism(clients: Clients) -> None:
    sb = clients.sb
    sb.faults.d365.queue(429, retry_after=3)
    sb.faults.d365.queue(503)
    first = await clients.d365("GET", "WhoAmI")
    assert first.status_code == 429 and first.headers["Retry-After"] == "3"
    second = await clients.d365("GET", "WhoAmI")
    assert second.status_code == 503 and second.headers["Retry-After"] == "1"
    assert (await clients.d365("GET", "WhoAmI")).status_code == 200

    async def run() -> list[int]:
        return [(await clients.d365("GET", "WhoAmI")).status_code for _ in range(30)]

    sb.faults.d365.set(rate_429=0.3, rate_503=0.2, seed=11)
    one = await run()
    sb.faults.d365.reset()
    sb.faults.d365.set(rate_429=0.3, rate_503=0.2, seed=11)
    two = await run()
    assert one == two and {429, 503, 200} <= set(one)
    sb.faults.d365.reset()

    # over HTTP, on the Campaign emulator
    r = await clients.http.put(sb.acs_origin + "/_sandbox/faults", json={"rate_503": 1.0, "retry_after_s": 2})
    assert r.status_code == 200 and r.json()["config"]["rate_503"] == 1.0
    r = await clients.acs("GET", "profileAndServices/profile")
    assert r.status_code == 503 and r.headers["Retry-After"] == "2" and r.headers[SANDBOX_HEADER] == "emulator"
    await clients.http.delete(sb.acs_origin + "/_sandbox/faults")
    assert (await clients.acs("GET", "profileAndServices/profile")).status_code == 200
    # token endpoints are spared unless asked
    sb.faults.d365.set(rate_429=1.0)
    assert await d365_token(clients.http, sb)
    sb.faults.d365.reset()


async def test_fault_latency_and_timeout(clients: Clients) -> None:
    sb = clients.sb
    sb.faults.d365.set(latency_ms=150)
    await clients.d365("GET", "WhoAmI")
    assert (sb.requests.records(server="d365")[-1].duration_ms or 0) >= 150
    sb.faults.d365.reset()
    sb.faults.d365.set(hang_s=0.5)
    sb.faults.d365.queue(0)
    with pytest.raises((httpx.ReadTimeout, httpx.RemoteProtocolError)):
        await clients.d365("GET", "WhoAmI", timeout=0.2)
    assert (await clients.d365("GET", "WhoAmI")).status_code == 200
    dropped = [r for r in sb.requests.records(server="d365") if r.fault == "timeout"]
    assert len(dropped) == 1 and dropped[0].status in (None, 0)  # None while still hanging, then 0 (dropped)


HOLDS: list[tuple[dict[str, Any], str, str, bool]] = [  # (hold settings, method, path, held)
    ({}, "POST", "profileAndServices/profile", True),                       # a write: held by default
    ({}, "GET", "profileAndServices/profile", False),                       # a read is not
    ({"methods": ["get"]}, "GET", "profileAndServices/profile", True),     # unless asked (any case)
    ({"path_regex": "/service$"}, "POST", "profileAndServices/profile", False),  # another path
    ({"methods": ["POST"]}, "POST", "TOKEN", False),                        # never the token endpoint
]


async def test_a_hold_keeps_matching_requests_until_released(clients: Clients) -> None:
    """The hold switch: what it holds waits (in flight, unanswered) until released, then is served
    as usual; what it does not hold is answered at once meanwhile."""
    sb = clients.sb
    for n, (settings, method, path, held) in enumerate(HOLDS):
        sb.faults.acs.reset()
        sb.faults.acs.hold(**settings)
        if path == "TOKEN":
            assert await asyncio.wait_for(acs_token(clients.http, sb), 30)
            continue
        task = asyncio.ensure_future(clients.acs(method, path, json={"externalId": f"held-{n}"}
                                                 if method == "POST" else None))
        if held:
            await eventually(lambda: _true(sb.faults.acs.held() == 1), f"{method} {path} held ({settings})", 30)
            assert not task.done() and sb.acs_in_flight.now >= 1, "held: unanswered, in flight"
            assert sb.faults.acs.release_held() == 1
        answer = await asyncio.wait_for(task, 30)  # not held: answered while the hold is on
        assert answer.status_code in (200, 201), (settings, answer.text)
        assert sb.faults.acs.held() == 0

    # over HTTP, on the Campaign emulator: PUT sets it (the snapshot shows it), DELETE releases
    r = await clients.http.put(sb.acs_origin + "/_sandbox/faults/hold", json={"methods": ["POST"]})
    assert r.status_code == 200 and r.json()["hold"] == {"path_regex": None, "methods": ["POST"], "waiting": 0}
    task = asyncio.ensure_future(clients.acs("POST", "profileAndServices/profile", json={"externalId": "held-h"}))
    await eventually(lambda: _true(sb.faults.acs.held() == 1), "the POST held", 30)
    r = await clients.http.delete(sb.acs_origin + "/_sandbox/faults/hold")
    assert r.status_code == 200 and r.json()["released"] == 1 and r.json()["hold"] is None
    assert (await asyncio.wait_for(task, 30)).status_code == 201
    bad: dict[str, Any]
    for bad in ({"methods": "POST"}, {"methods": []}, {"path_regex": "("}):
        r = await clients.http.put(sb.acs_origin + "/_sandbox/faults/hold", json=bad)
        assert r.status_code == 400 and r.json()["error"], bad


class _Failed(Exception):
    pass


async def test_holding_releases_the_held_requests_however_its_block_ends(clients: Clients) -> None:
    """``with faults.holding():`` holds as :meth:`hold` does, and a block that fails (a test's assertion)
    still releases: the held request is answered and nothing stays held for what comes after."""
    sb = clients.sb
    tasks = []
    with pytest.raises(_Failed), sb.faults.acs.holding():
        tasks.append(asyncio.ensure_future(clients.acs("POST", "profileAndServices/profile",
                                                       json={"externalId": "held-w"})))
        await eventually(lambda: _true(sb.faults.acs.held() == 1), "the POST held", 30)
        raise _Failed
    [task] = tasks
    assert sb.faults.acs.held() == 0 and sb.faults.acs.snapshot()["hold"] is None
    assert (await asyncio.wait_for(task, 30)).status_code == 201


async def _true(value: bool) -> bool:
    return value


async def test_request_log_and_retry_after_violations(clients: Clients) -> None:
    sb = clients.sb
    sb.requests.clear()
    sb.faults.d365.queue(429, retry_after=30)
    r = await clients.d365("GET", "contacts?$select=firstname", prefer="odata.maxpagesize=1")
    assert r.status_code == 429
    await clients.d365("GET", "WhoAmI")  # too early: a violation
    records = sb.requests.records(server="d365")
    assert [(x.method, x.status, x.retry_after) for x in records] == [("GET", 429, 30.0), ("GET", 200, None)]
    assert records[0].path == "/api/data/v9.2/contacts?$select=firstname"
    assert records[0].client == SANDBOX_CLIENT_ID and records[0].received_wall > 0
    responded = records[0].responded_monotonic
    assert responded is not None and records[0].received_monotonic <= responded <= records[1].received_monotonic
    violations = sb.requests.retry_after_violations()
    assert len(violations) == 1 and violations[0][0].seq == records[0].seq and violations[0][1].seq == records[1].seq

    r = await clients.http.get(sb.d365_origin + "/_sandbox/requests")
    body = r.json()
    assert [x["status"] for x in body["requests"]] == [429, 200] and body["retry_after_violations"] == 1
    assert set(body["requests"][0]) >= {"received_monotonic", "received_wall", "method", "path", "status",
                                        "retry_after", "client"}
    since = body["requests"][-1]["seq"]
    await clients.acs("GET", "profileAndServices/profile")
    acs_log = (await clients.http.get(sb.acs_origin + f"/_sandbox/requests?since={since}")).json()["requests"]
    assert [x["server"] for x in acs_log] == ["acs"] and acs_log[0]["client"] == SANDBOX_CLIENT_ID
    # secrets never reach the log
    await d365_token(clients.http, sb)
    assert SANDBOX_CLIENT_SECRET not in (await clients.http.get(sb.d365_origin + "/_sandbox/requests")).text


# ============================================================================ schema changes and metadata


async def test_d365_metadata_and_schema_change(clients: Clients) -> None:
    sb = clients.sb
    r = await clients.d365("GET", "EntityDefinitions(LogicalName='contact')?$expand=Attributes,Keys")
    meta = r.json()
    assert meta["EntitySetName"] == "contacts" and meta["PrimaryIdAttribute"] == "contactid"
    assert meta["ChangeTrackingEnabled"] is True
    attrs = {a["LogicalName"]: a for a in meta["Attributes"]}
    assert attrs["firstname"]["AttributeType"] == "String" and attrs["firstname"]["MaxLength"] == 50
    assert attrs["donotbulkemail"]["AttributeType"] == "Boolean" and attrs["contactid"]["IsPrimaryId"]
    assert meta["Keys"][0]["KeyAttributes"] == ["emailaddress1"]

    sb.d365.table("contacts").rename_column("firstname", "givenname")
    r = await clients.http.post(sb.d365_origin + "/_sandbox/tables/contacts/schema",
                                json={"op": "retype", "column": "donotemail", "type": "Integer"})
    assert r.status_code == 200
    r = await clients.d365("GET", "EntityDefinitions(LogicalName='contact')/Attributes")
    attrs = {a["LogicalName"]: a["AttributeType"] for a in r.json()["value"]}
    assert "firstname" not in attrs and attrs["givenname"] == "String" and attrs["donotemail"] == "Integer"
    r = await clients.d365("GET", "contacts?$select=firstname")
    assert r.status_code == 400 and "firstname" in odata_message(r)
    r = await clients.d365("PATCH", f"contacts({uuid.uuid4()})", json={"firstname": "Ada"})
    assert r.status_code == 400 and "firstname" in odata_message(r)
    r = await clients.d365("PATCH", f"contacts({uuid.uuid4()})", json={"donotemail": True})
    assert r.status_code == 400 and "donotemail" in odata_message(r)
    row = (await clients.d365("GET", "contacts", prefer="odata.maxpagesize=1")).json()["value"][0]
    assert "givenname" in row and "firstname" not in row

    listing = await clients.d365("GET", "EntityDefinitions?$select=LogicalName,EntitySetName")
    assert {e["LogicalName"] for e in listing.json()["value"]} >= {"contact", "new_loyaltycard", "new_emailevent"}
    svc = await clients.d365("GET", "")
    assert {s["name"] for s in svc.json()["value"]} >= {"contacts", "new_loyaltycards", "new_emailevents"}


async def test_acs_schema_change_visible_in_resource_type(clients: Clients) -> None:
    r = await clients.acs("GET", "profileAndServices/resourceType/profile")
    content = r.json()["content"]
    assert content["firstName"] == {"type": "string", "label": "firstName", "readOnly": False, "length": 30}
    assert content["externalId"]["unique"] is True
    r = await clients.http.post(clients.sb.acs_origin + "/_sandbox/resources/profile/schema",
                                json={"op": "rename", "field": "lastName", "to": "surname"})
    assert r.status_code == 200
    content = (await clients.acs("GET", "profileAndServices/resourceType/profile")).json()["content"]
    assert "lastName" not in content and content["surname"]["length"] == 50
    r = await clients.acs("POST", "profileAndServices/profile", json={"externalId": "k1", "lastName": "X"})
    assert r.status_code == 400 and r.json()["field"] == "lastName"


# ============================================================================ Campaign: auth


async def test_acs_token_and_gateway_errors(sandbox: Sandbox) -> None:
    async with httpx.AsyncClient() as http:
        form = {"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET,
                "grant_type": "client_credentials", "scope": "openid"}
        r = await http.post(sandbox.acs_token_url, data=form)
        assert r.status_code == 200
        assert r.json()["token_type"] == "bearer" and r.json()["expires_in"] == 86400
        token = r.json()["access_token"]
        bad = await http.post(sandbox.acs_token_url, data={**form, "client_secret": "nope"})
        assert bad.status_code == 401 and bad.json()["error"] == "invalid_client"

        url = sandbox.acs_url + "profileAndServices/profile"
        ok = await http.get(url, headers={"Authorization": f"Bearer {token}", "X-Api-Key": SANDBOX_CLIENT_ID})
        assert ok.status_code == 200 and ok.headers[SANDBOX_HEADER] == "emulator"
        no_key = await http.get(url, headers={"Authorization": f"Bearer {token}"})
        assert no_key.status_code == 403 and no_key.json()["error_code"] == "403000"
        wrong_key = await http.get(url, headers={"Authorization": f"Bearer {token}", "X-Api-Key": "other"})
        assert wrong_key.status_code == 403 and wrong_key.json()["error_code"] == "403003"
        no_token = await http.get(url, headers={"X-Api-Key": SANDBOX_CLIENT_ID})
        assert no_token.status_code == 401 and no_token.json()["error_code"] == "401013"

        sandbox.clock.advance(24 * 3600 + 1)
        expired = await http.get(url, headers={"Authorization": f"Bearer {token}", "X-Api-Key": SANDBOX_CLIENT_ID})
        assert expired.status_code == 401
        fresh = await acs_token(http, sandbox)
        again = await http.get(url, headers={"Authorization": f"Bearer {fresh}", "X-Api-Key": SANDBOX_CLIENT_ID})
        assert again.status_code == 200


# ============================================================================ Campaign: profiles


async def _acs_read_all(clients: Clients, url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    pages: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        r = await clients.acs("GET", next_url)
        assert r.status_code == 200, r.text
        pages.append(r.json())
        records.extend(r.json()["content"])
        next_url = r.json().get("next", {}).get("href")
    return records, pages


async def test_acs_paging_with_next_href(clients: Clients) -> None:
    for i in range(55):
        clients.sb.acs.profiles.add(externalId=f"ext-{i}", email=f"p{i}@example.com")
    records, pages = await _acs_read_all(clients, "profileAndServices/profile")
    assert [len(p["content"]) for p in pages] == [25, 25, 10]
    assert len({r["PKey"] for r in records}) == 60 and pages[0]["count"]["value"] == 60
    assert pages[0]["next"]["href"].startswith(clients.sb.acs_url + "profileAndServices/profile?")
    records, pages = await _acs_read_all(clients, "profileAndServices/profile?_lineCount=7")
    assert len(pages) == 9 and len({r["PKey"] for r in records}) == 60
    count = await clients.acs("GET", "profileAndServices/profile/_count")
    assert count.json() == {"count": 60}
    bad = await clients.acs("GET", "profileAndServices/profile?_lineCount=zero")
    assert bad.status_code == 400


async def test_acs_force_pagination_for_large_tables(clients: Clients) -> None:
    r = await clients.http.put(clients.sb.acs_origin + "/_sandbox/force-pagination-threshold", json={"rows": 20})
    assert r.status_code == 200
    for i in range(25):
        clients.sb.acs.profiles.add(externalId=f"big-{i}")
    first = await clients.acs("GET", "profileAndServices/profile?_lineCount=10")
    assert first.status_code == 200 and "next" not in first.json() and len(first.json()["content"]) == 10
    records, pages = await _acs_read_all(clients, "profileAndServices/profile?_lineCount=10&_forcePagination=true")
    assert len(records) == 30 and len(pages) == 3
    assert "_forcePagination=true" in pages[0]["next"]["href"]


async def test_acs_profile_crud_by_pkey(clients: Clients) -> None:
    sb = clients.sb
    r = await clients.acs("POST", "profileAndServices/profile",
                          json={"email": "ada@example.com", "firstName": "Ada", "lastName": "Lovelace",
                                "externalId": "crm-1", "blackListEmail": True})
    assert r.status_code == 201
    rec = r.json()
    pkey = rec["PKey"]
    assert pkey.startswith("@") and rec["href"] == f"{sb.acs_url}profileAndServices/profile/{pkey}"
    assert rec["createdBy"] == {"name": SANDBOX_CLIENT_ID} and rec["blackListEmail"] is True
    assert rec["ccpaOptOut"] is False and re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z$", rec["lastModified"])

    got = await clients.acs("GET", f"profileAndServices/profile/{pkey}")
    assert got.status_code == 200 and got.json()["externalId"] == "crm-1"
    patched = await clients.acs("PATCH", f"profileAndServices/profile/{pkey}", json={"firstName": "Augusta"})
    assert patched.status_code == 200 and patched.json()["firstName"] == "Augusta"
    assert patched.json()["lastName"] == "Lovelace" and patched.json()["lastModified"] > rec["lastModified"]
    key_change = await clients.acs("PATCH", f"profileAndServices/profile/{pkey}", json={"PKey": "@other"})
    assert key_change.status_code == 400
    ext = await clients.acs("GET", f"profileAndServicesExt/profile/{pkey}")
    assert ext.status_code == 200

    deleted = await clients.acs("DELETE", f"profileAndServices/profile/{pkey}")
    assert deleted.status_code == 200
    assert (await clients.acs("GET", f"profileAndServices/profile/{pkey}")).status_code == 404
    assert (await clients.acs("PATCH", f"profileAndServices/profile/{pkey}", json={})).status_code == 404


async def test_acs_validation_uniqueness_and_lookup(clients: Clients) -> None:
    r = await clients.acs("POST", "profileAndServices/profile", json={"externalId": "dup", "firstName": "x" * 30})
    assert r.status_code == 201
    dup = await clients.acs("POST", "profileAndServices/profile", json={"externalId": "dup"})
    assert dup.status_code == 409 and dup.json()["field"] == "externalId"
    too_long = await clients.acs("POST", "profileAndServices/profile", json={"externalId": "l", "firstName": "x" * 31})
    assert too_long.status_code == 400 and too_long.json()["field"] == "firstName"
    email = await clients.acs("POST", "profileAndServices/profile", json={"externalId": "e", "email": "e" * 129})
    assert email.status_code == 400 and email.json()["field"] == "email"
    unknown = await clients.acs("POST", "profileAndServices/profile", json={"externalId": "u", "nickname": "n"})
    assert unknown.status_code == 400 and unknown.json()["field"] == "nickname"
    wrong_type = await clients.acs("POST", "profileAndServices/profile", json={"externalId": "w", "blackList": 1})
    assert wrong_type.status_code == 400

    found = await clients.acs("GET", "profileAndServices/profile/byExternalId?externalId_parameter=dup")
    assert found.status_code == 200 and [p["externalId"] for p in found.json()["content"]] == ["dup"]
    none = await clients.acs("GET", "profileAndServices/profile/byExternalId?externalId_parameter=absent")
    assert none.json()["content"] == []

    # records not written by the integration are marked as such
    seeded = [p for p in clients.sb.acs.profiles.rows.values() if p["createdBy"] == MARKETING_USER]
    assert len(seeded) == 5 and all(p["externalId"] is None for p in seeded)

    clients.sb.acs.poison_keys("profile", "bad-ext")
    poisoned = await clients.acs("POST", "profileAndServices/profile", json={"externalId": "bad-ext"})
    assert poisoned.status_code == 400 and poisoned.json()["error_code"] == "SBX-400-POISON"


async def test_acs_custom_resource(clients: Clients) -> None:
    profile = (await clients.acs("POST", "profileAndServices/profile", json={"externalId": "owner"})).json()
    r = await clients.acs("POST", "customResources/cusLoyaltyCard",
                          json={"crmId": "card-1", "cardNumber": "LC1", "points": 10,
                                "profile": {"PKey": profile["PKey"]}})
    assert r.status_code == 201
    card = r.json()
    assert card["profile"]["PKey"] == profile["PKey"] and card["href"].endswith(f"cusLoyaltyCard/{card['PKey']}")
    found = await clients.acs("GET", "customResources/cusLoyaltyCard/byCrmId?crmId_parameter=card-1")
    assert [c["cardNumber"] for c in found.json()["content"]] == ["LC1"]
    orphan = await clients.acs("POST", "customResources/cusLoyaltyCard",
                               json={"crmId": "card-2", "profile": {"PKey": "@missing"}})
    assert orphan.status_code == 404 and orphan.json()["field"] == "profile"
    assert (await clients.acs("POST", "customResources/cusLoyaltyCard", json={"crmId": "card-1"})).status_code == 409
    patched = await clients.acs("PATCH", f"customResources/cusLoyaltyCard/{card['PKey']}", json={"points": 11})
    assert patched.json()["points"] == 11
    records, _ = await _acs_read_all(clients, "customResources/cusLoyaltyCard?_lineCount=1")
    assert len(records) == 1
    assert (await clients.acs("GET", "customResources/cusUnknown")).status_code == 404


async def test_acs_link_delete_forms(clients: Clients) -> None:
    """Deleting a profile: the cards linking to it stay (Campaign's default link behaviour), or
    go with it ("deleting the target record implies deleting records referenced by the link")."""
    async def profile_with_card(n: int) -> tuple[str, str]:
        profile = (await clients.acs("POST", "profileAndServices/profile", json={"externalId": f"p{n}"})).json()
        card = (await clients.acs("POST", "customResources/cusLoyaltyCard",
                                  json={"crmId": f"c{n}", "profile": {"PKey": profile["PKey"]}})).json()
        return profile["PKey"], card["PKey"]

    for n, behaviour, card_stays in ((1, None, True), (2, "cascade", False), (3, "keep", True)):
        if behaviour is not None:
            r = await clients.http.put(clients.sb.acs_origin + "/_sandbox/link-delete", json={"behaviour": behaviour})
            assert r.status_code == 200 and r.json() == {"behaviour": behaviour}
        profile, card = await profile_with_card(n)
        assert (await clients.acs("DELETE", f"profileAndServices/profile/{profile}")).status_code in (200, 204)
        got = await clients.acs("GET", f"customResources/cusLoyaltyCard/{card}")
        assert got.status_code == (200 if card_stays else 404), behaviour
        if card_stays:  # its link still names the deleted profile, which is gone
            assert got.json()["profile"]["PKey"] == profile
            assert (await clients.acs("GET", f"profileAndServices/profile/{profile}")).status_code == 404
    r = await clients.http.put(clients.sb.acs_origin + "/_sandbox/link-delete", json={"behaviour": "orphan"})
    assert r.status_code == 400 and "keep, cascade" in r.json()["error"]


# ============================================================================ Campaign: feeds


async def test_acs_events_feed_incremental_by_last_modified(clients: Clients) -> None:
    sb = clients.sb
    events, pages = await _acs_read_all(
        clients, "events/byLastModified?lastModified_parameter=2000-01-01T00:00:00Z&_lineCount=8")
    assert len(events) == 30 and len(pages) == 4
    stamps = [e["lastModified"] for e in events]
    assert stamps == sorted(stamps) and len(set(stamps)) == 30
    assert {e["eventType"] for e in events} <= {"send", "open", "click", "bounce"}
    for e in events:
        assert e["eventId"] and e["externalId"] in sb.d365.table("contacts").rows
        assert e["campaignId"] and e["campaignName"] and e["deliveryId"] and e["deliveryName"] and e["date"]
        assert e["mirrorPageUrl"] and (e["trackingUrl"] is not None) == (e["eventType"] == "click")
        assert (e["bounceType"] in ("hard", "soft")) == (e["eventType"] == "bounce")

    r = await clients.http.post(sb.acs_origin + "/_sandbox/events/generate", json={"count": 40, "seed": 3})
    assert r.json() == {"generated": 40, "total": 70}
    since = stamps[-1]
    newer, _ = await _acs_read_all(clients, f"events?lastModified_parameter={since}&_lineCount=15")
    assert newer[0]["eventId"] == events[-1]["eventId"], "the bound is inclusive"
    fresh = [e for e in newer if e["eventId"] not in {x["eventId"] for x in events}]
    assert len(fresh) == 40 and len(newer) == 41
    assert Counter(e["eventType"] for e in fresh).keys() >= {"send", "open"}
    bad = await clients.acs("GET", "events/byLastModified?lastModified_parameter=yesterday")
    assert bad.status_code == 400
    assert (await clients.acs("POST", "events", json={"eventId": "x"})).status_code == 405


async def test_acs_profile_opt_out_change_feed(clients: Clients) -> None:
    sb = clients.sb
    profiles = sb.acs.profiles
    pkeys = [profiles.add(externalId=f"opt-{i}") for i in range(3)]
    mark = (await clients.acs("GET", f"profileAndServices/profile/{pkeys[2]}")).json()["lastModified"]
    profiles.set(pkeys[0], blackListEmail=True)  # a marketer opts a profile out in Campaign
    r = await clients.acs("GET", "profileAndServices/profile/byLastModified",
                          params={"lastModified_parameter": mark, "_lineCount": 100})
    content = r.json()["content"]
    assert [p["PKey"] for p in content] == [pkeys[2], pkeys[0]]
    assert content[1]["blackListEmail"] is True and content[1]["lastModified"] > mark


# ============================================================================ seeding and the command line


async def test_seed_is_deterministic_and_realistic() -> None:
    spec = SeedSpec(contacts=2000, seed=5)
    one = await start_sandbox(seed=spec)
    two = await start_sandbox(seed=spec)
    try:
        a, b = one.d365.table("contacts"), two.d365.table("contacts")
        assert list(a.rows) == list(b.rows)
        rows = list(a.rows.values())

        def content(row: dict[str, Any]) -> dict[str, Any]:  # timestamps are relative to the start time
            return {k: v for k, v in row.items() if k not in ("createdon", "modifiedon")}

        assert [content(r) for r in rows] == [content(r) for r in b.rows.values()]
        assert all(r["createdon"] <= r["modifiedon"] for r in rows)
        assert 100 < sum(r["statecode"] == 1 for r in rows) < 300
        long_names = [r for r in rows if len(r["firstname"]) > 30]
        assert long_names and all(len(r["firstname"]) <= 50 for r in long_names)
        assert len({r["emailaddress1"] for r in rows}) == 2000
        assert all(len(r["emailaddress1"]) <= 100 for r in rows)
        async with httpx.AsyncClient() as http:
            r = await http.post(one.d365_origin + "/_sandbox/seed", json={"contacts": 10, "seed": 9})
        assert r.json()["contacts"] == 2010
    finally:
        await one.stop()
        await two.stop()


async def test_command_line_entry_point() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncplane_sandbox", "--d365-port", "0", "--acs-port", "0", "--seed-contacts", "50",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    try:
        banner = ""
        while "SANDBOX EMULATORS" not in banner:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, "the sandbox exited before printing its banner"
            banner = line.decode()
        assert SANDBOX_CLIENT_SECRET not in banner
        d365_url = re.search(r"Dynamics 365 Web API: (\S+)", banner).group(1)  # type: ignore[union-attr]
        token_url = re.search(r"token: (\S+?),", banner).group(1)  # type: ignore[union-attr]
        scope = re.search(r"scope (\S+?)\)", banner).group(1)  # type: ignore[union-attr]
        async with httpx.AsyncClient() as http:
            t = await http.post(token_url, data={"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET,
                                                 "grant_type": "client_credentials", "scope": scope})
            r = await http.get(d365_url + "contacts?$count=true&$select=contactid",
                               headers={"Authorization": f"Bearer {t.json()['access_token']}"})
            assert r.json()["@odata.count"] == 50
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


# ============================================================================ annotations and typed columns

FV = "@OData.Community.Display.V1.FormattedValue"
LLN = "@Microsoft.Dynamics.CRM.lookuplogicalname"


@pytest.mark.parametrize(("prefer", "formatted", "logical"), [
    (None, False, False),
    ('odata.include-annotations="OData.Community.Display.V1.FormattedValue"', True, False),
    ('odata.include-annotations="Microsoft.Dynamics.CRM.lookuplogicalname"', False, True),
    ('odata.include-annotations="OData.Community.Display.V1.FormattedValue,'
     'Microsoft.Dynamics.CRM.lookuplogicalname"', True, True),
    ('odata.include-annotations="*"', True, True),
    ('odata.include-annotations="Microsoft.Dynamics.CRM.*"', False, True),
    ('odata.include-annotations="*,-OData.Community.Display.V1.FormattedValue"', False, True),
    ('odata.include-annotations="-*"', False, False),
])
async def test_annotations_come_only_when_asked(clients: Clients, prefer: str | None, formatted: bool,
                                                logical: bool) -> None:
    """Dataverse returns formatted values and lookup annotations only for the terms the request's
    Prefer odata.include-annotations names (a list, patterns, exclusions), with track-changes too."""
    contacts = clients.sb.d365.table("contacts")
    account = clients.sb.d365.table("accounts").upsert(name="Contoso")
    rid = contacts.upsert(lastname="Typed", preferredcontactmethodcode=2, donotemail=True, creditlimit=1234.5,
                          **{"parentcustomerid_account@odata.bind": f"/accounts({account})"})
    cols = "contactid,preferredcontactmethodcode,donotemail,creditlimit,_parentcustomerid_value"
    prefers = ", ".join(p for p in ("odata.track-changes", prefer) if p)
    r = await clients.d365("GET", f"contacts?$select={cols}", prefer=prefers)
    assert r.status_code == 200, r.text
    row = next(v for v in r.json()["value"] if v["contactid"] == rid)
    assert row["preferredcontactmethodcode"] == 2 and row["_parentcustomerid_value"] == account
    annotated = {k for k in row if "@" in k[1:] and not k.endswith("associatednavigationproperty")}
    want = set()
    if formatted:
        want |= {f"preferredcontactmethodcode{FV}", f"donotemail{FV}", f"creditlimit{FV}",
                 f"_parentcustomerid_value{FV}"}
        assert row[f"preferredcontactmethodcode{FV}"] == "Email" and row[f"donotemail{FV}"] == "Do Not Allow"
        assert row[f"creditlimit{FV}"] == "$1,234.50" and row[f"_parentcustomerid_value{FV}"] == "Contoso"
    if logical:
        want.add(f"_parentcustomerid_value{LLN}")
        assert row[f"_parentcustomerid_value{LLN}"] == "account"
    assert annotated == want
    if prefer and want:
        assert "odata.include-annotations" in r.headers.get("Preference-Applied", "")


async def test_polymorphic_lookups_and_datetime_behaviours_in_the_metadata(clients: Clients) -> None:
    r = await clients.d365("GET", "EntityDefinitions(LogicalName='contact')/Attributes"
                                  "?$select=LogicalName,AttributeType")
    types = {a["LogicalName"]: a["AttributeType"] for a in r.json()["value"]}
    assert types["parentcustomerid"] == "Customer" and types["ownerid"] == "Owner"
    assert types["creditlimit"] == "Money" and types["birthdate"] == "DateTime"
    r = await clients.d365("GET", "EntityDefinitions(LogicalName='contact')/Attributes/"
                                  "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata"
                                  "?$select=LogicalName,DateTimeBehavior")
    behaviours = {a["LogicalName"]: a["DateTimeBehavior"]["Value"] for a in r.json()["value"]}
    assert behaviours["birthdate"] == "DateOnly" and behaviours["anniversary"] == "UserLocal"
    assert behaviours["new_appointmentat"] == "TimeZoneIndependent"
    # DateOnly keeps the date as given; TimeZoneIndependent the wall time; UserLocal converts to UTC.
    rid = clients.sb.d365.table("contacts").upsert(birthdate="1990-05-02",
                                                   new_appointmentat="2024-05-02T09:30:00+02:00",
                                                   lastusedincampaign="2024-05-02T09:30:00+02:00")
    r = await clients.d365("GET", f"contacts({rid})?$select=birthdate,new_appointmentat,lastusedincampaign")
    row = r.json()
    assert row["birthdate"] == "1990-05-02"
    assert row["new_appointmentat"] == "2024-05-02T09:30:00Z"
    assert row["lastusedincampaign"] == "2024-05-02T07:30:00Z"
    # a Customer lookup's value is selected as _<name>_value; the bare name is no property
    r = await clients.d365("GET", "contacts?$select=parentcustomerid")
    assert r.status_code == 400
