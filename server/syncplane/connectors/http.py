"""Shared HTTP plumbing for the connectors: OAuth2 client-credentials tokens, a retry
policy that honours ``Retry-After`` for every request of a client, and a concurrency cap.

Secrets never reach a log line, an exception message or a ``repr``.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Protocol
from urllib.parse import unquote

import aiohttp
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from yarl import URL

from syncplane import metrics, telemetry
from syncplane.connectors.base import ConnectorError
from syncplane.connectors.concurrency import AdaptiveLimiter
from syncplane.validation.rules import DEFAULT_MAX_CONCURRENCY

log = logging.getLogger("syncplane.connectors.http")
_tracer = trace.get_tracer("syncplane.connectors")

#: Requests in flight per client when the spec sets no ``maxConcurrency`` (the validation's
#: default: one number in one place). Dataverse allows 52 concurrent requests per user.
DEFAULT_CONCURRENCY = DEFAULT_MAX_CONCURRENCY
#: The largest response body (bytes, after decompression) a connector reads. The largest legitimate
#: page is a Dataverse page of 5,000 rows (odata.maxpagesize) of the selected columns, a few KiB
#: each (~25 MiB at 5 KiB a row), or 10,000 Campaign lines; 64 MiB leaves room above both.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Campaign Standard's API host, shared by every organisation: the organisation is the first path
#: segment (``https://mc.adobe.io/<ORGANIZATION>/campaign/...``, Adobe's "Campaign Standard API" guide,
#: "API access" and "Setting up API access").
CAMPAIGN_API_HOST = "https://mc.adobe.io"

#: The stop of the worker this code runs for, set by its engine (None outside a worker: waits
#: run their course). A context variable rather than an argument threaded through every
#: connector: each task the engine starts inherits it.
STOPPING: ContextVar[asyncio.Event | None] = ContextVar("syncplane_stopping", default=None)


class StopRequested(asyncio.CancelledError):
    """A wait (a backoff, a ``Retry-After``, a token fetch, a retry) abandoned because the worker is
    stopping. A cancellation: callers already treat one as "not done, re-done at the next start"
    (nothing was committed, writes are idempotent)."""


class TransportClosed(RuntimeError):
    """A request on a :class:`Transport` after its ``aclose``."""


def check_stopping() -> None:
    """Raise :class:`StopRequested` once the worker's stop has begun."""
    stop = STOPPING.get()
    if stop is not None and stop.is_set():
        raise StopRequested("the worker is stopping")


async def pause(seconds: float) -> None:
    """Sleep ``seconds``, unless the worker's stop begins first: then raise :class:`StopRequested`."""
    stop = STOPPING.get()
    if stop is None:
        await asyncio.sleep(seconds)
        return
    check_stopping()
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return
    raise StopRequested("the worker is stopping")


@dataclass(frozen=True)
class Credentials:
    """What a connector needs to authenticate; resolved by the caller (secret store, env…).

    Its :attr:`audience` says where a bearer token obtained with it may go: the origin of a URL
    ``scope`` (Dataverse: ``https://org.crm.dynamics.com/.default``) and, when ``organization`` is
    set (Campaign), ``<api_host>/<organization>/``."""

    client_id: str
    client_secret: str = field(repr=False)
    tenant: str | None = None
    scope: str | None = None
    api_key: str | None = None  # Campaign's X-Api-Key (defaults to the client id there)
    organization: str | None = None  # Campaign: the organisation in the API path
    api_host: str = CAMPAIGN_API_HOST  # Campaign: scheme://host[:port] of the API

    def __str__(self) -> str:
        return f"Credentials(client_id={self.client_id!r})"

    @functools.cached_property
    def audience(self) -> tuple[str, ...]:
        """URL prefixes (``scheme://host:port/path/``) this client's tokens may be sent to (worked out
        once per credentials object: its fields are frozen; new credentials are a new object)."""
        prefixes: list[str] = []
        for item in (self.scope or "").replace(",", " ").split():
            origin = _origin_prefix(item)
            if origin is not None:
                prefixes.append(origin)
        if self.organization:
            host = _origin_prefix(self.api_host)
            if host is not None and "/" not in self.organization.strip("/"):
                prefixes.append(f"{host}{self.organization.strip('/')}/")
        return tuple(dict.fromkeys(prefixes))


