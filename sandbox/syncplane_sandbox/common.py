"""Machinery shared by both emulators: credentials, clock, OAuth token issuing,
the request log, fault injection, per-client service protection and the aiohttp
middleware that ties them together."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import hmac
import json
import math
import random
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from aiohttp import web

# --------------------------------------------------------------------------- constants

SANDBOX_HEADER = "X-Syncplane-Sandbox"
SANDBOX_HEADER_VALUE = "emulator"

#: Fixed credentials accepted by both emulators' token endpoints. Not secret:
#: they only open the local sandbox. Never logged by the sandbox itself.
SANDBOX_CLIENT_ID = "syncplane-sandbox-client"
SANDBOX_CLIENT_SECRET = "syncplane-sandbox-secret-local-only"
#: Azure AD tenant in the D365 token URL (``/{tenant}/oauth2/v2.0/token``).
SANDBOX_TENANT_ID = "5a4db0c0-5a4d-4b0c-8000-00000000d365"
#: Campaign organisation in the ACS base URL (``/{org}/campaign/``).
SANDBOX_ACS_ORG = "sandbox"

Json = Any
CONTROL_PREFIX = "/_sandbox"


def dumps(data: Json) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(data: Json, status: int = 200, headers: dict[str, str] | None = None,
                  content_type: str = "application/json; charset=utf-8") -> web.Response:
    hdrs = {"Content-Type": content_type}
    if headers:
        hdrs.update(headers)
    return web.Response(body=dumps(data), status=status, headers=hdrs)


def b64url_encode(data: Json) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(token: str) -> Json:
    """Inverse of :func:`b64url_encode`; raises ``ValueError`` on garbage."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("malformed token") from exc


# --------------------------------------------------------------------------- clock


class SandboxClock:
    """Wall and monotonic time with a test-controlled forward offset.

    Token lifetimes, delta-token ages, ``modifiedon``/``lastModified`` stamps and the
    service-protection windows all use this clock, so a test can make a token expire
    or a window elapse with :meth:`advance` instead of sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the sandbox clock only moves forward")
        self.offset += seconds


# --------------------------------------------------------------------------- tokens


@dataclass(slots=True)
class IssuedToken:
    value: str
    client_id: str
    expires_at: float  # SandboxClock.time()


class TokenIssuer:
    """Client-credentials grant: fixed client id/secret pairs in, opaque bearer tokens out."""

    def __init__(self, clock: SandboxClock, lifetime: float, prefix: str) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self._prefix = prefix
        self._clients: dict[str, str] = {SANDBOX_CLIENT_ID: SANDBOX_CLIENT_SECRET}
        self._tokens: dict[str, IssuedToken] = {}

    def add_client(self, client_id: str, client_secret: str) -> None:
        """Register another application user (service protection is per client)."""
        self._clients[client_id] = client_secret

    def known_client(self, client_id: str) -> bool:
        return client_id in self._clients

    def check_secret(self, client_id: str, client_secret: str) -> bool:
        expected = self._clients.get(client_id)
        return expected is not None and hmac.compare_digest(expected.encode(), client_secret.encode())

    def issue(self, client_id: str) -> IssuedToken:
        if len(self._tokens) > 10_000:
            now = self.clock.time()
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
        token = IssuedToken(self._prefix + secrets.token_urlsafe(32), client_id, self.clock.time() + self.lifetime)
        self._tokens[token.value] = token
        return token

    def lookup(self, value: str) -> IssuedToken | None:
        """The token as issued, expired or not (for identifying the caller)."""
        return self._tokens.get(value)

    def validate(self, value: str) -> str | None:
        """The client id of a known, unexpired token, else None."""
        token = self._tokens.get(value)
        if token is None or token.expires_at <= self.clock.time():
            return None
        return token.client_id

    def expire_all(self) -> int:
        """Make every token issued so far expire now; returns how many were live."""
        now = self.clock.time()
        live = 0
        for token in self._tokens.values():
            if token.expires_at > now:
                live += 1
                token.expires_at = now
        return live


def bearer_of(request: web.BaseRequest) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


# --------------------------------------------------------------------------- request log


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request as the emulator saw it (control calls under ``/_sandbox`` excluded)."""

    seq: int
    server: str  # "d365" | "acs"
    received_monotonic: float  # time.monotonic() of this process (not the sandbox clock)
    received_wall: float  # time.time()
    responded_monotonic: float | None  # None while in flight
    method: str
    path: str  # path + query as sent
    status: int | None  # None = in flight; 0 = connection dropped without a response (injected timeout)
    retry_after: float | None  # the Retry-After header sent, in seconds
    client: str | None  # the OAuth client id behind the token (or form / X-Api-Key)
    fault: str | None  # "429" | "503" | "timeout" | "status:NNN" | "latency" | "service-protection"
    duration_ms: float | None
    connection: str | None = None  # the client's address:port: one TCP connection
    prefer: str | None = None  # the request's Prefer header (what it asked for: paging, annotations, …)

    def to_json(self) -> dict[str, Json]:
        return asdict(self)


