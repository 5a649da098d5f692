"""The connectors over real HTTP against the sandbox emulators (no mocks)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import pytest

from syncplane.connectors.base import ConnectorError, Page, Record
from syncplane.connectors.campaign import CampaignSink, CampaignSource
from syncplane.connectors.dynamics import DELTA_TOKEN_EXPIRED_CODE, DynamicsSink, DynamicsSource
from syncplane.connectors.http import Credentials, OAuth2ClientCredentials
from syncplane_sandbox import (
    DELTA_TOKEN_EXPIRED_CODE as SANDBOX_DELTA_CODE,
)
from syncplane_sandbox import (
    MARKETING_USER,
    POISON_CODE,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    Sandbox,
    SeedSpec,
)
from tests.integration.sandbox_fixtures import change_contacts, running_sandbox

COLUMNS = ["firstname", "lastname", "emailaddress1", "statecode", "modifiedon"]


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with running_sandbox(SeedSpec(contacts=1234, seed=3)) as sb:
        yield sb


def d365_tokens(sb: Sandbox, secret: str = SANDBOX_CLIENT_SECRET) -> OAuth2ClientCredentials:
    return OAuth2ClientCredentials(sb.d365_token_url, Credentials(SANDBOX_CLIENT_ID, secret, scope=sb.d365_scope))


def acs_tokens(sb: Sandbox, secret: str = SANDBOX_CLIENT_SECRET) -> OAuth2ClientCredentials:
    return OAuth2ClientCredentials(sb.acs_token_url, Credentials(SANDBOX_CLIENT_ID, secret,
                                                                 scope="openid,AdobeID,campaign_sdk",
                                                                 organization=sb.options.org,
                                                                 api_host=sb.acs_origin))


@pytest.fixture
async def source(sandbox: Sandbox) -> AsyncIterator[DynamicsSource]:
    async with (aclosing(d365_tokens(sandbox)) as tokens,
                aclosing(DynamicsSource(sandbox.d365_url, tokens, key_column="contactid", page_size=200)) as src):
        yield src


@pytest.fixture
async def d365_sink(sandbox: Sandbox) -> AsyncIterator[DynamicsSink]:
    async with aclosing(d365_tokens(sandbox)) as tokens, aclosing(DynamicsSink(sandbox.d365_url, tokens)) as sink:
        yield sink


@pytest.fixture
async def acs_sink(sandbox: Sandbox) -> AsyncIterator[CampaignSink]:
    async with (aclosing(acs_tokens(sandbox)) as tokens,
                aclosing(CampaignSink(sandbox.acs_url, tokens, api_key=SANDBOX_CLIENT_ID)) as sink):
        yield sink


async def read_all(src: DynamicsSource, cursor: str | None = None) -> list[Page]:
    return [page async for page in src.pages("contacts", COLUMNS, cursor)]


def keys_of(pages: list[Page]) -> list[str]:
    return [r.key for p in pages for r in p.records]


# ------------------------------------------------------------------------------ Dynamics source


async def test_full_read_across_pages_no_loss_no_duplicates(sandbox: Sandbox, source: DynamicsSource) -> None:
    pages = await read_all(source)
    keys = keys_of(pages)
    assert len(pages) == 7  # 1234 rows / 200
    assert len(keys) == len(set(keys)) == 1234
    assert set(keys) == set(sandbox.d365.table("contacts").rows)
    # every page can be resumed after: inside the full read from its next link, then the delta link
    assert all(p.cursor and p.cursor.startswith("full ") and "$skiptoken=" in p.cursor for p in pages[:-1])
    assert pages[-1].cursor is not None and pages[-1].cursor.startswith("delta ") and "$deltatoken=" in pages[-1].cursor
    assert all(p.full for p in pages)
    assert not any(p.resynced for p in pages)
    first = pages[0].records[0]
    assert set(first.values) >= {"contactid", "firstname", "lastname"} and first.modified
    assert not any(k.startswith("@") for k in first.values)
    requests = [r for r in sandbox.requests.records(server="d365") if "/contacts" in r.path]
    assert all("$filter" not in r.path for r in requests)


async def test_full_read_resumes_mid_load_from_a_page_cursor(sandbox: Sandbox, source: DynamicsSource) -> None:
    first = await read_all(source)
    resumed = await read_all(source, first[2].cursor)  # "crashed" after writing page 3
    assert keys_of(resumed) == keys_of(first[3:])
    assert all(p.full for p in resumed) and resumed[-1].cursor and resumed[-1].cursor.startswith("delta ")


async def test_delta_after_updates_and_deletes(sandbox: Sandbox, source: DynamicsSource) -> None:
    cursor = (await read_all(source))[-1].cursor
    ids, created = change_contacts(sandbox, deleted=2)

    pages = await read_all(source, cursor)
    records = {r.key: r for p in pages for r in p.records}
    assert set(records) == {ids[0], ids[1], ids[2], ids[3], created}
    assert records[ids[0]].values["firstname"] == "Renamed" and not records[ids[0]].deleted
    assert records[created].values["lastname"] == "Person"
    assert records[ids[2]].deleted and records[ids[3]].deleted and records[ids[2]].values == {}
    assert not any(p.resynced for p in pages)
    new_cursor = pages[-1].cursor
    assert new_cursor and new_cursor != cursor

    # nothing changed since: one empty page carrying the next cursor
    again = await read_all(source, new_cursor)
    assert keys_of(again) == [] and again[-1].cursor


async def test_expired_delta_token_triggers_flagged_resync(sandbox: Sandbox, source: DynamicsSource) -> None:
    assert DELTA_TOKEN_EXPIRED_CODE == SANDBOX_DELTA_CODE
    cursor = (await read_all(source))[-1].cursor
    sandbox.expire_delta_tokens()
    pages = await read_all(source, cursor)
    assert pages[0].resynced and not any(p.resynced for p in pages[1:])
    assert len(set(keys_of(pages))) == 1234
    assert pages[-1].cursor and pages[-1].cursor != cursor
    # and the fresh delta link works
    assert keys_of(await read_all(source, pages[-1].cursor)) == []


async def test_token_expires_mid_run(sandbox: Sandbox, source: DynamicsSource) -> None:
    seen: list[str] = []
    async for page in source.pages("contacts", COLUMNS, None):
        seen.extend(r.key for r in page.records)
        sandbox.expire_tokens()  # every token dies after each page
    assert len(seen) == len(set(seen)) == 1234
    assert isinstance(source.tokens, OAuth2ClientCredentials) and source.tokens.fetches >= 7
    statuses = [r.status for r in sandbox.requests.records(server="d365")]
    assert 401 in statuses


async def test_token_refreshed_before_expiry(sandbox: Sandbox) -> None:
    now = [1000.0]
    tokens = OAuth2ClientCredentials(sandbox.d365_token_url, Credentials(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET,
                                                                         scope=sandbox.d365_scope),
                                     clock=lambda: now[0])
    try:
        first = await tokens.token()
        now[0] += 3600 * 0.79
        assert await tokens.token() == first and tokens.fetches == 1
        now[0] += 3600 * 0.02  # past 80 % of expires_in: a new token, before any 401
        assert await tokens.token() != first and tokens.fetches == 2
    finally:
        await tokens.aclose()
    assert all(r.status != 401 for r in sandbox.requests.records(server="d365"))


async def test_bad_credentials_never_leak_the_secret(sandbox: Sandbox) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    d365 = d365_tokens(sandbox, secret)
    acs = acs_tokens(sandbox, secret)
    src = DynamicsSource(sandbox.d365_url, d365, key_column="contactid")
    sink = CampaignSink(sandbox.acs_url, acs, SANDBOX_CLIENT_ID)
    try:
        with pytest.raises(ConnectorError) as d365_error:
            await read_all(src)
        with pytest.raises(ConnectorError) as acs_error:
            await sink.write("profile", "externalId", [Record("x", {"email": "x@example.com"})])
        for info, tokens in ((d365_error, d365), (acs_error, acs)):
            assert info.value.reason == "BAD_CREDENTIALS"
            assert SANDBOX_CLIENT_ID in str(info.value)
            assert secret not in str(info.value) and secret not in repr(info.value)
            assert secret not in repr(tokens.credentials) and secret not in str(tokens.credentials)
    finally:
        for closable in (src, sink, d365, acs):
            await closable.aclose()


# ------------------------------------------------------------------------------ faults


async def test_throttling_and_503s_full_read_and_batch_write(sandbox: Sandbox) -> None:
    tokens = d365_tokens(sandbox)
    source = DynamicsSource(sandbox.d365_url, tokens, key_column="contactid", page_size=50)
    sink = DynamicsSink(sandbox.d365_url, tokens, batch_size=200)
    try:
        sandbox.faults.d365.set(rate_429=0.10, rate_503=0.05, seed=11)
        sandbox.faults.d365.queue(429)  # and make sure both kinds hit at least once
        sandbox.faults.d365.queue(503)
        pages = await read_all(source)
        assert len(keys_of(pages)) == len(set(keys_of(pages))) == 1234

        sandbox.faults.d365.queue(429, path_regex=r"\$batch")
        sandbox.faults.d365.queue(503, path_regex=r"\$batch")
        records = [Record(str(uuid.uuid4()), {"firstname": f"F{i}", "lastname": f"L{i}",
                                              "emailaddress1": f"p{i}@example.com"}) for i in range(2000)]
        result = await sink.write("contacts", "contactid", records)
    finally:
        await source.aclose()
        await sink.aclose()
        await tokens.aclose()
    assert sorted(result.written) == sorted(r.key for r in records) and not result.rejected
    table = sandbox.d365.table("contacts")
    assert all(r.key in table.rows for r in records)
    assert table.rows[records[7].key]["lastname"] == "L7"

    logged = sandbox.requests.records(server="d365")
    statuses = [r.status for r in logged if r.fault is not None]
    assert 429 in statuses and 503 in statuses
    assert any(r.status in (429, 503) and r.path.endswith("$batch") for r in logged)
    assert sandbox.requests.retry_after_violations() == []


async def test_dropped_connections_are_retried_and_4xx_are_not(sandbox: Sandbox, source: DynamicsSource) -> None:
    sandbox.faults.d365.set(hang_s=0.2)
    sandbox.faults.d365.queue(0, count=2, path_regex="/contacts$")  # hang, then drop the connection
    pages = await read_all(source)
    assert len(set(keys_of(pages))) == 1234
    assert sum(1 for r in sandbox.requests.records(server="d365") if r.fault == "timeout") == 2

    before = len(sandbox.requests.records(server="d365"))
    with pytest.raises(ConnectorError) as info:
        await read_all(source)  # fine
        async for _ in source.pages("contacts", ["nickname"], None):
            pass
    assert info.value.reason == "REQUEST_REJECTED" and "nickname" in str(info.value)
    assert len(sandbox.requests.records(server="d365")) - before == 7 + 1  # the bad query was sent once


# ------------------------------------------------------------------------------ Dynamics sink


async def test_batch_upsert_delete_and_poison(sandbox: Sandbox, d365_sink: DynamicsSink) -> None:
    table = sandbox.d365.table("contacts")
    existing = list(table.rows)[:3]
    poison = str(uuid.uuid4())
    sandbox.d365.poison_keys("contacts", poison)
    new = [Record(str(uuid.uuid4()), {"firstname": "Batch", "lastname": str(i)}) for i in range(5)]
    records = [*new, Record(poison, {"lastname": "Poison"}),
               Record(existing[0], {"contactid": existing[0], "lastname": "Updated"}),
               Record(existing[1], deleted=True), Record(str(uuid.uuid4()), deleted=True)]
    result = await d365_sink.write("contacts", "contactid", records)
    assert [r.key for r in result.rejected] == [poison]
    assert result.rejected[0].status == 400 and POISON_CODE in result.rejected[0].error
    assert set(result.written) == {r.key for r in records} - {poison}
    assert table.rows[existing[0]]["lastname"] == "Updated"
    assert existing[1] not in table.rows and poison not in table.rows
    assert all(r.key in table.rows for r in new)
    batches = [r for r in sandbox.requests.records(server="d365") if r.path.endswith("$batch")]
    assert len(batches) == 1


async def test_batches_are_split_at_1000(sandbox: Sandbox, d365_sink: DynamicsSink) -> None:
    records = [Record(str(uuid.uuid4()), {"lastname": f"N{i}"}) for i in range(2500)]
    result = await d365_sink.write("contacts", "contactid", records)
    assert len(result.written) == 2500
    batches = [r for r in sandbox.requests.records(server="d365") if r.path.endswith("$batch")]
    assert len(batches) == 3 and all(r.status == 200 for r in batches)


# ------------------------------------------------------------------------------ Campaign


async def test_campaign_upsert_creates_then_updates_by_external_id(sandbox: Sandbox, acs_sink: CampaignSink) -> None:
    profiles = sandbox.acs.profiles
    before = len(profiles)
    keys = [str(uuid.uuid4()) for _ in range(50)]
    first = await acs_sink.write("profile", "externalId", [
        Record(k, {"email": f"{i}@example.com", "firstName": "Ada", "lastName": f"L{i}"}) for i, k in enumerate(keys)])
    assert sorted(first.written) == sorted(keys) and not first.rejected
    assert len(profiles) == before + 50

    # a fresh sink (no PKey cache) must find the same profiles by externalId
    tokens = acs_tokens(sandbox)
    fresh = CampaignSink(sandbox.acs_url, tokens, api_key=SANDBOX_CLIENT_ID)
    try:
        second = await fresh.write("profile", "externalId", [Record(k, {"firstName": "Grace"}) for k in keys])
    finally:
        await fresh.aclose()
        await tokens.aclose()
    assert sorted(second.written) == sorted(keys)
    assert len(profiles) == before + 50
    for k in keys:
        row = profiles.by_key(k)
        assert row is not None and row["firstName"] == "Grace" and row["createdBy"] != MARKETING_USER
    externals = [r["externalId"] for r in profiles.rows.values() if r.get("externalId") in set(keys)]
    assert len(externals) == len(set(externals)) == 50

    # deletes: present → gone; absent → still "written"
    gone = await acs_sink.write("profile", "externalId", [Record(keys[0], deleted=True),
                                                          Record("never-existed", deleted=True)])
    assert set(gone.written) == {keys[0], "never-existed"} and profiles.by_key(keys[0]) is None


async def test_campaign_poison_rejected_and_conflict_recovered(sandbox: Sandbox, acs_sink: CampaignSink) -> None:
    sandbox.acs.poison_keys("profile", "bad-ext")
    result = await acs_sink.write("profile", "externalId", [
        Record("bad-ext", {"email": "bad@example.com"}), Record("good-ext", {"email": "good@example.com"}),
        Record("long", {"firstName": "x" * 31})])
    assert {r.key for r in result.rejected} == {"bad-ext", "long"}
    assert all(r.status == 400 for r in result.rejected)
    assert result.written == ["good-ext"]
    assert sandbox.acs.profiles.by_key("good-ext") is not None


async def test_campaign_409_on_create_relooks_up_and_patches(sandbox: Sandbox) -> None:
    profiles = sandbox.acs.profiles
    # scripted: the next POST answers 409 (as if someone created it concurrently)
    sandbox.faults.acs.queue(409, path_regex=r"/profile$")
    tokens = acs_tokens(sandbox)
    sinks = [CampaignSink(sandbox.acs_url, tokens, api_key=SANDBOX_CLIENT_ID) for _ in range(2)]
    try:
        result = await sinks[0].write("profile", "externalId", [Record("k-409", {"email": "a@example.com"})])
        assert result.written == ["k-409"] and profiles.by_key("k-409") is not None
        assert any(r.status == 409 for r in sandbox.requests.records(server="acs"))

        # two writers racing on the same keys: slow lookups make both see "absent", then both POST
        sandbox.faults.acs.set(latency_ms=200, path_regex="byExternalId")
        keys = [f"race-{i}" for i in range(20)]
        both = await asyncio.gather(*(s.write("profile", "externalId", [Record(k, {"lastName": f"W{n}"}) for k in keys])
                                      for n, s in enumerate(sinks)))
    finally:
        for sink in sinks:
            await sink.aclose()
        await tokens.aclose()
    for res in both:
        assert sorted(res.written) == sorted(keys) and not res.rejected
    rows = [r for r in profiles.rows.values() if r.get("externalId") in set(keys)]
    assert len(rows) == 20
    assert sum(1 for r in sandbox.requests.records(server="acs") if r.status == 409) > 1


async def test_campaign_never_touches_records_it_did_not_create(sandbox: Sandbox) -> None:
    pkey = sandbox.acs.profiles.add(externalId="marketer-1", email="m@example.com", lastName="Keep")
    tokens = acs_tokens(sandbox)
    sink = CampaignSink(sandbox.acs_url, tokens, api_key=SANDBOX_CLIENT_ID, owner=SANDBOX_CLIENT_ID)
    try:
        result = await sink.write("profile", "externalId", [Record("marketer-1", {"lastName": "Overwritten"}),
                                                            Record("ours", {"lastName": "Ours"})])
        deleted = await sink.write("profile", "externalId", [Record("marketer-1", deleted=True)])
    finally:
        await sink.aclose()
        await tokens.aclose()
    assert result.written == ["ours"] and [(r.key, r.status) for r in result.rejected] == [("marketer-1", 409)]
    assert [r.key for r in deleted.rejected] == ["marketer-1"]
    assert sandbox.acs.profiles.rows[pkey]["lastName"] == "Keep"


async def test_campaign_source_incremental(sandbox: Sandbox, acs_sink: CampaignSink) -> None:
    keys = [f"ext-{i}" for i in range(30)]
    await acs_sink.write("profile", "externalId", [Record(k, {"email": f"{k}@example.com"}) for k in keys])
    tokens = acs_tokens(sandbox)
    src = CampaignSource(sandbox.acs_url, tokens, SANDBOX_CLIENT_ID, key_field="externalId", line_count=7)
    try:
        pages = [p async for p in src.pages("profile", ["email", "externalId"], None)]
        seen = keys_of(pages)
        assert sorted(seen) == sorted(keys) and len(pages) >= 5
        cursor = pages[-1].cursor
        assert cursor is not None
        again = [p async for p in src.pages("profile", ["email"], cursor)]
        assert keys_of(again) == []  # the inclusive boundary is deduplicated
        await acs_sink.write("profile", "externalId", [Record("ext-3", {"firstName": "Changed"})])
        later = [p async for p in src.pages("profile", ["firstName"], again[-1].cursor)]
        changed = [r for p in later for r in p.records]
        assert [r.key for r in changed] == ["ext-3"] and changed[0].values["firstName"] == "Changed"
    finally:
        await src.aclose()
        await tokens.aclose()


# ------------------------------------------------------------------------------ $batch answers, every documented way


BATCH_FORMS = [(form, ids) for form in ("honour", "ignore-400", "ignore-200") for ids in (True, False)]


@pytest.mark.parametrize(("form", "content_ids"), BATCH_FORMS)
@pytest.mark.parametrize("poisoned", [[2], [0, 4], [1, 2, 3], []])
async def test_every_partial_batch_answer_counts_part_by_part(sandbox: Sandbox, d365_sink: DynamicsSink, form: str,
                                                              content_ids: bool, poisoned: list[int]) -> None:
    """Five upserts, some rejected: with continue-on-error honoured every part is answered; without
    it the service answers up to the first failure (HTTP 400, or 200 per OData 4.0) and nothing
    more. Whatever the form: succeeded parts are written, rejected ones come back Rejected with
    their reason, and the parts with no answer are sent again."""
    sandbox.variants.batch.set(continue_on_error=form, content_ids=content_ids)
    keys = [str(uuid.uuid4()) for _ in range(5)]
    bad = [keys[i] for i in poisoned]
    if bad:
        sandbox.d365.poison_keys("contacts", *bad)
    result = await d365_sink.write("contacts", "contactid",
                                   [Record(k, {"lastname": f"L{i}"}) for i, k in enumerate(keys)])
    assert sorted(result.written) == sorted(set(keys) - set(bad))
    assert sorted(r.key for r in result.rejected) == sorted(bad)
    assert all(r.status == 400 and POISON_CODE in r.error for r in result.rejected)
    table = sandbox.d365.table("contacts")
    assert all((k in table.rows) == (k not in bad) for k in keys)
    # each request was carried out by the service exactly once: nothing answered was sent again
    assert sorted(r.path.rsplit("(", 1)[-1].rstrip(")") for r in sandbox.batch_parts.records()) == sorted(keys)
    batches = [r for r in sandbox.requests.records(server="d365") if r.path.endswith("$batch")]
    if form != "honour" and poisoned:
        assert any(r.status == (400 if form == "ignore-400" else 200) for r in batches)


@pytest.mark.parametrize(("form", "content_ids"), BATCH_FORMS)
async def test_opt_out_updates_count_a_partial_batch_answer(sandbox: Sandbox, form: str, content_ids: bool) -> None:
    from syncplane.connectors.http import Transport
    from syncplane.optinout.writers import DynamicsOptOutWriter

    sandbox.variants.batch.set(continue_on_error=form, content_ids=content_ids)
    ids = sorted(sandbox.d365.table("contacts").rows)[:5]
    sandbox.d365.poison_keys("contacts", ids[1])
    gone = str(uuid.uuid4())  # no such contact: If-Match: * answers 404, it is not created
    tokens = d365_tokens(sandbox)
    transport = Transport(gate=tokens.gate)
    writer = DynamicsOptOutWriter(sandbox.d365_url, tokens, transport)
    try:
        out = await writer.write([(ids[0], {"donotbulkemail": True}), (ids[1], {"donotbulkemail": True}),
                                  (gone, {"donotbulkemail": True}),
                                  *((k, {"donotbulkemail": True}) for k in ids[2:])])
    finally:
        await transport.aclose()
        await tokens.aclose()
    assert sorted(out.written) == sorted([ids[0], *ids[2:]])
    assert [r.key for r in out.rejected] == [ids[1]] and out.absent == [gone]
    table = sandbox.d365.table("contacts")
    assert all(table.rows[k]["donotbulkemail"] is True for k in [ids[0], *ids[2:]]) and gone not in table.rows


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_retry_after_in_either_http_form_holds_the_client(sandbox: Sandbox, source: DynamicsSource,
                                                                form: str) -> None:
    """Retry-After as delta-seconds (what Dataverse documents) or as an HTTP-date (RFC 9110 allows
    it): either way no request of the client goes out before the time it names."""
    sandbox.faults.d365.set(retry_after_form=form)
    sandbox.faults.d365.queue(429, count=2, retry_after=1, path_regex="/contacts")
    pages = await read_all(source)
    assert len(set(keys_of(pages))) == 1234
    throttled = [r for r in sandbox.requests.records(server="d365") if r.status == 429]
    assert len(throttled) == 2 and all(r.retry_after is not None and r.retry_after >= 0.9 for r in throttled)
    assert sandbox.requests.retry_after_violations() == []


async def test_campaign_event_cursor_stays_bounded_when_a_bulk_update_shares_one_timestamp(sandbox: Sandbox) -> None:
    """100,000 events on one ``lastModified`` (a bulk update), between a few earlier and later
    ones: a reader restarted from the stored cursor after every page delivers each event once,
    and no stored cursor holds more than ``line_count`` keys (it must fit a 1 MiB ConfigMap value)."""
    events = sandbox.acs.events
    for i in range(3):
        events.create({"eventId": f"before-{i}", "eventType": "open"})
    bulk = sandbox.acs.next_ts()
    expected = [f"before-{i}" for i in range(3)]
    for i in range(100_000):
        events.create({"eventId": f"bulk-{i:06d}", "eventType": "send"}, ts=bulk)
        expected.append(f"bulk-{i:06d}")
    for i in range(3):
        events.create({"eventId": f"after-{i}", "eventType": "click"})
        expected.append(f"after-{i}")
    line_count = 1000
    tokens = acs_tokens(sandbox)
    src = CampaignSource(sandbox.acs_url, tokens, SANDBOX_CLIENT_ID, key_field="eventId", line_count=line_count)
    delivered: list[str] = []
    cursor: str | None = None
    largest = 0
    try:
        for _ in range(2 * len(expected) // line_count + 10):  # a restart after every page
            got: list[str] = []
            async for page in src.pages("events", ["eventId"], cursor):
                assert page.cursor is not None
                cursor = page.cursor
                largest = max(largest, len(cursor.encode()))
                assert len(json.loads(cursor)["seen"]) <= line_count
                if page.records:
                    got = [r.key for r in page.records]
                    break  # the worker stops here; the next pass starts from the stored cursor
            if not got:
                break
            delivered += got
        assert len(delivered) == len(expected) and sorted(delivered) == sorted(expected)
        # line_count keys of ≤ 13 characters as a JSON list, plus the timestamp and one page URL
        assert largest <= line_count * 16 + 4096, largest
    finally:
        await src.aclose()
        await tokens.aclose()


# ------------------------------------------------------------------------------ stored links of a moved endpoint

#: How an edit moves a source endpoint, as a stored link made before it shows it (brief s7-bugs 2).
D365_MOVES = {"another host": lambda link: link.replace("127.0.0.1", "localhost"),
              "another version": lambda link: link.replace("/api/data/v9.2/", "/api/data/v9.1/")}


@pytest.mark.parametrize("moved", sorted(D365_MOVES))
@pytest.mark.parametrize("kind", ["delta link", "resume link"])
async def test_a_stored_link_not_under_the_endpoint_is_discarded_for_a_flagged_resync(
        sandbox: Sandbox, source: DynamicsSource, caplog: pytest.LogCaptureFixture, moved: str, kind: str) -> None:
    """A checkpointed ``@odata.deltaLink``/``@odata.nextLink`` that an edit of the endpoint left behind: the
    read does not fail (UNTRUSTED_ORIGIN for another host, forever); the link is discarded with a WARNING and
    the table read in full, flagged ``resynced`` as after an expired token, so deletes meanwhile are
    reconciled (tests/integration/test_reconcile_deletes.py, ``endpoint-moved``)."""
    pages = await read_all(source)
    cursor = pages[-1].cursor if kind == "delta link" else pages[2].cursor
    assert cursor is not None
    stale = D365_MOVES[moved](cursor)
    assert stale != cursor
    asked = len(sandbox.requests.records(server="d365"))
    with caplog.at_level(logging.WARNING, logger="syncplane.connectors.dynamics"):
        again = await read_all(source, stale)
    assert again[0].resynced and all(p.full for p in again) and source.resyncs == 1
    assert sorted(keys_of(again)) == sorted(sandbox.d365.table("contacts").rows)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "not under the configured endpoint" in warned[0], warned
    assert "token" not in warned[0], "the link's tokens stay out of the log"
    assert not [r for r in sandbox.requests.records(server="d365")[asked:] if "v9.1" in r.path]
    assert keys_of(await read_all(source, again[-1].cursor)) == []   # the new delta link is followed


@pytest.mark.parametrize("moved", ["another host", "another organization"])
async def test_a_stored_campaign_page_not_under_the_endpoint_is_read_again_from_its_timestamp(
        sandbox: Sandbox, caplog: pytest.LogCaptureFixture, moved: str) -> None:
    """Campaign's bounded cursor keeps a ``next.href`` when the records at its timestamp began on an earlier
    page. One an edit of the endpoint left behind is discarded with a WARNING and the read asks
    ``byLastModified`` from the timestamp again: every event after the cursor comes (at-least-once: writes
    are idempotent by event id), none is lost."""
    bulk = sandbox.acs.next_ts()
    for i in range(5):
        sandbox.acs.events.create({"eventId": f"bulk-{i}", "eventType": "send"}, ts=bulk)
    for i in range(3):
        sandbox.acs.events.create({"eventId": f"after-{i}", "eventType": "open"})
    tokens = acs_tokens(sandbox)
    src = CampaignSource(sandbox.acs_url, tokens, SANDBOX_CLIENT_ID, key_field="eventId", line_count=2)
    try:
        pages = [p async for p in src.pages("events", ["eventId"], None)]
        at = next(i for i, p in enumerate(pages) if p.cursor and "page" in json.loads(p.cursor))
        state = json.loads(str(pages[at].cursor))
        state["page"] = (state["page"].replace("127.0.0.1", "localhost") if moved == "another host"
                         else state["page"].replace(f"/{sandbox.options.org}/", "/another-org/"))
        with caplog.at_level(logging.WARNING, logger="syncplane.connectors.campaign"):
            again = [p async for p in src.pages("events", ["eventId"], json.dumps(state))]
        assert set(keys_of(pages[at + 1:])) <= set(keys_of(again))   # nothing after the cursor is lost
        # and the read starts at the cursor's timestamp: the bulk's and what came after, nothing older
        assert set(keys_of(again)) <= {f"bulk-{i}" for i in range(5)} | {f"after-{i}" for i in range(3)}
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "not under the configured endpoint" in warned[0], warned
    finally:
        await src.aclose()
        await tokens.aclose()