def _split(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, raw path) of an absolute http(s) URL without user info; None otherwise
    (a malformed one too: yarl parses the host and port when first asked, so they are asked here)."""
    try:
        u = URL(url, encoded=True)
        scheme, host, port = u.scheme, u.host, u.port
        if scheme not in ("http", "https") or not host or u.user is not None or u.password is not None:
            return None
    except (ValueError, TypeError):
        return None
    if port is None:
        return None
    return scheme, host.lower().rstrip("."), port, u.raw_path or "/"


def _origin_prefix(url: str) -> str | None:
    """``https://org.crm.dynamics.com/.default`` → ``https://org.crm.dynamics.com:443/``."""
    parts = _split(url)
    if parts is None:
        return None
    scheme, host, port, _ = parts
    return f"{scheme}://{host}:{port}/"


#: A directory (a URL without query or fragment, up to its last ``/``) and a path segment whose
#: characters have no second reading: a lowercase http(s) scheme, a host name, an optional port,
#: and path segments of RFC 3986 ``pchar`` (no user info, no IPv6 literal, no whitespace or
#: backslash that a parser might drop or read otherwise).
_PLAIN_DIRECTORY = re.compile(r"https?://[A-Za-z0-9.-]+(?::[0-9]{1,5})?(?:/[A-Za-z0-9._~!$&'()*+,;=:@%-]*)*")
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%-]*")


def audience_allows(audience: Sequence[str], url: str) -> bool:
    """Whether ``url`` lies under one of the ``audience`` prefixes (see :attr:`Credentials.audience`):
    same scheme, host and port, and a path inside the prefix's path. A path with ``.``/``..``
    segments (even percent-encoded: a server may resolve them) or user info never matches.

    Asked before every request with a token, so a URL is decided from its directory (the URL up
    to its last ``/``), parsed and checked once (:func:`_directory_allowed`), and its last segment
    (plain, not a dot segment); anything else is parsed and checked in full (:func:`_audience_allows`)."""
    path = url.partition("?")[0]
    if "#" in path:
        path = path.partition("#")[0]
    directory, _, last = path.rpartition("/")
    if (_PLAIN_SEGMENT.fullmatch(last) and unquote(last) not in (".", "..")
            and _directory_allowed(audience if isinstance(audience, tuple) else tuple(audience), directory)):
        return True
    return _audience_allows(audience, url)


def stored_link_allowed(endpoint: str, link: str) -> bool:
    """Whether a vendor link kept as a checkpoint (``@odata.nextLink``/``@odata.deltaLink``, Campaign's
    ``next.href``) may still be followed: it lies under ``endpoint``, the source's endpoint as now
    configured (the same rule as :func:`audience_allows`). Both vendors give their links under the URL
    they were asked at (OData 4.0 part 1 §11.2.5.7 "the next link"; Campaign Standard API "Pagination"), so a
    link that is not was made by an endpoint an edit has since replaced: the reader discards it and
    starts from its last safe point instead of failing every read (``UNTRUSTED_ORIGIN``)."""
    return audience_allows((endpoint,), link)


@functools.lru_cache(maxsize=256)
def _directory_allowed(audience: tuple[str, ...], directory: str) -> bool:
    """Whether every URL ``<directory>/<segment>`` (one plain segment, not a dot segment) is in
    ``audience``: the directory is plain (:data:`_PLAIN_DIRECTORY`), has no dot segment and lies
    inside an allowed prefix's path. False only means "check in full": an audience path may end
    inside the last segment.

    Bounded: one entry per (audience, directory) a process's clients request, a few per resource
    (a listing, a record path, a schema path): 256 covers them, and the links a service returns
    (``@odata.nextLink``, ``next.href``) cannot grow it past that (the least recently used go)."""
    return bool(_PLAIN_DIRECTORY.fullmatch(directory)) and _under_prefix(audience, directory + "/", "")


def _audience_allows(audience: Sequence[str], url: str) -> bool:
    """:func:`audience_allows`, deciding from ``url`` alone: parsed and checked in full."""
    return _under_prefix(audience, url, "/")