class RequestLog:
    """Bounded, ordered log of requests from both servers."""

    def __init__(self, maxlen: int = 200_000) -> None:
        self._records: deque[RequestRecord] = deque(maxlen=maxlen)
        self._seq = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def append(self, record: RequestRecord) -> None:
        self._records.append(record)

    def clear(self) -> None:
        self._records.clear()

    def records(self, since: int = 0, server: str | None = None, client: str | None = None) -> list[RequestRecord]:
        """Records with ``seq > since``, in arrival order."""
        return [r for r in self._records
                if r.seq > since and (server is None or r.server == server) and (client is None or r.client == client)]

    def __len__(self) -> int:
        return len(self._records)

    def retry_after_violations(self, server: str | None = None,
                               in_flight_grace: float = 0.0) -> list[tuple[RequestRecord, RequestRecord]]:
        """Pairs (throttling response, offending request): a request from the same client
        sent after a response carrying ``Retry-After`` had reached it, before that many
        seconds had elapsed.

        The server sees when a request arrives, not when it was sent. On the connection
        that carried the throttling response, HTTP/1.1 orders them: any later request there
        was sent after the response was read, so it is checked strictly. On the client's
        other connections a request may already have been in flight (queued in the server
        while the response went out): it counts once it arrives ``in_flight_grace`` seconds
        after the response."""
        by_client: dict[tuple[str, str | None], list[RequestRecord]] = {}
        for rec in self.records(server=server):
            by_client.setdefault((rec.server, rec.client), []).append(rec)
        violations: list[tuple[RequestRecord, RequestRecord]] = []
        for recs in by_client.values():
            for th in recs:
                if th.retry_after is None or th.responded_monotonic is None:
                    continue
                sent = th.responded_monotonic
                until = sent + th.retry_after
                for other in recs:
                    same = th.connection is not None and other.connection == th.connection
                    start = sent if same else sent + in_flight_grace
                    if start < other.received_monotonic < until:
                        violations.append((th, other))
        return violations


def _peer(request: web.Request) -> str | None:
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else None


# --------------------------------------------------------------------------- faults


@dataclass
class FaultConfig:
    """Probabilistic faults; each request draws once from a seeded RNG, in arrival order."""

    rate_429: float = 0.0
    rate_503: float = 0.0
    rate_timeout: float = 0.0
    latency_ms: float = 0.0
    retry_after_s: int = 1
    hang_s: float = 30.0  # how long an injected timeout hangs before dropping the connection
    path_regex: str | None = None  # only requests whose path matches (default: every API path)
    include_auth: bool = False  # also hit the token endpoints
    # How Retry-After is written (RFC 9110 §10.2.3): "seconds" (delta-seconds, what Dataverse
    # documents) or "http-date" (an IMF-fixdate, allowed by HTTP; documented by neither vendor).
    retry_after_form: str = "seconds"


RETRY_AFTER_FORMS = ("seconds", "http-date")


def retry_after_value(seconds: int, form: str) -> str:
    """The ``Retry-After`` header for a wait of ``seconds``, in ``form`` (see FaultConfig)."""
    if form == "http-date":
        # rounded up to the next whole second: the date is never earlier than the wait
        return email.utils.formatdate(math.ceil(time.time()) + seconds, usegmt=True)
    return str(seconds)


