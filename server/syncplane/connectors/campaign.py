"""Adobe Campaign Standard connector: records addressed by their integration key, never by a
stored PKey (PKeys are cached in memory for the sink's lifetime only)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from syncplane.connectors.base import ConnectorError, Page, Record, Rejected, WriteResult
from syncplane.connectors.http import (
    DEFAULT_CONCURRENCY,
    Response,
    RetryPolicy,
    TokenProvider,
    Transport,
    VendorApi,
    error_text,
    origin_of,
    raise_for_status,
    stored_link_allowed,
)
from syncplane.connectors.schema import Schema

log = logging.getLogger("syncplane.connectors.campaign")

EPOCH = "1970-01-01 00:00:00.000Z"
MAX_LINE_COUNT = 10_000
PKEY_CACHE_SIZE = 10_000
#: One encoder for every request body: ``json.dumps`` with any option builds a new encoder per call.
_JSON = json.JSONEncoder(separators=(",", ":"), default=str)


def resource_path(resource: str) -> str:
    """``profile`` → ``profileAndServices/profile``; ``events`` → ``events``; a path (with ``/``)
    as is; any other name → ``customResources/<name>``."""
    if "/" in resource:
        return resource.strip("/")
    if resource == "profile":
        return "profileAndServices/profile"
    if resource == "events":
        return "events"
    return f"customResources/{resource}"


def key_filter(key_field: str) -> tuple[str, str]:
    """The integration-key filter of a resource: ``externalId`` → (``byExternalId``, ``externalId_parameter``)."""
    return "by" + key_field[0].upper() + key_field[1:], key_field + "_parameter"


def owned_by(row: Mapping[str, Any], owner: str | None) -> bool:
    """Whether the integration (``owner``: its client id; None: anyone) created a record, by its
    ``createdBy.name``. Records it did not create are never modified or deleted (DOMAIN.md)."""
    creator = row.get("createdBy")
    name = creator.get("name") if isinstance(creator, dict) else None
    return owner is None or name == owner


class _Base(VendorApi):
    def __init__(self, base_url: str, token_provider: TokenProvider, api_key: str, *, concurrency: int,
                 policy: RetryPolicy | None, transport: Transport | None) -> None:
        super().__init__(base_url if base_url.endswith("/") else base_url + "/", token_provider,
                         concurrency=concurrency, policy=policy, transport=transport)
        self.api_key = api_key
        # Made once: a request's headers are these plus its token (the transport's copy).
        self._headers = {"X-Api-Key": api_key, "Accept": "application/json"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}

    async def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Response:
        if body is None:
            return await self.transport.request(method, url, headers=self._headers, auth=self.tokens)
        return await self.transport.request(method, url, headers=self._json_headers,
                                            content=_JSON.encode(body).encode(), auth=self.tokens)

    async def resource_schema(self, resource: str) -> Schema:
        """Fields, types and lengths of a resource (``<section>/resourceType/<name>``)."""
        section, _, name = resource_path(resource).rpartition("/")
        response = await self._call("GET", f"{self.base_url}{section}/resourceType/{name}")
        raise_for_status(response, f"schema of {resource}")
        body = response.json()
        content = body.get("content") or {}
        fields = {str(k): str(v.get("type")) for k, v in content.items() if isinstance(v, dict)}
        lengths = {str(k): int(v["length"]) for k, v in content.items()
                   if isinstance(v, dict) and isinstance(v.get("length"), int)}
        links = {str(k): str(v["target"]) for k, v in content.items()
                 if isinstance(v, dict) and v.get("type") == "link" and v.get("target")}
        key = body.get("key")
        return Schema("Campaign resource", resource, fields, lengths, key=str(key) if key else None, links=links)


@dataclass(frozen=True)
class OwnedRecord:
    """A destination record the integration created: its integration key, its ``PKey`` (valid
    for this listing only: never persist it) and the values of the fields asked for."""

    key: str
    pkey: str
    values: dict[str, Any]


class CampaignSink(_Base):
    """Upserts by integration key: lookup ``…/by<Key>?<key>_parameter=`` → PATCH ``…/<PKey>``
    or POST; deletes: lookup → DELETE (absent = written). Records run concurrently under
    the transport's cap; a 4xx is a ``Rejected`` record, a 409 on POST re-looks-up and PATCHes.

    ``owner`` (the integration's client id): when set, records whose ``createdBy.name`` is
    someone else are never modified or deleted; they come back ``Rejected(key, 409, …)``.

    One request per record (Campaign Standard has no bulk write): the pipeline gives it one key
    at a time from :attr:`writers` writers, as many as its transport may have requests in flight."""

    per_record = True

    def __init__(self, base_url: str, token_provider: TokenProvider, api_key: str, *,
                 owner: str | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                 policy: RetryPolicy | None = None, transport: Transport | None = None) -> None:
        super().__init__(base_url, token_provider, api_key, concurrency=concurrency, policy=policy,
                         transport=transport)
        self.owner = owner
        # (resource, key) → PKey: memory only, bounded, so memory stays flat whatever the table size.
        # A create's answer is kept as it came (bytes) and parsed only when its PKey is needed.
        self._pkeys: OrderedDict[tuple[str, str], str | bytes] = OrderedDict()
        self._foreign: set[tuple[str, str]] = set()  # (resource, key) of records someone else created
        self.existing_ratio = 0.0  # of full-load writes whose record already existed (moving average)
        # path → link field → (target path, target key field): set by prepare_links().
        self._links: dict[str, dict[str, tuple[str, str]]] = {}

    async def owned_records(self, resource: str, key_field: str, fields: Sequence[str] = (), *,
                            line_count: int = 1000) -> AsyncIterator[list[OwnedRecord]]:
        """Every record of ``resource`` the integration owns, a page (≤ ``line_count`` records) at a time.

        What the integration owns in Campaign (DOMAIN.md: records in Campaign the integration did
        not create are never modified): a record whose integration key (``key_field``, e.g.
        ``externalId``, a custom resource's ``crmId``) is set and that :func:`owned_by` the
        integration's client id (``owner``; when ``owner`` is None, every record carrying the key).
        A profile a marketer made by hand, with or without an
        ``externalId``, is never listed. ``fields``: the values to carry (none by default).

        Reads ``GET <resource>?_lineCount=N&_forcePagination=true`` and follows ``next.href``
        (Campaign Standard API, Pagination: tables over 100,000 rows page only with
        ``_forcePagination``). Raises :class:`ConnectorError` when the service refuses the read,
        ``PAGING_LOOP`` when a ``next.href`` comes back a second time.
        """
        if not 0 < line_count <= MAX_LINE_COUNT:
            raise ValueError(f"line_count must be between 1 and {MAX_LINE_COUNT}")
        path = resource_path(resource)
        query = urlencode({"_lineCount": str(line_count), "_forcePagination": "true"})
        url: str | None = f"{self.base_url}{path}?{query}"
        followed: set[str] = set()
        while url is not None:
            followed.add(url)
            response = await self._call("GET", url)
            raise_for_status(response, f"listing {path}")
            body = response.json()
            page: list[OwnedRecord] = []
            for row in body.get("content") or []:
                key = row.get(key_field)
                if key in (None, "") or "PKey" not in row or not owned_by(row, self.owner):
                    continue
                page.append(OwnedRecord(str(key), str(row["PKey"]), {f: row.get(f) for f in fields}))
                self._remember(path, str(key), str(row["PKey"]))  # a delete that follows needs no lookup
            yield page
            nxt = body.get("next")
            url = str(nxt["href"]) if isinstance(nxt, dict) and nxt.get("href") else None
            if url is not None and url in followed:
                raise ConnectorError("PAGING_LOOP", f"listing {path}: next.href leads back to a page already read")

    async def prepare_links(self, resource: str) -> None:
        """Learn the resource's link fields, so their values (the parent's integration key,
        e.g. a contact id) are written as links to the parent record ``{"PKey": …}``."""
        links: dict[str, tuple[str, str]] = {}
        for fname, target in (await self.resource_schema(resource)).links.items():
            key = (await self.resource_schema(target)).key
            if key:
                links[fname] = (resource_path(target), key)
        self._links[resource_path(resource)] = links

    async def _resolve_links(self, path: str, record: Record, values: dict[str, Any]) -> Rejected | None:
        """Replace each link value by the parent's PKey; a parent that does not exist (yet) is a
        404 for this record: the pipeline holds it until the parent arrives."""
        for fname, (target_path, target_key) in self._links.get(path, {}).items():
            value = values.get(fname)
            if value is None or isinstance(value, dict):
                continue
            pkey = await self._lookup(target_path, target_key, str(value))
            if pkey is None:
                return Rejected(record.key, 404, f"linked {target_path.rsplit('/', 1)[-1]} with {target_key} "
                                f"{value!r} does not exist (yet)")
            values[fname] = {"PKey": pkey}
        return None

    @property
    def writers(self) -> int:
        """How many records may be written at once: the transport's most requests in flight."""
        return self.transport.concurrency

    def _pkey(self, path: str, key: str) -> str | None:
        """The cached PKey of a record (a create's answer parsed now, on first need), or None."""
        cached = self._pkeys.get((path, key))
        if isinstance(cached, bytes):
            try:
                cached = str(json.loads(cached)["PKey"])
            except (ValueError, KeyError, TypeError):
                self._pkeys.pop((path, key), None)
                return None
            self._pkeys[(path, key)] = cached
        return cached

    def _remember(self, path: str, key: str, pkey: str | bytes) -> None:
        self._pkeys[(path, key)] = pkey
        self._pkeys.move_to_end((path, key))
        while len(self._pkeys) > PKEY_CACHE_SIZE:
            self._pkeys.popitem(last=False)

    async def write(self, resource: str, key_field: str, records: Sequence[Record], *,
                    full_load: bool = False) -> WriteResult:
        """``full_load``: create first (one POST; a 409 falls back to lookup and PATCH) while a
        full read mostly brings records the destination has not seen (a first load: half the
        requests); once most turn out to exist (a re-read after a filter change or a replay),
        look up first, and skip the PATCH of a record whose fields already hold the values."""
        path = resource_path(resource)
        # One write per key, the last one wins (a batch may hold two changes of one record).
        latest: dict[str, Record] = {}
        for record in records:
            latest.pop(record.key, None)
            latest[record.key] = record
        create_first = full_load and self.existing_ratio < 0.5
        if len(latest) == 1:  # the pipeline's usual call: no task for one record
            outcomes = [await self._write_one(path, key_field, next(iter(latest.values())), create_first)]
        else:
            outcomes = await asyncio.gather(*(self._write_one(path, key_field, r, create_first)
                                              for r in latest.values()))
        written = [r.key for r in latest.values()]
        rejected = [o for o in outcomes if o is not None]
        bad = {o.key for o in rejected}
        return WriteResult([k for k in written if k not in bad], rejected)

    def _saw(self, existed: bool) -> None:
        """A moving estimate of how many written records already existed at the destination."""
        self.existing_ratio += 0.01 * ((1.0 if existed else 0.0) - self.existing_ratio)

    async def _lookup(self, path: str, key_field: str, key: str) -> str | None:
        cached = self._pkey(path, key)
        if cached is not None:
            return cached
        pkey, _ = await self._lookup_row(path, key_field, key)
        return pkey

    async def _lookup_row(self, path: str, key_field: str, key: str) -> tuple[str | None, dict[str, Any] | None]:
        name, param = key_filter(key_field)
        response = await self._call("GET", f"{self.base_url}{path}/{name}?{urlencode({param: key})}")
        raise_for_status(response, f"lookup {path} by {key_field}")
        content = response.json().get("content") or []
        if not content:
            return None, None
        row = content[0]
        pkey = str(row["PKey"])
        creator = row.get("createdBy")
        if self.owner is not None and isinstance(creator, dict) and creator.get("name") != self.owner:
            self._foreign.add((path, key))
        self._remember(path, key, pkey)
        return pkey, row

    async def _write_one(self, path: str, key_field: str, record: Record, create_first: bool) -> Rejected | None:
        try:
            return await self._upsert_or_delete(path, key_field, record, create_first)
        except ConnectorError as exc:
            if exc.reason != "REQUEST_REJECTED":  # credentials, unknown resource: not this record's fault
                raise
            return Rejected(record.key, 400, str(exc))

    async def _upsert_or_delete(self, path: str, key_field: str, record: Record,
                                create_first: bool = False) -> Rejected | None:
        for attempt in range(3):  # a concurrent create/delete by someone else: look up again
            row: dict[str, Any] | None = None
            if create_first and attempt == 0 and not record.deleted and (path, record.key) not in self._pkeys:
                pkey = None  # try POST; a 409 means it exists: the next round looks it up
            elif (cached := self._pkey(path, record.key)) is not None:
                pkey = cached
            else:
                pkey, row = await self._lookup_row(path, key_field, record.key)
            if not create_first and attempt == 0 and not record.deleted:
                self._saw(pkey is not None)
            if pkey is not None and (path, record.key) in self._foreign:
                return Rejected(record.key, 409, "the record was not created by the integration: left untouched")
            if record.deleted:
                if pkey is None:
                    return None
                response = await self._call("DELETE", f"{self.base_url}{path}/{quote(pkey, safe='@')}")
                self._pkeys.pop((path, record.key), None)
                if response.status_code in (200, 204, 404):
                    return None
                return self._rejected(record, response)
            values = {k: v for k, v in record.values.items() if k != key_field}
            if (missing := await self._resolve_links(path, record, values)) is not None:
                return missing
            # An existing record keeps its create-only fields (applyUpdates: false): decided here,
            # by key, whatever read brought the record.
            update = {k: v for k, v in values.items() if k not in record.create_only}
            if pkey is not None and row is not None and all(row.get(k) == v for k, v in update.items()):
                return None  # already holds these values: nothing to write
            if pkey is not None:
                response = await self._call("PATCH", f"{self.base_url}{path}/{quote(pkey, safe='@')}", update)
                if response.status_code == 404:  # deleted since we cached/looked it up
                    self._pkeys.pop((path, record.key), None)
                    continue
            else:
                response = await self._call("POST", f"{self.base_url}{path}", {**values, key_field: record.key})
                if create_first and attempt == 0:
                    self._saw(response.status_code == 409)
                if response.status_code == 409:  # it exists (created meanwhile, or a re-read): update it
                    continue
                if response.status_code in (200, 201):
                    self._remember(path, record.key, response.content)  # parsed if ever needed
            if 200 <= response.status_code < 300:
                return None
            return self._rejected(record, response)
        return Rejected(record.key, 409, "the record kept changing under concurrent writers")

    @staticmethod
    def _rejected(record: Record, response: Response) -> Rejected:
        if response.status_code in (401, 403):
            raise_for_status(response, "Campaign write")
        return Rejected(record.key, response.status_code, error_text(response))


class CampaignSource(_Base):
    """Reads a resource in ``lastModified`` order (``byLastModified``), which is both the full
    read (from the epoch) and the incremental one. Campaign has no deletion feed: deletions are
    not reported.

    The cursor (JSON, on every page) is bounded: at most ``line_count`` keys plus one URL, so it
    fits a 1 MiB ConfigMap value even when a bulk update gives 100,000 records one timestamp.
    ``since`` is the last ``lastModified`` delivered and ``seen`` the keys carrying it *on one
    page*, which deduplicates the inclusive boundary:

    - no ``page``: the records at ``since`` begin on that page, so re-asking ``byLastModified``
      from ``since`` starts with them;
    - ``page``: they began on an earlier page, so the read resumes by asking that page's own
      ``next.href`` (the vendor's pagination, which neither skips nor repeats a record) again.

    Our own bookkeeping: the API documents no order among records sharing a ``lastModified``
    and no filter on it with a second field, so its pagination is the only stable tie-break.
    """

    def __init__(self, base_url: str, token_provider: TokenProvider, api_key: str, *,
                 key_field: str | Mapping[str, str] = "PKey", line_count: int = 1000,
                 concurrency: int = 4, policy: RetryPolicy | None = None,
                 transport: Transport | None = None) -> None:
        super().__init__(base_url, token_provider, api_key, concurrency=concurrency, policy=policy,
                         transport=transport)
        if not 0 < line_count <= MAX_LINE_COUNT:
            raise ValueError(f"line_count must be between 1 and {MAX_LINE_COUNT}")
        self.key_field = key_field
        self.line_count = line_count

    def _key_of(self, resource: str) -> str:
        if isinstance(self.key_field, str):
            return self.key_field
        return self.key_field.get(resource, "PKey")

    async def pages(self, resource: str, columns: Sequence[str], cursor: str | None) -> AsyncIterator[Page]:
        """The pages of ``resource`` (``columns`` only; all when empty) modified since ``cursor``
        (None: from the epoch), ``line_count`` records a request.

        Raises `ConnectorError` ``BAD_CURSOR`` for a cursor this class did not write, and what
        `raise_for_status` raises for a refused request.
        """
        key_field = self._key_of(resource)
        since, seen, page = EPOCH, set[str](), None
        if cursor:
            try:
                state = json.loads(cursor)
                since, seen, page = str(state["since"]), set(state["seen"]), state.get("page")
            except (ValueError, KeyError, TypeError):
                raise ConnectorError("BAD_CURSOR", f"unreadable Campaign cursor for {resource}") from None
            if page is not None and not isinstance(page, str):
                raise ConnectorError("BAD_CURSOR", f"unreadable Campaign cursor for {resource}")
            if page is not None and not stored_link_allowed(self.base_url, page):
                # A page of an endpoint an edit replaced: read again from `since` (byLastModified). What
                # is at `since` on earlier pages comes again; writes are idempotent by key, nothing is lost.
                log.warning("stored next.href for %s (%s) is not under the configured endpoint %s: discarded, "
                            "reading from lastModified %s", resource, origin_of(page), origin_of(self.base_url),
                            since)
                page = None
        path = resource_path(resource)
        query = urlencode({"lastModified_parameter": since, "_lineCount": str(self.line_count),
                           "_forcePagination": "true"})
        url: str | None = page or f"{self.base_url}{path}/byLastModified?{query}"
        began_here = page is None  # whether the records at `since` begin on the page at `url`
        wanted = set(columns)
        while url is not None:
            response = await self._call("GET", url)
            raise_for_status(response, f"GET {path}")
            body = response.json()
            records: list[Record] = []
            here = set[str]()  # the keys at `since` on this page, delivered now or before
            for row in body.get("content") or []:
                key = row.get(key_field)
                modified = row.get("lastModified")
                if key is None or modified is None:
                    continue
                key, modified = str(key), str(modified)
                if modified != since:
                    since, seen, here, began_here = modified, set(), set(), True
                here.add(key)
                if key in seen:
                    continue  # the inclusive boundary: already delivered
                values = {k: v for k, v in row.items() if not wanted or k in wanted or k == key_field}
                records.append(Record(key, values, modified=modified))
            state = {"since": since, "seen": sorted(here)}
            if not began_here:
                state["page"] = url
            nxt = body.get("next")
            yield Page(records, json.dumps(state))
            url = str(nxt["href"]) if isinstance(nxt, dict) and nxt.get("href") else None
            seen, began_here = set(), False  # pages of one answer never overlap