def _under_prefix(audience: Sequence[str], url: str, tail: str) -> bool:
    """Whether ``url`` (parsed, no dot segment) has the scheme, host and port of an ``audience``
    prefix and its path followed by ``tail`` starts with that prefix's path (``/``-terminated)."""
    parts = _split(url)
    if parts is None:
        return False
    scheme, host, port, path = parts
    if any(unquote(seg) in (".", "..") for seg in path.split("/")):
        return False
    for prefix in audience:
        allowed = _split(prefix)
        if allowed is None:
            continue
        a_scheme, a_host, a_port, a_path = allowed
        a_path = a_path if a_path.endswith("/") else a_path + "/"
        if (scheme, host, port) == (a_scheme, a_host, a_port) and (path + tail).startswith(a_path):
            return True
    return False


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL, for messages (no path, no query: they may carry keys)."""
    parts = _split(url)
    return f"{parts[0]}://{parts[1]}:{parts[2]}" if parts else "(not an absolute http(s) URL)"


class ResponseTooLarge(ConnectorError):
    """A response body above the transport's bound: the request fails, nothing more is read."""

    def __init__(self, method: str, url: str, limit: int) -> None:
        super().__init__("RESPONSE_TOO_LARGE", f"{method} {_redact(url)}: the response body exceeds {limit} bytes "
                         "(the connectors' bound on a response); refused")


class UntrustedOrigin(ConnectorError):
    """A request with a bearer token to a URL outside the credentials' audience: never sent."""

    def __init__(self, method: str, url: str, credentials: Credentials) -> None:
        allowed = ", ".join(credentials.audience) or "nothing (no origin declared)"
        super().__init__("UNTRUSTED_ORIGIN", f"{method} {origin_of(url)}{_path_of(url)}: refused, the credentials of "
                         f"client id {credentials.client_id!r} are only for {allowed}; nothing was sent")


_VENDOR_HOST_API = "/api/data/"       # Dataverse Web API: /api/data/v9.2/<entity set>...
_ID_LIKE = re.compile(r"^(@.*|[0-9a-fA-F-]{32,36}|.*\d.*\d.*\d.*)$")  # a PKey, a GUID, a number-heavy id


def endpoint_of(url: str) -> tuple[str, str]:
    """The vendor and endpoint template of a request URL, for metric labels and span names: low
    cardinality, without query, keys or ids. ``https://org.crm.dynamics.com/api/data/v9.2/contacts(1f..)``
    → ``("dynamics365", "/api/data/v9.2/contacts({key})")``; Campaign's organisation becomes
    ``{organization}``, a PKey ``{PKey}``, an Entra tenant ``{tenant}``, another id ``{id}``."""
    path = _path_of(url)
    segments = [s for s in path.split("/") if s]
    vendor = "other"
    if "campaign" in segments[1:2]:
        vendor = "campaign"
        segments[0] = "{organization}"
    elif path.startswith(_VENDOR_HOST_API):
        vendor = "dynamics365"
    elif segments[-2:] == ["v2.0", "token"] and "oauth2" in segments:
        vendor, segments[0] = "entra_id", "{tenant}"
    elif segments[:1] == ["ims"]:
        vendor = "adobe_ims"
    return vendor, "/" + "/".join(seg if i == 0 else _segment_template(seg) for i, seg in enumerate(segments))


def _segment_template(segment: str) -> str:
    """A path segment as it appears in an endpoint template: a key in parentheses, a PKey or an id replaced."""
    if "(" in segment:
        return segment[:segment.index("(")] + "({key})"
    if segment.startswith(("$", "{")) or segment == "v9.2":
        return segment
    plain = unquote(segment)
    if _ID_LIKE.match(plain):
        return "{PKey}" if plain.startswith("@") else "{id}"
    return segment


def _path_of(url: str) -> str:
    parts = _split(url)
    return parts[3] if parts else ""