def parse_retry_after(value: str) -> float | None:
    """Seconds from now of a ``Retry-After`` in either form; None when unreadable."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None


@dataclass(slots=True)
class ScriptedFault:
    status: int  # 0 = timeout (hang, then drop)
    retry_after: int | None
    path_regex: str | None


#: The methods that write, held by default (a hold on reads would stall a test before its writes).
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(slots=True)
class Hold:
    """Requests held before they are served, until released: ``methods`` (upper case) on the
    paths matching ``path_regex`` (every API path when None), never the token endpoints."""

    path_regex: str | None
    methods: frozenset[str]
    released: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and (self.path_regex is None or re.search(self.path_regex, path) is not None)

    def to_json(self) -> dict[str, Json]:
        return {"path_regex": self.path_regex, "methods": sorted(self.methods), "waiting": self.waiting}


@dataclass(slots=True)
class FaultDecision:
    name: str  # "429" | "503" | "timeout" | "status:NNN"
    status: int
    retry_after: int | None
    latency_s: float


class Faults:
    """Fault injection for one emulator. Controlled from Python (``set``, ``queue``,
    ``reset``) or over HTTP (``/_sandbox/faults``)."""

    def __init__(self, seed: int = 0) -> None:
        self.config = FaultConfig()
        self._seed = seed
        self._rng = random.Random(seed)
        self._script: deque[ScriptedFault] = deque()
        self._release = asyncio.Event()
        self._hold: Hold | None = None

    def set(self, seed: int | None = None, **changes: Any) -> FaultConfig:
        """Change some settings, e.g. ``set(rate_429=0.1, retry_after_s=2)``; a new seed
        restarts the random sequence."""
        valid = {f.name for f in fields(FaultConfig)}
        unknown = set(changes) - valid
        if unknown:
            raise ValueError(f"unknown fault settings: {sorted(unknown)}")
        for name, value in changes.items():
            setattr(self.config, name, value)
        for rate in (self.config.rate_429, self.config.rate_503, self.config.rate_timeout):
            if not 0.0 <= rate <= 1.0:
                raise ValueError("rates are fractions between 0 and 1")
        if self.config.path_regex is not None:
            re.compile(self.config.path_regex)
        if self.config.retry_after_form not in RETRY_AFTER_FORMS:
            raise ValueError(f"retry_after_form must be one of {', '.join(RETRY_AFTER_FORMS)}")
        if seed is not None:
            self._seed = seed
            self._rng = random.Random(seed)
        return self.config

    def reset(self) -> None:
        """No faults, empty script, nothing held (held requests go on), RNG restarted from the seed."""
        self.config = FaultConfig()
        self._script.clear()
        self._rng = random.Random(self._seed)
        self.release_held()

    def hold(self, path_regex: str | None = None, methods: Iterable[str] = WRITE_METHODS) -> None:
        """Hold every API request of ``methods`` on a path matching ``path_regex`` (default: every
        write, on any API path; never the token endpoints) before it is served, until
        :meth:`release_held`: a destination that takes exactly as long as a test needs to observe
        a state (a backlog) that fast writes would pass by, whatever the machine's speed. A held
        request counts as in flight; a client that gives up on it sees a timeout."""
        if path_regex is not None:
            try:
                re.compile(path_regex)
            except re.error as exc:
                raise ValueError(f"path_regex: {exc}") from None
        if isinstance(methods, str):
            raise TypeError("methods is a list of HTTP methods, e.g. [\"POST\", \"PATCH\"]")
        upper = frozenset(m.upper() for m in methods)
        if not upper:
            raise ValueError("hold at least one method")
        self.release_held()
        self._hold = Hold(path_regex, upper)

    def release_held(self) -> int:
        """Serve the held requests (they go on as if just received) and hold no more; returns how
        many were waiting."""
        hold, self._hold = self._hold, None
        if hold is None:
            return 0
        hold.released.set()
        return hold.waiting

    @contextlib.contextmanager
    def holding(self, path_regex: str | None = None, methods: Iterable[str] = WRITE_METHODS) -> Iterator[None]:
        """:meth:`hold` for the ``with`` block, :meth:`release_held` when it ends, however it ends (a
        failing assertion inside leaves no request held)."""
        self.hold(path_regex, methods)
        try:
            yield
        finally:
            self.release_held()

    def held(self) -> int:
        """How many requests are held now."""
        return self._hold.waiting if self._hold is not None else 0

    async def wait_if_held(self, method: str, path: str, is_auth: bool) -> None:
        """Return once ``method path`` may be served: at once unless a hold matches it."""
        hold = self._hold
        if hold is None or is_auth or not hold.matches(method, path):
            return
        hold.waiting += 1
        try:
            await hold.released.wait()
        finally:
            hold.waiting -= 1

    def queue(self, status: int, count: int = 1, retry_after: int | None = None,
              path_regex: str | None = None) -> None:
        """Answer the next ``count`` matching requests with ``status`` (0 = hang then drop).
        ``retry_after`` defaults to ``config.retry_after_s`` for 429 and 503."""
        if status == 0 or 400 <= status <= 599:
            for _ in range(count):
                self._script.append(ScriptedFault(status, retry_after, path_regex))
        else:
            raise ValueError("status must be 0 (timeout) or an HTTP error status")

    def pending(self) -> int:
        return len(self._script)

    def snapshot(self) -> dict[str, Json]:
        return {"config": asdict(self.config), "seed": self._seed, "queued": len(self._script),
                "hold": self._hold.to_json() if self._hold is not None else None}

    def decide(self, path: str, is_auth: bool) -> FaultDecision | None:
        cfg = self.config
        for i, fault in enumerate(self._script):
            if fault.path_regex is None or re.search(fault.path_regex, path):
                if is_auth and fault.path_regex is None and not cfg.include_auth:
                    break
                del self._script[i]
                retry_after = fault.retry_after
                if retry_after is None and fault.status in (429, 503):
                    retry_after = cfg.retry_after_s
                name = "timeout" if fault.status == 0 else f"status:{fault.status}"
                return FaultDecision(name, fault.status, retry_after, cfg.latency_ms / 1000.0)
        if is_auth and not cfg.include_auth:
            return None
        if cfg.path_regex is not None and not re.search(cfg.path_regex, path):
            return None
        latency = cfg.latency_ms / 1000.0
        if not (cfg.rate_429 or cfg.rate_503 or cfg.rate_timeout):
            return FaultDecision("latency", 0, None, latency) if latency else None
        draw = self._rng.random()
        if draw < cfg.rate_429:
            return FaultDecision("429", 429, cfg.retry_after_s, latency)
        draw -= cfg.rate_429
        if draw < cfg.rate_503:
            return FaultDecision("503", 503, cfg.retry_after_s, latency)
        draw -= cfg.rate_503
        if draw < cfg.rate_timeout:
            return FaultDecision("timeout", 0, None, latency)
        return FaultDecision("latency", 0, None, latency) if latency else None

    async def hang(self, seconds: float) -> None:
        """Sleep for an injected timeout; cut short when the sandbox stops."""
        try:
            await asyncio.wait_for(self._release.wait(), seconds)
        except TimeoutError:
            pass

    def release_hangs(self) -> None:
        self._release.set()


# --------------------------------------------------------------------------- service protection


@dataclass
class ServiceProtectionLimits:
    """Per-client limits over a sliding window (None disables a limit). Defaults are
    Dataverse's published service-protection limits."""

    max_requests: int | None = 6000
    window_s: float = 300.0
    max_execution_s: float | None = 1200.0
    max_concurrent: int | None = 52


