"""Dynamics 365 (Dataverse Web API) connector: change-tracked reads and ``$batch`` writes."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

from syncplane.connectors.base import ConnectorError, Page, Record, Rejected, WriteResult
from syncplane.connectors.http import (
    DEFAULT_CONCURRENCY,
    Response,
    RetryableError,
    RetryPolicy,
    TokenProvider,
    Transport,
    VendorApi,
    error_text,
    error_text_of,
    origin_of,
    pause,
    raise_for_status,
    retry_after_seconds,
    stored_link_allowed,
)
from syncplane.connectors.schema import Schema

log = logging.getLogger("syncplane.connectors.dynamics")
T = TypeVar("T")

#: Dataverse's error code for an expired/invalid change-tracking token (the sandbox uses it too).
DELTA_TOKEN_EXPIRED_CODE = "0x80044352"
MAX_PAGE_SIZE = 5000
MAX_BATCH_REQUESTS = 1000
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_ODATA_HEADERS = {"OData-Version": "4.0", "OData-MaxVersion": "4.0", "Accept": "application/json"}


def _service_root(base_url: str) -> str:
    return base_url if base_url.endswith("/") else base_url + "/"


def _at_most(name: str, value: int, most: int) -> int:
    """``value`` when it is from 1 to ``most``; otherwise ValueError naming ``name``."""
    if not 0 < value <= most:
        raise ValueError(f"{name} must be between 1 and {most}")
    return value


class DynamicsSource(VendorApi):
    """Reads an entity set with change tracking.

    ``pages(table, columns, None)`` is a full read (every row, inactive ones included) whose
    last page carries the ``@odata.deltaLink``; ``pages(table, columns, cursor)`` resumes.
    Every page carries a cursor: inside a full read it is the page's ``@odata.nextLink``
    (so a crash mid-load resumes there instead of starting over), at the end the delta link.
    A delta read returns the changes since then (deletions as ``Record(deleted=True)``).
    An expired delta token restarts a full read whose first page is ``resynced=True``.
    """

    def __init__(self, base_url: str, token_provider: TokenProvider, *, key_column: str,
                 page_size: int = MAX_PAGE_SIZE, concurrency: int = DEFAULT_CONCURRENCY,
                 policy: RetryPolicy | None = None, transport: Transport | None = None) -> None:
        self.page_size = _at_most("page_size", page_size, MAX_PAGE_SIZE)
        super().__init__(_service_root(base_url), token_provider, concurrency=concurrency, policy=policy,
                         transport=transport)
        self.key_column = key_column
        self.resyncs = 0  # full reads forced by an expired delta token

    def _prefer(self, annotations: Sequence[str] = (), track: bool = True) -> dict[str, str]:
        prefer = f"odata.track-changes, odata.maxpagesize={self.page_size}" if track else \
            f"odata.maxpagesize={self.page_size}"
        if annotations:
            # Dataverse returns annotations (formatted values, a lookup's table) only when asked:
            # "Formatted values" and "Lookup property data", Dataverse Web API query docs.
            prefer += f', odata.include-annotations="{",".join(annotations)}"'
        return {**_ODATA_HEADERS, "Prefer": prefer}

    async def _get(self, url: str, annotations: Sequence[str] = (), track: bool = True) -> Response:
        return await self.transport.request("GET", url, headers=self._prefer(annotations, track), auth=self.tokens)

    def _first_url(self, table: str, columns: Sequence[str], key_column: str, where: str | None = None) -> str:
        cols = list(dict.fromkeys([key_column, *columns]))
        url = f"{self.base_url}{quote(table)}?$select={quote(','.join(cols), safe=',')}"
        return url if where is None else url + "&$filter=" + quote(where, safe="',()")

    async def entity_set(self, logical_name: str) -> str:
        """The entity set (collection) name of a table, e.g. ``contact`` → ``contacts``."""
        url = (f"{self.base_url}EntityDefinitions(LogicalName='{quote(logical_name, safe='')}')"
               "?$select=EntitySetName")
        response = await self.transport.request("GET", url, headers=_ODATA_HEADERS, auth=self.tokens)
        raise_for_status(response, f"table {logical_name!r}")
        name = _json_object(response, logical_name).get("EntitySetName")
        if not isinstance(name, str) or not name:
            raise ConnectorError("BAD_RESPONSE", f"no EntitySetName for table {logical_name!r}")
        return name

    async def table_schema(self, logical_name: str) -> Schema:
        """Columns and their types, and whether change tracking is on (EntityDefinitions)."""
        base = f"{self.base_url}EntityDefinitions(LogicalName='{quote(logical_name, safe='')}')"
        entity = await self.transport.request("GET", base + "?$select=LogicalName,ChangeTrackingEnabled",
                                              headers=_ODATA_HEADERS, auth=self.tokens)
        raise_for_status(entity, f"table {logical_name!r}")
        attrs = await self.transport.request("GET", base + "/Attributes?$select=LogicalName,AttributeType,MaxLength",
                                             headers=_ODATA_HEADERS, auth=self.tokens)
        raise_for_status(attrs, f"columns of table {logical_name!r}")
        fields: dict[str, str] = {}
        lengths: dict[str, int] = {}
        for a in _json_object(attrs, logical_name).get("value", []):
            name = str(a.get("LogicalName"))
            fields[name] = str(a.get("AttributeType"))
            if isinstance(a.get("MaxLength"), int):
                lengths[name] = int(a["MaxLength"])
        tracking = bool(_json_object(entity, logical_name).get("ChangeTrackingEnabled", True))
        behaviours: dict[str, str] = {}
        if "DateTime" in fields.values():
            # DateTimeBehavior is a property of the derived DateTimeAttributeMetadata: a cast.
            dated = await self.transport.request(
                "GET", base + "/Attributes/Microsoft.Dynamics.CRM.DateTimeAttributeMetadata"
                "?$select=LogicalName,DateTimeBehavior", headers=_ODATA_HEADERS, auth=self.tokens)
            raise_for_status(dated, f"date columns of table {logical_name!r}")
            for a in _json_object(dated, logical_name).get("value", []):
                behaviour = a.get("DateTimeBehavior")
                if isinstance(behaviour, dict) and isinstance(behaviour.get("Value"), str):
                    behaviours[str(a.get("LogicalName"))] = behaviour["Value"]
        return Schema("Dynamics 365 table", logical_name, fields, lengths, tracking, behaviours=behaviours)

    async def pages(self, table: str, columns: Sequence[str], cursor: str | None, *,
                    key_column: str | None = None, annotations: Sequence[str] = (),
                    where: str | None = None) -> AsyncIterator[Page]:
        """``table`` is the entity set; ``key_column`` overrides the source's for this read.

        ``where``: a ``$filter`` (e.g. :func:`key_range_filter`): a plain read of the rows it
        admits, without change tracking (Dataverse refuses ``$filter`` with it), whose pages are
        all ``full``; its last page's cursor is :data:`RANGE_DONE` (there is no delta link).

        A committed cursor always makes progress, or the read fails loudly. OData only says a
        service SHOULD end a change-tracked read with ``@odata.deltaLink`` (OData 4.0 part 1
        §11.3; Dataverse "Use change tracking to synchronize data with external systems"), and
        next links are opaque. So:

        - a last page with neither ``@odata.nextLink`` nor ``@odata.deltaLink``, and
        - a next link that leads back to a page this read already fetched (a link repeated
          or a loop: following it would never end)

        both end the read: the page's records are yielded with a cursor that starts a full
        read again (never the stale resume point, which would re-read the same pages forever
        and never see changes elsewhere), then :class:`ConnectorError` ``NO_DELTA_LINK`` or
        ``PAGING_LOOP`` is raised. The engine reports it as the pass's error and retries.
        """
        key = key_column or self.key_column
        track = where is None
        full, url = decode_cursor(cursor)
        resynced = False
        first_url = self._first_url(table, columns, key, where)
        if url is None:
            url = first_url

        async def get(link: str) -> Response:
            return await self._get(link, annotations, track)

        if url != first_url and not stored_link_allowed(self.base_url, url):
            # A stored link not under the endpoint now configured (an edit moved it: another host,
            # version or organisation) leads to another service, which the credentials' audience may
            # refuse, and its token means nothing here. Start over as for an expired token.
            log.warning("stored %s link for %s (%s) is not under the configured endpoint %s: discarded, full "
                        "resync", "resume" if full else "delta", table, origin_of(url), origin_of(self.base_url))
            self.resyncs += 1
            resynced, full = True, True
            url = first_url
        response = await get(url)
        if (cursor is not None and not resynced
                and ((full and response.status_code == 400) or _is_expired_delta(response))):
            # An expired delta token, or a resume link the service no longer accepts: start over.
            log.info("%s cursor for %s no longer valid: full resync", "resume" if full else "delta", table)
            self.resyncs += 1
            resynced, full = True, True
            url = first_url
            response = await get(url)
        raise_for_status(response, f"GET {table}")
        followed = {url}  # links fetched in this read: one seen again is a loop
        pages = 0
        # Fetch the next page while the caller processes this one.
        while True:
            body = _json_object(response, table)
            pages += 1
            next_link = body.get("@odata.nextLink")
            delta = body.get("@odata.deltaLink")
            stalled: ConnectorError | None = None
            if isinstance(next_link, str) and next_link in followed:
                stalled = ConnectorError(
                    "PAGING_LOOP", f"GET {table}: page {pages} of this read has an @odata.nextLink to a page already "
                    "read, so following it would never end; the next read starts over from the first page")
                next_link = None
            elif not isinstance(next_link, str) and not isinstance(delta, str) and track:
                stalled = ConnectorError(
                    "NO_DELTA_LINK", f"GET {table}: the last page (page {pages} of this read) carries neither "
                    "@odata.nextLink nor @odata.deltaLink, so there is no cursor to resume changes from; the next "
                    "read starts over from the first page")
            fetch: asyncio.Task[Response] | None = None
            if isinstance(next_link, str):
                followed.add(next_link)
                fetch = asyncio.ensure_future(get(next_link))
            try:
                if fetch is not None:
                    # Let it send its request now, so that the service makes the next page while this
                    # one is turned into records (without this the request left only once the caller
                    # awaited something, after the records were built: one page after the other).
                    # Inside the try: a cancellation here cancels the fetch too.
                    await asyncio.sleep(0)
                records = [self._record(row, key) for row in body.get("value", [])]
                if isinstance(next_link, str):
                    page_cursor = encode_cursor(full, next_link)
                elif not track:
                    page_cursor = RANGE_DONE
                elif isinstance(delta, str) and stalled is None:
                    page_cursor = encode_cursor(False, delta)
                else:
                    page_cursor = encode_cursor(True, first_url)  # no way on: a full read again
                yield Page(records, page_cursor, resynced, full, restart=stalled is not None)
                resynced = False
                if stalled is not None:
                    log.warning("%s", stalled)
                    raise stalled
                if fetch is None:
                    return
                response = await fetch
                fetch = None
                raise_for_status(response, f"GET {table} (next page)")
            finally:
                if fetch is not None and not fetch.done():
                    fetch.cancel()

    async def start_tracking(self, table: str, columns: Sequence[str], key_column: str, sample: int = 4096,
                             rng: random.Random | None = None) -> tuple[str, list[str]]:
        """Take a delta token now: a change-tracked read to its ``@odata.deltaLink`` (Dataverse
        hands the token out only at the end of a tracked read). ``columns``: those the delta
        reads will need, since the delta link keeps the ``$select`` of the read that made it.
        Returns (the delta cursor, to resume changes from this moment; a uniform sample of at
        most ``sample`` keys, reservoir-sampled so memory stays flat whatever the table's size).

        Raises:
            ConnectorError: ``NO_DELTA_LINK``/``PAGING_LOOP`` (see :meth:`pages`), or the API
                refused the read.
        """
        rng = rng or random.Random()
        kept: list[str] = []
        seen = 0
        cursor = None
        async for page in self.pages(table, columns, None, key_column=key_column):
            for record in page.records:
                seen += 1
                if len(kept) < sample:
                    kept.append(record.key)
                elif (slot := rng.randrange(seen)) < sample:
                    kept[slot] = record.key
            cursor = page.cursor
        assert cursor is not None  # pages() ends with the delta link's cursor or raises
        return cursor, kept

    async def snapshot(self, table: str, columns: Sequence[str], *, key_column: str) -> AsyncIterator[list[Record]]:
        """Every row of an entity set as it is now, page by page: a plain paged read (no change
        tracking: it makes no delta token, and works on tables without it) following
        ``@odata.nextLink`` unchanged. Used to compare, never to sync.

        Raises:
            ConnectorError: ``BAD_RESPONSE`` when a next link repeats (the read would never end),
                or the API refuses the read (reason by status, see ``raise_for_status``).
        """
        url: str | None = self._first_url(table, columns, key_column)
        seen: set[str] = set()
        headers = {**_ODATA_HEADERS, "Prefer": f"odata.maxpagesize={self.page_size}"}
        while url is not None:
            response = await self.transport.request("GET", url, headers=headers, auth=self.tokens)
            raise_for_status(response, f"GET {table}")
            body = _json_object(response, table)
            yield [self._record(row, key_column) for row in body.get("value", [])]
            link = body.get("@odata.nextLink")
            url = link if isinstance(link, str) else None
            if url is not None and url in seen:
                raise ConnectorError("BAD_RESPONSE", f"GET {table}: the next link repeats an earlier one")
            if url is not None:
                seen.add(url)

    async def keys(self, table: str, key_column: str | None = None) -> AsyncIterator[list[str]]:
        """Every row's key of entity set ``table``, a page at a time (a :meth:`snapshot` of the key
        column alone; inactive rows included). Raises what :meth:`snapshot` raises."""
        key = key_column or self.key_column
        async for records in self.snapshot(table, (), key_column=key):
            yield [r.key for r in records]

    def _record(self, row: dict[str, Any], key_column: str) -> Record:
        if "reason" in row and "id" in row and str(row.get("@odata.context", "")).endswith("$deletedEntity"):
            return Record(str(row["id"]), deleted=True)
        # The row is this read's own (just parsed): its annotations ("@odata.etag" on every row) are
        # taken out in place rather than every value copied into a new dict.
        values = row
        values.pop("@odata.etag", None)
        for name in [name for name in values if name[:1] == "@"]:
            del values[name]
        key = values.get(key_column)
        if key is None:
            raise ConnectorError("MISSING_KEY", f"a row came back without its key column {key_column!r}")
        modified = values.get("modifiedon")
        return Record(str(key), values, modified=str(modified) if modified is not None else None)


#: The cursor of a key range read (``pages(where=…)``) read to its end.
RANGE_DONE = "range-done"


def sql_guid_order(key: str) -> bytes:
    """The sort key of a GUID in the order SQL Server (so Dataverse's ``$filter`` ``gt``/``lt``
    on a ``uniqueidentifier`` column) compares them, which is not the order of their text: the
    last 6 bytes are the most significant, then bytes 8-9, 6-7, 4-5, 0-3 of the .NET byte array
    (``Guid.ToByteArray``; Python's ``UUID.bytes_le``). Source: .NET ``SqlGuid.CompareTo``
    ("treats the last 6 bytes as the most significant ones in comparisons"), SQLGuid.cs.
    Raises ValueError for a key that is not a GUID."""
    raw = uuid.UUID(key).bytes_le
    return bytes(raw[i] for i in (10, 11, 12, 13, 14, 15, 8, 9, 6, 7, 4, 5, 0, 1, 2, 3))


def key_range_filter(key_column: str, low: str | None, high: str | None) -> str | None:
    """The ``$filter`` of the half-open key range [``low``, ``high``) on a GUID key column
    (``None``: unbounded on that side; both None: no filter). GUID literals go unquoted."""
    for bound in (low, high):
        if bound is not None and not _GUID.match(bound):
            raise ValueError(f"not a GUID: {bound!r}")
    parts = ([f"{key_column} ge {low}"] if low is not None else []) + \
            ([f"{key_column} lt {high}"] if high is not None else [])
    return " and ".join(parts) or None


def encode_cursor(full: bool, link: str) -> str:
    """The cursor of a page: ``full <nextLink>`` inside a full read, ``delta <deltaLink>`` after it."""
    return ("full " if full else "delta ") + link


def decode_cursor(cursor: str | None) -> tuple[bool, str | None]:
    """(inside a full read, link to resume from). A bare link is a delta link."""
    if cursor is None:
        return True, None
    mode, _, link = cursor.partition(" ")
    if mode in ("full", "delta") and link:
        return mode == "full", link
    return False, cursor


def _is_expired_delta(response: Response) -> bool:
    if response.status_code not in (400, 410):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and \
        body["error"].get("code") == DELTA_TOKEN_EXPIRED_CODE


def _json_object(response: Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise ConnectorError("BAD_RESPONSE", f"{what}: the response is not JSON") from None
    if not isinstance(body, dict):
        raise ConnectorError("BAD_RESPONSE", f"{what}: the response is not a JSON object")
    return body


# ------------------------------------------------------------------------------ writes


@dataclass(frozen=True)
class PartResponse:
    """One part of a ``$batch`` answer: its HTTP status, headers, body bytes and Content-ID."""

    status: int
    headers: dict[str, str]
    body: bytes
    content_id: str | None


@dataclass(frozen=True)
class BatchPart:
    """One independent request of a ``$batch``: method, absolute URL, JSON body (or None) and
    its own headers (e.g. ``If-Match: *``)."""

    method: str
    url: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()


def build_batch(requests: Sequence[BatchPart]) -> tuple[str, bytes]:
    """Independent requests (no change set) as a Dataverse ``multipart/mixed`` body; their
    Content-IDs are their 1-based indexes."""
    boundary = f"batch_{uuid.uuid4()}"
    out: list[bytes] = []
    for i, part in enumerate(requests, start=1):
        out.append(f"--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
                   f"Content-ID: {i}\r\n\r\n{part.method} {part.url} HTTP/1.1\r\n".encode())
        for name, value in part.headers:
            out.append(f"{name}: {value}\r\n".encode())
        if part.body is not None:
            out.append(b"Content-Type: application/json; type=entry\r\n\r\n")
            out.append(part.body)
            out.append(b"\r\n")
        else:
            out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return f"multipart/mixed; boundary={boundary}", b"".join(out)


_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)


def _boundary(content_type: str) -> str:
    match = _BOUNDARY.search(content_type)
    if not match or not content_type.lower().lstrip().startswith("multipart/"):
        raise ConnectorError("BAD_RESPONSE", f"$batch answered {content_type!r}, not multipart/mixed")
    return match.group(1) or match.group(2)


def _split(body: bytes, boundary: str) -> list[bytes]:
    data = b"\n" + body.replace(b"\r\n", b"\n")
    chunks = data.split(b"\n--" + boundary.encode())
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break
        _, _, rest = chunk.partition(b"\n")
        parts.append(rest)
    return parts


def _headers(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("utf-8", "replace").split("\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def parse_batch_response(content_type: str, body: bytes) -> list[PartResponse]:
    """Flatten a ``$batch`` response into per-request responses, in order."""
    result: list[PartResponse] = []
    for part in _split(body, _boundary(content_type)):
        head, _, content = part.partition(b"\n\n")
        mime = _headers(head)
        ctype = mime.get("content-type", "")
        if ctype.lower().startswith("multipart/mixed"):
            result.extend(parse_batch_response(ctype, content))
            continue
        http_head, _, payload = content.lstrip(b"\n").partition(b"\n\n")
        lines = http_head.decode("utf-8", "replace").split("\n")
        status_line = lines[0].split()
        if len(status_line) < 2 or not status_line[1].isdigit():
            raise ConnectorError("BAD_RESPONSE", f"malformed $batch part status line {lines[0][:80]!r}")
        headers = _headers("\n".join(lines[1:]).encode())
        result.append(PartResponse(int(status_line[1]), headers, payload.strip(),
                                   mime.get("content-id") or headers.get("content-id")))
    return result


def match_parts(parts: Sequence[PartResponse], count: int, what: str) -> list[PartResponse | None]:
    """The answer to each of ``count`` requests, in request order; None for a request the service
    did not answer. Parts are matched by Content-ID when every part echoes one of ours, else by
    order (Dataverse echoes Content-ID only inside change sets, and answers in request order).
    Raises :class:`ConnectorError` ``BAD_RESPONSE`` when there are more answers than requests."""
    ids = [p.content_id for p in parts]
    if ids and all(i is not None and i.isdigit() and 1 <= int(i) <= count for i in ids) \
            and len(set(ids)) == len(ids):
        out: list[PartResponse | None] = [None] * count
        for p in parts:
            out[int(str(p.content_id)) - 1] = p
        return out
    if len(parts) > count:
        raise ConnectorError("BAD_RESPONSE", f"{what}: {len(parts)} responses for {count} requests")
    return [*parts, *([None] * (count - len(parts)))]


async def send_batch(transport: Transport, tokens: TokenProvider, base_url: str, requests: Sequence[BatchPart],
                     what: str) -> list[PartResponse | None]:
    """POST one ``$batch`` of independent requests with ``Prefer: odata.continue-on-error``;
    returns each request's answer in order (None: not answered).

    Every documented answer is taken apart the same way (Dataverse, "Execute batch operations
    using the Web API", Handle errors; OData 4.0 part 1 §11.7.4, §8.2.8.3): with the preference in
    effect, 200 and a part per request; without it the service stops at the first failed request
    and answers the parts up to and including it, with HTTP 400 (Dataverse) or 200 (OData 4.0).

    Raises :class:`ConnectorError` for a batch refused as a whole (a non-multipart 4xx) or an
    answer that cannot be read, :class:`RetryableError` when the batch itself kept failing."""
    content_type, body = build_batch(requests)
    headers = {**_ODATA_HEADERS, "Content-Type": content_type, "Prefer": "odata.continue-on-error"}
    response = await transport.request("POST", f"{_service_root(base_url)}$batch", headers=headers, content=body,
                                       auth=tokens)
    answer_type = response.headers.get("Content-Type", "")
    partial_400 = response.status_code == 400 and answer_type.lower().lstrip().startswith("multipart/mixed")
    if response.status_code not in (200, 202) and not partial_400:
        raise_for_status(response, what)
        raise ConnectorError("BAD_RESPONSE", f"{what}: HTTP {response.status_code}: {error_text(response)}")
    return match_parts(parse_batch_response(answer_type, response.content), len(requests), what)


def _part_retry_after(part: PartResponse) -> float | None:
    return retry_after_seconds(part.headers.get("retry-after"))


async def run_batches(items: Sequence[T], batch_size: int, send: Callable[[Sequence[T]], Awaitable[
        Sequence[PartResponse | None]]], transport: Transport, what: str,
                      parallel: int = 1) -> list[tuple[T, PartResponse]]:
    """Send ``items`` in batches of ``batch_size`` until each has a final answer; returns
    (item, answer) pairs, in no particular order. A final answer is a 2xx or a 4xx other than
    429: the caller decides what it means (written, rejected, absent).

    A request left unanswered (the service stopped at an earlier failure) is sent again at
    once; one answered 429 or 5xx is sent again after a backoff (and a part's ``Retry-After``
    holds every request of the client). Raises :class:`RetryableError` when
    ``policy.max_attempts`` rounds in a row answered nothing final."""
    policy = transport.policy
    limiter = asyncio.Semaphore(max(1, parallel))

    async def one(chunk: Sequence[T]) -> tuple[Sequence[T], Sequence[PartResponse | None]]:
        async with limiter:
            return chunk, await send(chunk)

    answered: list[tuple[T, PartResponse]] = []
    pending = list(items)
    stalled = transient_rounds = 0
    while pending:
        results = await asyncio.gather(*(one(pending[i:i + batch_size]) for i in range(0, len(pending), batch_size)))
        retry: list[T] = []
        progressed = transient = False
        for chunk, parts in results:
            for item, part in zip(chunk, parts, strict=True):
                if part is None:
                    retry.append(item)
                elif part.status == 429 or part.status >= 500:
                    retry.append(item)
                    transient = True
                    if (wait := _part_retry_after(part)) is not None:
                        transport.gate.hold(wait + policy.retry_after_margin)
                else:
                    answered.append((item, part))
                    progressed = True
        if not retry:
            break
        stalled = 0 if progressed else stalled + 1
        if stalled >= policy.max_attempts:
            raise RetryableError(f"{what}: {len(retry)} requests still unanswered or failing transiently after "
                                 f"{stalled} rounds")
        if transient or not progressed:
            transient_rounds += 1
            await pause(policy.backoff(transient_rounds))
        pending = retry
    return answered


class DynamicsSink(VendorApi):
    """Upserts (``PATCH {set}({id})``) and deletes (``DELETE``) through ``$batch``: independent
    requests (no change set) with ``Prefer: odata.continue-on-error``, ≤ 1,000 per batch.

    ``key_field`` is the table's primary key (the record key is then a GUID, addressed as
    ``{set}(<guid>)``) or an alternate key (addressed as ``{set}(<field>='<value>')``).
    A 404 on DELETE counts as written; other 4xx parts are ``Rejected``; 429/5xx parts are
    retried in a later batch."""

    def __init__(self, base_url: str, token_provider: TokenProvider, *, batch_size: int = MAX_BATCH_REQUESTS,
                 parallel_batches: int = 1, concurrency: int = DEFAULT_CONCURRENCY,
                 policy: RetryPolicy | None = None, transport: Transport | None = None) -> None:
        self.batch_size = _at_most("batch_size", batch_size, MAX_BATCH_REQUESTS)
        super().__init__(_service_root(base_url), token_provider, concurrency=concurrency, policy=policy,
                         transport=transport)
        self.parallel_batches = max(1, parallel_batches)

    def _url(self, entity_set: str, key_field: str, key: str) -> str:
        if _GUID.match(key):
            address = key.lower()
        else:
            address = f"{key_field}='{quote(key.replace(chr(39), chr(39) * 2), safe='')}'"
        return f"{self.base_url}{entity_set}({address})"

    def _request(self, resource: str, key_field: str, record: Record) -> BatchPart:
        url = self._url(resource, key_field, record.key)
        if record.deleted:
            return BatchPart("DELETE", url)
        values = {k: v for k, v in record.values.items() if k != key_field or not _GUID.match(record.key)}
        return BatchPart("PATCH", url, json.dumps(values, separators=(",", ":"), default=str).encode())

    async def write(self, resource: str, key_field: str, records: Sequence[Record], *,
                    full_load: bool = False) -> WriteResult:
        """Any partial answer counts: parts that succeeded are written, a rejected part is a
        ``Rejected`` (a dead letter), parts with no answer are sent again (see :func:`run_batches`)."""
        what = f"$batch to {resource}"

        async def send(chunk: Sequence[Record]) -> Sequence[PartResponse | None]:
            return await send_batch(self.transport, self.tokens, self.base_url,
                                    [self._request(resource, key_field, r) for r in chunk], what)

        written: list[str] = []
        rejected: list[Rejected] = []
        for record, part in await run_batches(records, self.batch_size, send, self.transport, what,
                                              self.parallel_batches):
            if 200 <= part.status < 300 or (record.deleted and part.status == 404):
                written.append(record.key)
            else:
                rejected.append(Rejected(record.key, part.status, _part_error(part)))
        return WriteResult(written, rejected)


def _part_error(part: PartResponse) -> str:
    try:
        text = error_text_of(json.loads(part.body or b"{}"))
    except ValueError:
        text = ""
    return text or part.body.decode("utf-8", "replace")[:500] or f"HTTP {part.status}"