class RetryableError(Exception):
    """A transient failure that outlived the retry budget: try again later (not a poison record)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RetryPolicy:
    """How a request is retried: attempts for failures and throttling, backoff delays in seconds."""

    max_attempts: int = 8  # for 5xx, timeouts and connection errors
    max_throttled: int = 30  # 429s (and 503s carrying Retry-After) tolerated per request
    base_delay: float = 0.1  # seconds; full jitter: uniform(0, min(cap, base * 2**attempt))
    max_delay: float = 10.0
    retry_after_margin: float = 0.01  # added to Retry-After: never early, even with clock rounding

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): full jitter over the capped exponential."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2 ** attempt)))


@dataclass
class LinkHealth:
    """How the requests to one vendor API fare, for the worker's status: since when (epoch
    seconds) every exchange has failed, and the last failure. A failure is a 429, a 5xx, a
    refused or dropped connection or a timeout (each attempt, retried or not); any other answer
    is a success and clears it. Only exchange outcomes are kept: never a body or a query."""

    failing_since: float | None = None
    error: str = ""
    status: int | None = None        # the last failure's HTTP status; None: no answer at all
    throttled: bool = False          # the last failure was a 429 (the vendor's throttling)
    # The API's requests in flight allowed now (adaptive, see connectors.concurrency) and at most
    # (the spec's maxConcurrency); 0: no API transport reports on this link.
    concurrency: int = 0
    max_concurrency: int = 0

    def failed(self, error: str, status: int | None) -> None:
        """An exchange failed with ``error`` (no body, no query) and HTTP ``status`` (None: no answer)."""
        if self.failing_since is None:
            self.failing_since = time.time()
        self.error, self.status, self.throttled = error, status, status == 429

    def succeeded(self) -> None:
        """An exchange got an answer other than a failure: the link is healthy again."""
        if self.failing_since is not None:
            self.failing_since, self.error, self.status, self.throttled = None, "", None, False


class RetryGate:
    """"Not before" instant shared by every request of one client: a ``Retry-After`` holds them all.
    It also carries the client's :class:`LinkHealth` (the same sharing: a token endpoint and the
    API it serves are one link)."""

    def __init__(self) -> None:
        self._until = 0.0
        self.health = LinkHealth()

    def hold(self, seconds: float) -> None:
        """Hold every request of the client for ``seconds`` from now (never shortens a hold)."""
        self._until = max(self._until, time.monotonic() + seconds)

    @property
    def remaining(self) -> float:
        """Seconds left before requests may go out again (0.0: none held)."""
        return max(0.0, self._until - time.monotonic())

    async def wait(self) -> None:
        """Return once no hold is left (a stop abandons the wait: see `pause`)."""
        # The deadline can move while we sleep (another 429), hence the loop.
        while (delay := self._until - time.monotonic()) > 0:
            await pause(delay)


@dataclass(frozen=True)
class Response:
    """An HTTP response, read whole: what the connectors look at."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not."""
        return json.loads(self.content)

    @property
    def text(self) -> str:
        """The body as text (UTF-8, undecodable bytes replaced)."""
        return self.content.decode("utf-8", errors="replace")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` value in seconds from ``now`` (Unix time; default: the clock), or None.

    Both forms of RFC 9110 §10.2.3: delta-seconds (what Dataverse documents, "Service
    protection API limits") and an HTTP-date (allowed by HTTP, documented by neither vendor:
    honoured all the same, never treated as absent, which would retry early)."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _retry_after(headers: Mapping[str, str]) -> float | None:
    return retry_after_seconds(headers.get("Retry-After"))


class _GatedConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, waiting out a client's :class:`RetryGate` once a request holds a
    connection (new or reused), right before aiohttp writes the request on it.

    A subclass rather than a ``TraceConfig`` with connection hooks (what this was): with any
    ``TraceConfig`` aiohttp builds and sends its other six signals for every request as well,
    about 4% of the ingress worker's CPU at 0 ms latency. ``connect(req, traces, timeout)`` is
    the connector's entry point ``ClientSession`` calls (aiohttp 3.x)."""

    def __init__(self, gate: RetryGate, *, limit: int) -> None:
        super().__init__(limit=limit)
        self._gate = gate

    async def connect(self, req: aiohttp.ClientRequest, traces: list[Trace],
                      timeout: aiohttp.ClientTimeout) -> Connection:
        """A connection for ``req``, once the gate lets requests go (see :meth:`RetryGate.wait`)."""
        conn = await super().connect(req, traces, timeout)
        try:
            await self._gate.wait()
        except BaseException:
            conn.release()  # nothing was written on it: back to the pool
            raise
        return conn


class Transport:
    """A pooled aiohttp session + adaptive concurrency cap + retry policy + shared Retry-After gate.

    ``concurrency`` is the most requests in flight; below it the transport adapts (AIMD, see
    :mod:`syncplane.connectors.concurrency`): halved on a 429, a 5xx or a failed connection,
    cut on rising latency, grown by one per clean window. The current value is published on the
    gate's :class:`LinkHealth` (``concurrency`` / ``max_concurrency``) unless ``adaptive`` is
    False (a fixed cap, e.g. a token endpoint's).

    aiohttp rather than httpx: the ingress worker was CPU-bound in httpx's connection pool
    (about 0.8 ms of worker CPU per record; about 0.15 ms with aiohttp, same sandbox run).

    The gate is checked twice: before a request takes a connection, and again once it has one,
    right before aiohttp writes the request (:class:`_GatedConnector`): acquiring a connection
    may yield, and meanwhile a Retry-After may arrive.
    A throttling response holds the gate as soon as its headers are in, before its body is read
    and its connection goes back to the pool for the next request to reuse."""

    def __init__(self, *, concurrency: int = DEFAULT_CONCURRENCY, policy: RetryPolicy | None = None,
                 gate: RetryGate | None = None, timeout: float = 60.0,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES, adaptive: bool = True) -> None:
        self.policy = policy or RetryPolicy()
        self.max_response_bytes = max_response_bytes
        self.gate = gate or RetryGate()
        self.concurrency = concurrency
        self.limiter = AdaptiveLimiter(concurrency, adaptive=adaptive)
        self._publish()
        self.timeout = aiohttp.ClientTimeout(total=timeout, connect=10.0)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.sent = 0  # requests that went out (retries included), e.g. for verify's report

    def _publish(self) -> None:
        if self.limiter.adaptive:
            self.gate.health.concurrency = self.limiter.current
            self.gate.health.max_concurrency = self.limiter.maximum

    def _client(self) -> aiohttp.ClientSession:
        """The session, made on first use (it belongs to the running event loop).

        Raises:
            TransportClosed: after :meth:`aclose` (a request still running then, e.g. the sibling
                of a failed ``gather``, must not open a session nobody closes).
        """
        if self._closed:
            raise TransportClosed("the transport is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=_GatedConnector(self.gate, limit=self.concurrency), timeout=self.timeout,
                raise_for_status=False)
        return self._session

    async def _send(self, method: str, url: str, headers: dict[str, str], content: bytes | None, json_body: Any,
                    data: Mapping[str, str] | None, attempt: int = 1) -> tuple[Response, float | None]:
        """One exchange (attempt number ``attempt`` of the request). Returns the response and the
        Retry-After of a throttling one. A client span per exchange, named ``METHOD url.template``, with the
        attributes of :func:`request_attributes` and ``attempt``: never the query, a header or a body."""
        body: Any = content if content is not None else (dict(data) if data is not None else None)
        self.sent += 1
        endpoint = _endpoint(method, url)
        # No span work at all while no tracer provider is set: the no-op span would record nothing.
        span = _tracer.start_span(endpoint.span_name, kind=SpanKind.CLIENT,
                                  attributes={**endpoint.attributes, "attempt": attempt}, record_exception=False,
                                  set_status_on_exception=False) if telemetry.tracing() else None
        attributes: Mapping[str, Any] = endpoint.attributes
        started = time.perf_counter()
        try:
            async with self._client().request(method, URL(url, encoded=True), headers=headers, data=body,
                                              json=json_body, allow_redirects=False) as resp:
                attributes = endpoint.answered(resp.status)
                if resp.status == 429:
                    metrics.http_client_throttled.add(1, endpoint.labels)
                wait = None
                if resp.status == 429 or resp.status >= 500:
                    wait = _retry_after(resp.headers)
                    if wait is not None:
                        # Hold every request of this client, not just this one.
                        self.gate.hold(wait + self.policy.retry_after_margin)
                return Response(resp.status, resp.headers, await self._read_bounded(method, url, resp)), wait
        except BaseException as exc:
            if "error.type" not in attributes:
                attributes = {**attributes, "error.type": type(exc).__qualname__}
            raise
        finally:
            metrics.http_client_duration.record(time.perf_counter() - started, attributes)
            if span is not None:
                if span.is_recording():
                    for key in ("http.response.status_code", "error.type"):
                        if key in attributes:
                            span.set_attribute(key, attributes[key])
                    if "error.type" in attributes:
                        span.set_status(StatusCode.ERROR, str(attributes["error.type"]))
                span.end()

    async def _read_bounded(self, method: str, url: str, resp: aiohttp.ClientResponse) -> bytes:
        """The body, decompressed, refused past :attr:`max_response_bytes` (checked as it arrives:
        a lying or absent Content-Length changes nothing)."""
        limit = self.max_response_bytes
        length = resp.content_length
        if length is not None and length > limit:
            raise ResponseTooLarge(method, url, limit)
        if length is not None and "Content-Encoding" not in resp.headers and "Transfer-Encoding" not in resp.headers:
            # Framed by its Content-Length alone and not compressed: aiohttp reads that many bytes and
            # no more (what a lying server sends past them is not this body), so the bound holds
            # without counting chunk by chunk (most answers: a write's, a page's).
            return await resp.read()
        body = bytearray()
        async for chunk in resp.content.iter_chunked(1 << 16):
            body += chunk
            if len(body) > limit:
                raise ResponseTooLarge(method, url, limit)
        return bytes(body)

    async def request(self, method: str, url: str, *, headers: Mapping[str, str] | None = None,
                      content: bytes | None = None, json: Any = None, data: Mapping[str, str] | None = None,
                      auth: TokenProvider | None = None) -> Response:
        """Send with retries. Returns the final response: 2xx, a non-retryable 4xx, or a 401
        that survived one token refresh. Raises :class:`RetryableError` when retries run out."""
        if auth is not None and not audience_allows(auth.credentials.audience, url):
            # The one place every connector request with a token passes: spec endpoints and the
            # links a service returns (@odata.nextLink, @odata.deltaLink, Campaign's next.href).
            raise UntrustedOrigin(method, url, auth.credentials)
        policy = self.policy
        failures = 0
        throttled = 0
        refreshed = False
        while True:
            if failures or throttled or refreshed:
                check_stopping()   # no retry once a stop has begun
            hdrs = dict(headers or {})
            token: str | None = None
            if auth is not None:
                token = await auth.token()
                hdrs["Authorization"] = f"Bearer {token}"
            wait: float | None = None
            epoch = await self.limiter.acquire()
            try:
                await self.gate.wait()
                started = time.monotonic()
                try:
                    response, wait = await self._send(method, url, hdrs, content, json, data,
                                                      failures + throttled + refreshed + 1)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.gate.health.failed(f"{method} {_redact(url)}: {type(exc).__name__}", None)
                    self.limiter.failed(epoch)
                    failures += 1
                    if failures >= policy.max_attempts:
                        raise RetryableError(f"{method} {_redact(url)}: {type(exc).__name__} after "
                                             f"{failures} attempts") from exc
                    error: BaseException | None = exc
                else:
                    error = None
                    if response.status_code == 429 or response.status_code >= 500:
                        self.limiter.failed(epoch)
                    else:
                        self.limiter.succeeded(time.monotonic() - started)
            finally:
                self.limiter.release()
                self._publish()
            if error is not None:
                _retried(url, "connection")
                delay = policy.backoff(failures)
                log.debug("%s %s: %s, retrying in %.2fs", method, _redact(url), type(error).__name__, delay)
                await pause(delay)
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                self.gate.health.failed(f"{method} {_redact(url)}: HTTP {status}", status)
            else:
                self.gate.health.succeeded()
            if status == 401 and auth is not None and not refreshed:
                refreshed = True
                assert token is not None
                await auth.refresh(token)
                continue
            if status == 429 or (status >= 500 and wait is not None):
                throttled += 1
                if throttled > policy.max_throttled:
                    raise RetryableError(f"{method} {_redact(url)}: still throttled after {throttled} tries", status)
                _retried(url, "throttled")
                if wait is None:
                    await pause(policy.backoff(min(throttled, 8)))
                continue  # the gate makes us wait Retry-After
            if status >= 500:
                failures += 1
                if failures >= policy.max_attempts:
                    raise RetryableError(f"{method} {_redact(url)}: HTTP {status} after {failures} attempts", status)
                _retried(url, "server_error")
                await pause(policy.backoff(failures))
                continue
            return response

    async def aclose(self) -> None:
        """Close the pooled session; later requests fail. Idempotent."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


def request_attributes(method: str, url: str) -> dict[str, Any]:
    """The semantic-convention attributes of a vendor request (``http.request.method``,
    ``server.address``, ``server.port``, ``url.template``) plus ``vendor`` and ``workflow``: the
    labels of its metrics and span, a new dict. Never the query or a key."""
    return dict(_endpoint(method, url).attributes)


class _Endpoint:
    """The telemetry of one endpoint (method, URL template, workflow), worked out once: the request
    attributes, the span name, the vendor labels of its counters, and the attributes of each
    answer (the request's plus ``http.response.status_code``, and ``error.type`` for 4xx/5xx).
    Its dicts are shared: never changed once made (OpenTelemetry copies what it keeps)."""

    __slots__ = ("_answered", "attributes", "labels", "span_name")

    def __init__(self, attributes: dict[str, Any]) -> None:
        self.attributes = attributes
        self.span_name = f"{attributes['http.request.method']} {attributes['url.template']}"
        self.labels: dict[str, Any] = {k: attributes[k] for k in ("vendor", "server.address", "workflow")
                                       if k in attributes}
        # One entry per status code this endpoint answered: at most the 500 codes HTTP has.
        self._answered: dict[int, dict[str, Any]] = {}

    def answered(self, status: int) -> dict[str, Any]:
        """The attributes of an answer with HTTP ``status`` (shared: do not change)."""
        attributes = self._answered.get(status)
        if attributes is None:
            attributes = {**self.attributes, "http.response.status_code": status}
            if status >= 400:
                attributes["error.type"] = str(status)
            self._answered[status] = attributes
        return attributes


def _endpoint(method: str, url: str) -> _Endpoint:
    """The :class:`_Endpoint` of a request. Once per request (for Campaign, once per record):
    everything but the last path segment is parsed once per endpoint (cached), the last one is
    only classified."""
    head, _, last = url.split("?", 1)[0].rpartition("/")
    return _endpoint_of(method, f"{head}/{_segment_template(last)}", metrics.WORKFLOW.get())


@functools.lru_cache(maxsize=1024)
def _endpoint_of(method: str, url: str, workflow: str) -> _Endpoint:
    """Bounded by endpoint templates, not by record URLs: ``url`` has its last segment templated
    (a PKey, a key, an id), its query dropped; 1,024 holds every endpoint of every vendor a process
    calls, per workflow, many times over (least recently used go)."""
    parts = _split(url)
    vendor, template = endpoint_of(url)
    attributes: dict[str, Any] = {"http.request.method": method, "vendor": vendor, "url.template": template,
                                  **metrics.workflow_attributes(workflow)}
    if parts is not None:
        attributes["server.address"], attributes["server.port"] = parts[1], parts[2]
    return _Endpoint(attributes)


def _retried(url: str, reason: str) -> None:
    metrics.http_client_retries.add(1, {**_endpoint("", url).labels, "reason": reason})


def _redact(url: str) -> str:
    """A URL for messages: without its query string (tokens, keys)."""
    return url.split("?", 1)[0]


class TokenProvider(Protocol):
    """Bearer tokens for one API's requests."""

    gate: RetryGate
    credentials: Credentials  # its audience bounds where the token may go

    async def token(self) -> str:
        """A token valid now (cached until it nears expiry). Raises `ConnectorError` BAD_CREDENTIALS."""
        ...

    async def refresh(self, stale: str) -> str:
        """A token other than ``stale``, which an API answered 401 to."""
        ...

    async def aclose(self) -> None:
        """Close what the provider opened; idempotent."""
        ...


class OAuth2ClientCredentials:
    """OAuth2 client-credentials tokens (Entra ID for Dataverse, Adobe IMS for Campaign).

    The token is cached and refreshed at ``refresh_ratio`` of its ``expires_in``, and once
    more on demand (:meth:`refresh`) when an API call answers 401 mid-run. Concurrent
    callers share one token request."""

    def __init__(self, token_url: str, credentials: Credentials, *, scope: str | None = None,
                 refresh_ratio: float = 0.8, transport: Transport | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.token_url = token_url
        self._clock = clock
        self.credentials = credentials
        self.scope = scope if scope is not None else credentials.scope
        self.refresh_ratio = refresh_ratio
        self._own_transport = transport is None
        self.transport = transport or Transport(concurrency=2, adaptive=False)
        self.gate = self.transport.gate
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0  # token requests made (for tests and metrics)

    async def token(self) -> str:
        """The cached token, or a new one past ``refresh_ratio`` of its lifetime.

        Raises `ConnectorError` ``BAD_CREDENTIALS`` when the token endpoint refuses (the message
        names the client id, never the secret).
        """
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        async with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token
            return await self._fetch()

    async def refresh(self, stale: str) -> str:
        """A 401 with ``stale``: fetch a new token unless another caller already did."""
        async with self._lock:
            if self._token is not None and self._token != stale and self._clock() < self._refresh_at:
                return self._token
            return await self._fetch()

    async def _fetch(self) -> str:
        check_stopping()   # a stopping worker fetches no token: what it would be for is abandoned too
        creds = self.credentials
        form = {"client_id": creds.client_id, "client_secret": creds.client_secret,
                "grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        started = self._clock()
        response = await self.transport.request("POST", self.token_url, data=form,
                                                headers={"Accept": "application/json"})
        self.fetches += 1
        if response.status_code != 200:
            raise ConnectorError("BAD_CREDENTIALS", self._describe_failure(response))
        try:
            body = response.json()
            value = str(body["access_token"])
            lifetime = float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise ConnectorError("BAD_CREDENTIALS", f"token endpoint answered without an access token for client id "
                                 f"{creds.client_id!r}") from None
        self._token = value
        self._refresh_at = started + lifetime * self.refresh_ratio
        log.debug("token for client id %s, expires in %ss", creds.client_id, lifetime)
        return value

    def _describe_failure(self, response: Response) -> str:
        detail = ""
        try:
            body = response.json()
            if isinstance(body, dict):
                detail = str(body.get("error_description") or body.get("error") or "")
        except ValueError:
            pass
        message = (f"token request for client id {self.credentials.client_id!r} refused with HTTP "
                   f"{response.status_code}" + (f": {detail}" if detail else ""))
        secret = self.credentials.client_secret
        return message.replace(secret, "***") if secret else message

    async def aclose(self) -> None:
        """Close the transport when this provider opened it; idempotent."""
        if self._own_transport:
            await self.transport.aclose()


class VendorApi:
    """A client of one vendor API: its ``base_url``, its ``tokens`` and the :class:`Transport` it calls
    through, either the one given (shared: its owner closes it) or one of its own (at most ``concurrency``
    requests at once, retried by ``policy``, behind the token provider's retry gate), closed by
    :meth:`aclose`."""

    def __init__(self, base_url: str, token_provider: TokenProvider, *, concurrency: int,
                 policy: RetryPolicy | None, transport: Transport | None) -> None:
        self.base_url = base_url
        self.tokens = token_provider
        self._own_transport = transport is None
        self.transport = transport or Transport(concurrency=concurrency, policy=policy, gate=token_provider.gate)

    async def aclose(self) -> None:
        """Close the HTTP transport when this object opened it; idempotent."""
        if self._own_transport:
            await self.transport.aclose()


def raise_for_status(response: Response, what: str) -> None:
    """Non-2xx that retrying will not fix → :class:`ConnectorError` (reason by status)."""
    status = response.status_code
    if status < 400:
        return
    reason = {401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND"}.get(status, "REQUEST_REJECTED")
    raise ConnectorError(reason, f"{what}: HTTP {status}: {error_text(response)}")


def error_text(response: Response) -> str:
    """The vendor's error message (OData ``error.code/message`` or Campaign ``error_code/message``)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    return error_text_of(body) or response.text[:500]


def error_text_of(body: Any) -> str:
    """The error message of a parsed JSON error body (OData or Campaign shape); "" for another shape."""
    if not isinstance(body, dict):
        return ""
    err = body.get("error")
    if isinstance(err, dict):
        return f"{err.get('code', '')}: {err.get('message', '')}".strip(": ")
    if "message" in body:
        code = body.get("error_code", "")
        return f"{code}: {body['message']}" if code else str(body["message"])
    return ""