@dataclass(slots=True)
class Throttle:
    code: str
    message: str
    retry_after: int


class ServiceProtection:
    """Sliding-window request count, execution time and concurrency per client."""

    REQUESTS_CODE = "0x80072322"
    EXECUTION_CODE = "0x80072321"
    CONCURRENCY_CODE = "0x80072326"

    def __init__(self, clock: SandboxClock, limits: ServiceProtectionLimits | None = None) -> None:
        self.clock = clock
        self.limits = limits or ServiceProtectionLimits()
        self._requests: dict[str, deque[float]] = {}
        self._execution: dict[str, deque[tuple[float, float]]] = {}
        self._exec_total: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}

    def _trim(self, client: str, now: float) -> None:
        horizon = now - self.limits.window_s
        reqs = self._requests.setdefault(client, deque())
        while reqs and reqs[0] <= horizon:
            reqs.popleft()
        execs = self._execution.setdefault(client, deque())
        while execs and execs[0][0] <= horizon:
            _, spent = execs.popleft()
            self._exec_total[client] = self._exec_total.get(client, 0.0) - spent

    def admit(self, client: str) -> Throttle | None:
        """Count the request in, or say why it is throttled (the request is then not counted)."""
        lim = self.limits
        now = self.clock.monotonic()
        self._trim(client, now)
        reqs = self._requests[client]
        if lim.max_requests is not None and len(reqs) >= lim.max_requests:
            wait = reqs[0] + lim.window_s - now
            return Throttle(self.REQUESTS_CODE, f"Number of requests exceeded the limit of {lim.max_requests} over "
                            f"time window of {int(lim.window_s)} seconds.", max(1, math.ceil(wait)))
        execs = self._execution[client]
        if lim.max_execution_s is not None and self._exec_total.get(client, 0.0) >= lim.max_execution_s:
            wait = execs[0][0] + lim.window_s - now if execs else 1.0
            return Throttle(self.EXECUTION_CODE, f"Combined execution time of incoming requests exceeded limit of "
                            f"{int(lim.max_execution_s * 1000)} milliseconds over time window of "
                            f"{int(lim.window_s)} seconds.", max(1, math.ceil(wait)))
        if lim.max_concurrent is not None and self._in_flight.get(client, 0) >= lim.max_concurrent:
            return Throttle(self.CONCURRENCY_CODE,
                            f"Number of concurrent requests exceeded the limit of {lim.max_concurrent}.", 1)
        reqs.append(now)
        self._in_flight[client] = self._in_flight.get(client, 0) + 1
        return None

    def done(self, client: str, elapsed_s: float) -> None:
        self._in_flight[client] = max(0, self._in_flight.get(client, 0) - 1)
        self._execution.setdefault(client, deque()).append((self.clock.monotonic(), elapsed_s))
        self._exec_total[client] = self._exec_total.get(client, 0.0) + elapsed_s

    def in_flight(self, client: str) -> int:
        return self._in_flight.get(client, 0)

    def reset(self) -> None:
        self._requests.clear()
        self._execution.clear()
        self._exec_total.clear()


# --------------------------------------------------------------------------- concurrency record


class InFlight:
    """The API requests an emulator is serving at once (token requests and ``/_sandbox`` routes
    left out), now and at the most since the last :meth:`reset`, over all clients and per
    client: the witness of how many concurrent requests a client really had, whatever it
    believes it sent. Counted from arrival to response, faults included."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.by_client: dict[str | None, int] = {}
        self.peak_by_client: dict[str | None, int] = {}

    def enter(self, client: str | None) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        n = self.by_client[client] = self.by_client.get(client, 0) + 1
        self.peak_by_client[client] = max(self.peak_by_client.get(client, 0), n)

    def leave(self, client: str | None) -> None:
        self.now -= 1
        self.by_client[client] -= 1

    def reset(self) -> None:
        """Forget the peaks (the requests in flight now stay counted)."""
        self.peak = self.now
        self.peak_by_client = {c: n for c, n in self.by_client.items() if n}

    def to_json(self) -> dict[str, Json]:
        return {"in_flight": self.now, "peak": self.peak,
                "peak_by_client": {str(c): n for c, n in self.peak_by_client.items()}}


# --------------------------------------------------------------------------- the base app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class PoisonList(Protocol):
    """An emulator's state that rejects the writes of chosen keys (a plug-in / a workflow that
    refuses a record): ``poison`` maps a table or resource to its poisoned keys (lower case)."""

    poison: dict[str, set[str]]

    def poison_keys(self, name: str, /, *keys: str) -> None: ...

    def clear_poison(self) -> None: ...


@dataclass(frozen=True)
class SchemaOps:
    """One table's (Dataverse) or resource's (Campaign) schema changes, for the control route that
    changes a schema under a running sync: each takes the column or field name first."""

    rename: Callable[[str, str], None]
    retype: Callable[[str, str, int | None], None]
    drop: Callable[[str], None]
    add: Callable[[str, str, int | None], None]


V = TypeVar("V")


def rename_entry(schema: dict[str, V], rows: Iterable[dict[str, Any]], old: str, new: str) -> dict[str, V]:
    """A rename of field (or column) ``old`` to ``new``: moved in every row of ``rows`` that has it (data
    kept, as a publisher's rename would); returns ``schema`` (name → definition) with the entry renamed
    in its place."""
    for row in rows:
        if old in row:
            row[new] = row.pop(old)
    return {(new if k == old else k): v for k, v in schema.items()}


def apply_schema_change(body: dict[str, Any], term: str, ops: SchemaOps) -> None:
    """``{"op": "rename", term: old, "to": new}`` | ``{"op": "retype", term: name, "type": T,
    "max_length": n}`` | ``{"op": "drop", term: name}`` | ``{"op": "add", term: name, "type": T,
    "max_length": n}``, ``term`` being ``"column"`` (Dataverse) or ``"field"`` (Campaign). Raises
    ValueError for another op, KeyError for a missing member (the control routes answer 400)."""
    op, name = body["op"], body[term]
    if op == "rename":
        ops.rename(name, body["to"])
    elif op == "retype":
        ops.retype(name, body["type"], body.get("max_length"))
    elif op == "drop":
        ops.drop(name)
    elif op == "add":
        ops.add(name, body["type"], body.get("max_length"))
    else:
        raise ValueError(f"unknown schema op {op!r}")


class Switches(Protocol):
    """Settings switched through the control API (fault injection, protocol variants)."""

    def snapshot(self) -> dict[str, Json]: ...

    def reset(self) -> None: ...


@dataclass(frozen=True)
class EmulatorParts:
    """What the sandbox gives each emulator: its clock (shared), the request log (shared), its
    token issuer, its fault injection and its service protection (``None``: no limits, as
    Campaign publishes none)."""

    clock: SandboxClock
    log: RequestLog
    tokens: TokenIssuer
    faults: Faults
    protection: ServiceProtection | None = None


class EmulatorApp:
    """Common aiohttp plumbing of an emulator: labelling header, request log, fault
    injection, optional service protection, and the ``/_sandbox`` control routes."""

    server_name = "emulator"

    def __init__(self, parts: EmulatorParts) -> None:
        self.clock = parts.clock
        self.log = parts.log
        self.tokens = parts.tokens
        self.faults = faults = parts.faults
        self.protection = protection = parts.protection
        self.in_flight = InFlight()
        self.app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self.app.on_response_prepare.append(self._label)
        r = self.app.router
        r.add_get(CONTROL_PREFIX, self._ctl_info)
        r.add_get(CONTROL_PREFIX + "/requests", self._ctl_requests)
        r.add_delete(CONTROL_PREFIX + "/requests", self._ctl_clear_requests)
        self.control_switches(CONTROL_PREFIX + "/faults", faults)
        r.add_put(CONTROL_PREFIX + "/faults", self._ctl_set_faults)
        r.add_post(CONTROL_PREFIX + "/faults/queue", self._ctl_queue_fault)
        r.add_put(CONTROL_PREFIX + "/faults/hold", self._ctl_hold)
        r.add_delete(CONTROL_PREFIX + "/faults/hold", self._ctl_release_held)
        r.add_post(CONTROL_PREFIX + "/tokens/expire", self._ctl_expire_tokens)
        r.add_put(CONTROL_PREFIX + "/tokens/lifetime", self._ctl_token_lifetime)
        r.add_post(CONTROL_PREFIX + "/clock/advance", self._ctl_advance_clock)
        r.add_get(CONTROL_PREFIX + "/concurrency", self._ctl_concurrency)
        r.add_delete(CONTROL_PREFIX + "/concurrency", self._ctl_reset_concurrency)
        if protection is not None:
            r.add_get(CONTROL_PREFIX + "/limits", self._ctl_limits)
            r.add_put(CONTROL_PREFIX + "/limits", self._ctl_set_limits)

    def control_schema(self, collection: str, listing: Handler, change: Handler) -> None:
        """The schema control routes of the emulated collections (``"resources"`` on Campaign,
        ``"tables"`` on Dataverse): ``GET /_sandbox/<collection>``, each with its schema and size
        (``listing``); ``POST /_sandbox/<collection>/{name}/schema``, a schema change of one
        (``change``, see :func:`apply_schema_change`)."""
        self.app.router.add_get(f"{CONTROL_PREFIX}/{collection}", listing)
        self.app.router.add_post(f"{CONTROL_PREFIX}/{collection}/{{name}}/schema", change)

    def control_switches(self, path: str, switches: Switches) -> None:
        """``GET path``: what ``switches`` are set to (their snapshot); ``DELETE path``: back to their
        defaults, answered with the snapshot. One for fault injection and the protocol variants."""

        async def show(request: web.Request) -> web.Response:
            return json_response(switches.snapshot())

        async def reset(request: web.Request) -> web.Response:
            switches.reset()
            return json_response(switches.snapshot())

        self.app.router.add_get(path, show)
        self.app.router.add_delete(path, reset)

    def control_poison(self, state: PoisonList, owner: str) -> None:
        """The poison control routes, one for both emulators: ``PUT /_sandbox/poison`` with
        ``{owner: name, "keys": [...]}`` (``owner``: ``"table"`` on Dataverse, ``"resource"`` on
        Campaign) answers every poisoned key by name; ``DELETE /_sandbox/poison`` clears them (204)."""

        async def put(request: web.Request) -> web.Response:
            body = await request.json()
            state.poison_keys(body[owner], *body["keys"])
            return json_response({k: sorted(v) for k, v in state.poison.items()})

        async def clear(request: web.Request) -> web.Response:
            state.clear_poison()
            return web.Response(status=204)

        self.app.router.add_put(CONTROL_PREFIX + "/poison", put)
        self.app.router.add_delete(CONTROL_PREFIX + "/poison", clear)

    # -- hooks for subclasses
    def is_auth_path(self, path: str) -> bool:
        raise NotImplementedError

    async def identify(self, request: web.Request) -> str | None:
        """The caller's client id, for the log and per-client limits (not an auth check)."""
        raise NotImplementedError

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        raise NotImplementedError

    def info(self) -> dict[str, Json]:
        return {}

    # -- plumbing
    @staticmethod
    async def _label(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SANDBOX_HEADER] = SANDBOX_HEADER_VALUE

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == CONTROL_PREFIX or request.path.startswith(CONTROL_PREFIX + "/"):
            try:
                return await handler(request)
            except (ValueError, KeyError, TypeError) as exc:
                return json_response({"error": str(exc)}, status=400)
        received_mono, received_wall = time.monotonic(), time.time()
        client = await self.identify(request)
        record = RequestRecord(
            seq=self.log.next_seq(), server=self.server_name, received_monotonic=received_mono,
            received_wall=received_wall, responded_monotonic=None, method=request.method, path=request.path_qs,
            status=None, retry_after=None, client=client, fault=None, duration_ms=None,
            connection=_peer(request), prefer=request.headers.get("Prefer"))
        self.log.append(record)  # visible while in flight (status None)
        response: web.StreamResponse | None = None
        dropped = False
        counted = not self.is_auth_path(request.path)
        if counted:
            self.in_flight.enter(client)
        try:
            response = await self._serve(request, handler, record)
            return response
        except _Dropped:
            # The transport is closed: aiohttp's attempt to write this is a no-op.
            dropped = True
            return web.Response(status=504)
        except web.HTTPException as exc:
            response = exc
            raise
        finally:
            if counted:
                self.in_flight.leave(client)
            responded = time.monotonic()
            record.status = response.status if response is not None and not dropped else 0
            if response is not None and "Retry-After" in response.headers:
                record.retry_after = parse_retry_after(response.headers["Retry-After"])
            record.responded_monotonic = responded
            record.duration_ms = round((responded - received_mono) * 1000.0, 3)

    async def _serve(self, request: web.Request, handler: Handler, record: RequestRecord) -> web.StreamResponse:
        client = record.client
        await self.faults.wait_if_held(request.method, request.path, self.is_auth_path(request.path))
        decision = self.faults.decide(request.path, self.is_auth_path(request.path))
        latency = decision.latency_s if decision is not None else 0.0
        if decision is not None:
            record.fault = decision.name
        if decision is not None and decision.name != "latency":
            if latency > 0:
                await asyncio.sleep(latency)
            if decision.status == 0:
                await self.faults.hang(self.faults.config.hang_s)
                if request.transport is not None:
                    request.transport.close()
                raise _Dropped(decision.name)
            form = self.faults.config.retry_after_form
            hdrs = {"Retry-After": retry_after_value(decision.retry_after, form)} \
                if decision.retry_after is not None else {}
            message = {429: "Injected fault: too many requests", 503: "Injected fault: service unavailable"}
            return self.error(decision.status, f"sandbox.fault.{decision.status}",
                              message.get(decision.status, "Injected fault"), hdrs)
        protection = self.protection
        token = bearer_of(request)
        if (protection is None or client is None or self.is_auth_path(request.path) or token is None
                or self.tokens.validate(token) is None):
            protection = None  # limits are per authenticated user
        else:
            throttle = protection.admit(client)
            if throttle is not None:
                record.fault = "service-protection"
                return self.error(429, throttle.code, throttle.message, {"Retry-After": retry_after_value(
                    throttle.retry_after, self.faults.config.retry_after_form)})
        started = self.clock.monotonic()
        try:
            if latency > 0:  # injected latency counts as execution time and concurrency
                await asyncio.sleep(latency)
            return await handler(request)
        finally:
            if protection is not None and client is not None:
                protection.done(client, self.clock.monotonic() - started)

    # -- control routes
    async def _ctl_info(self, request: web.Request) -> web.Response:
        return json_response({"emulator": self.server_name, "label": "syncplane sandbox emulator (not the vendor "
                              "service)", "requests_logged": len(self.log), **self.info()})

    async def _ctl_requests(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        client = request.query.get("client")
        server = request.query.get("server", self.server_name)
        recs = self.log.records(since, server=None if server == "all" else server, client=client)
        return json_response({"requests": [r.to_json() for r in recs],
                              "retry_after_violations": len(self.log.retry_after_violations(
                                  None if server == "all" else server))})

    async def _ctl_clear_requests(self, request: web.Request) -> web.Response:
        self.log.clear()
        return web.Response(status=204)

    async def _ctl_set_faults(self, request: web.Request) -> web.Response:
        body = await request.json()
        seed = body.pop("seed", None)
        self.faults.set(seed=seed, **body)
        return json_response(self.faults.snapshot())

    async def _ctl_queue_fault(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.faults.queue(int(body["status"]), int(body.get("count", 1)), body.get("retry_after"),
                          body.get("path_regex"))
        return json_response(self.faults.snapshot())

    async def _ctl_hold(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.faults.hold(body.get("path_regex"), body.get("methods", WRITE_METHODS))
        return json_response(self.faults.snapshot())

    async def _ctl_release_held(self, request: web.Request) -> web.Response:
        return json_response({"released": self.faults.release_held(), **self.faults.snapshot()})

    async def _ctl_expire_tokens(self, request: web.Request) -> web.Response:
        return json_response({"expired": self.tokens.expire_all()})

    async def _ctl_token_lifetime(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.tokens.lifetime = float(body["seconds"])
        return json_response({"lifetime": self.tokens.lifetime})

    async def _ctl_advance_clock(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.clock.advance(float(body["seconds"]))
        return json_response({"offset": self.clock.offset})

    async def _ctl_concurrency(self, request: web.Request) -> web.Response:
        return json_response(self.in_flight.to_json())

    async def _ctl_reset_concurrency(self, request: web.Request) -> web.Response:
        self.in_flight.reset()
        return json_response(self.in_flight.to_json())

    async def _ctl_limits(self, request: web.Request) -> web.Response:
        assert self.protection is not None
        return json_response(asdict(self.protection.limits))

    async def _ctl_set_limits(self, request: web.Request) -> web.Response:
        assert self.protection is not None
        body = await request.json()
        valid = {f.name for f in fields(ServiceProtectionLimits)}
        for name, value in body.items():
            if name not in valid:
                raise ValueError(f"unknown limit {name!r}")
            setattr(self.protection.limits, name, value)
        self.protection.reset()
        return json_response(asdict(self.protection.limits))


class _Dropped(Exception):
    """Raised after an injected hang: the transport is already closed."""
