"""Starting, running and stopping both emulators."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from syncplane_sandbox.acs import AcsEmulator
from syncplane_sandbox.acs_state import FORCE_PAGINATION_THRESHOLD, AcsState, install_default_resources
from syncplane_sandbox.common import (
    SANDBOX_ACS_ORG,
    SANDBOX_CLIENT_ID,
    SANDBOX_CLIENT_SECRET,
    SANDBOX_TENANT_ID,
    EmulatorParts,
    Faults,
    RequestLog,
    SandboxClock,
    ServiceProtection,
    ServiceProtectionLimits,
    TokenIssuer,
)
from syncplane_sandbox.d365 import API_PREFIX, D365Emulator
from syncplane_sandbox.d365_state import DELTA_TOKEN_MAX_AGE_S, D365State, install_default_tables
from syncplane_sandbox.seed import SeedSpec, apply_seed, generate_events

log = logging.getLogger("syncplane_sandbox")

BANNER = ("SANDBOX EMULATORS — local, in-memory emulations of the Dynamics 365 (Dataverse) Web API and the "
          "Adobe Campaign Standard API; not the vendors' services")


@dataclass
class SandboxOptions:
    """Tunables; the defaults are the vendors' documented numbers."""

    org: str = SANDBOX_ACS_ORG
    tenant: str = SANDBOX_TENANT_ID
    d365_token_lifetime_s: float = 3600.0
    acs_token_lifetime_s: float = 24 * 3600.0
    delta_token_max_age_s: float = DELTA_TOKEN_MAX_AGE_S
    d365_limits: ServiceProtectionLimits = field(default_factory=ServiceProtectionLimits)
    #: Campaign publishes no rate limit; set limits here to emulate one.
    acs_limits: ServiceProtectionLimits | None = None
    fault_seed: int = 0
    force_pagination_threshold: int = FORCE_PAGINATION_THRESHOLD
    request_log_size: int = 200_000


class SandboxFaults:
    """Fault injection of both emulators (``.d365`` and ``.acs`` are :class:`Faults`)."""

    def __init__(self, d365: Faults, acs: Faults) -> None:
        self.d365 = d365
        self.acs = acs

    def set(self, **changes: Any) -> None:
        """Same settings on both emulators, e.g. ``set(rate_429=0.05, latency_ms=20)``."""
        self.d365.set(**changes)
        self.acs.set(**changes)

    def reset(self) -> None:
        self.d365.reset()
        self.acs.reset()


class Sandbox:
    """Both emulators, running. Build with :func:`start_sandbox`; stop with :meth:`stop`."""

    client_id = SANDBOX_CLIENT_ID
    client_secret = SANDBOX_CLIENT_SECRET

    def __init__(self, host: str, options: SandboxOptions) -> None:
        self.host = host
        self.options = options
        self.clock = SandboxClock()
        self.requests = RequestLog(options.request_log_size)
        self.d365 = D365State(self.clock, options.delta_token_max_age_s)
        install_default_tables(self.d365)
        self.acs = AcsState(self.clock, options.org)
        self.acs.force_pagination_threshold = options.force_pagination_threshold
        install_default_resources(self.acs)
        self.d365_tokens = TokenIssuer(self.clock, options.d365_token_lifetime_s, "eyJzYnguZDM2NSJ9.")
        self.acs_tokens = TokenIssuer(self.clock, options.acs_token_lifetime_s, "eyJzYnguYWNzIn0.")
        self.faults = SandboxFaults(Faults(options.fault_seed), Faults(options.fault_seed + 1))
        self.d365_protection = ServiceProtection(self.clock, options.d365_limits)
        self.acs_protection = ServiceProtection(self.clock, options.acs_limits) if options.acs_limits else None
        self._d365_app = D365Emulator(self.d365, EmulatorParts(self.clock, self.requests, self.d365_tokens,
                                                               self.faults.d365, self.d365_protection),
                                      options.tenant)
        self._d365_app.seeder = self._http_seed
        self._acs_app = AcsEmulator(self.acs, EmulatorParts(self.clock, self.requests, self.acs_tokens,
                                                            self.faults.acs, self.acs_protection))
        self._acs_app.event_generator = self._http_events
        #: The requests inside Dataverse ``$batch`` POSTs, one record each (method, inner URL, status).
        self.batch_parts = self._d365_app.batch_parts
        #: Documented Dataverse variants (paging links, $batch error handling): see variants.py.
        self.variants = self._d365_app.variants
        #: API requests each emulator serves at once, now and at the peak (see common.InFlight).
        self.d365_in_flight = self._d365_app.in_flight
        self.acs_in_flight = self._acs_app.in_flight
        self._runners: list[web.AppRunner] = []
        self.d365_port = 0
        self.acs_port = 0
        self._set_addresses()

    # -------------------------------------------------------------- addresses
    def _set_addresses(self) -> None:
        """The addresses of both emulators, once their ports are known (at start)."""
        self.d365_origin = f"http://{self.host}:{self.d365_port}"
        #: The Web API service root, e.g. ``http://127.0.0.1:7480/api/data/v9.2/``.
        self.d365_url = self.d365_origin + API_PREFIX
        self.d365_token_url = f"{self.d365_origin}/{self.options.tenant}/oauth2/v2.0/token"
        self.d365_scope = f"{self.d365_origin}/.default"
        self.acs_origin = f"http://{self.host}:{self.acs_port}"
        #: The Campaign API base, e.g. ``http://127.0.0.1:7481/sandbox/campaign/``.
        self.acs_url = f"{self.acs_origin}/{self.options.org}/campaign/"
        self.acs_token_url = f"{self.acs_origin}/ims/token/v3"

    def secrets(self) -> dict[str, dict[str, str]]:
        """The credentials of the default workflows' references (``d365-sandbox``, ``acs-sandbox``),
        as the keys of a secret file or Kubernetes Secret, each declaring the origin it is for."""
        common = {"clientId": self.client_id, "clientSecret": self.client_secret}
        return {"d365-sandbox": {**common, "tokenUrl": self.d365_token_url, "scope": self.d365_scope},
                "acs-sandbox": {**common, "tokenUrl": self.acs_token_url, "scope": "openid,AdobeID,campaign_sdk",
                                "organization": self.options.org, "apiHost": self.acs_origin}}

    # -------------------------------------------------------------- control
    def expire_tokens(self) -> None:
        """Every bearer token issued so far (both vendors) expires now."""
        self.d365_tokens.expire_all()
        self.acs_tokens.expire_all()

    def expire_delta_tokens(self) -> None:
        self.d365.expire_delta_tokens()

    def seed(self, spec: SeedSpec) -> dict[str, int]:
        return apply_seed(self.d365, self.acs, spec)

    def generate_events(self, count: int, seed: int | None = None) -> int:
        """Append ``count`` live events (``lastModified`` from now on) for existing contacts."""
        return generate_events(self.acs, count, random.Random(seed), list(self.d365.table("contacts").rows))

    def _http_seed(self, body: dict[str, Any]) -> dict[str, int]:
        return self.seed(SeedSpec(**body))

    def _http_events(self, count: int, rng: random.Random) -> int:
        return generate_events(self.acs, count, rng, list(self.d365.table("contacts").rows))

    def describe(self) -> str:
        return (f"{BANNER}. Dynamics 365 Web API: {self.d365_url} (token: {self.d365_token_url}, scope "
                f"{self.d365_scope}); Campaign Standard: {self.acs_url} (token: {self.acs_token_url}); "
                f"client_id={self.client_id}, client secret: syncplane_sandbox.SANDBOX_CLIENT_SECRET; "
                f"control API under /_sandbox on both ports")

    # -------------------------------------------------------------- lifecycle
    async def _start(self, d365_port: int, acs_port: int) -> None:
        ports = []
        for emulator, port in ((self._d365_app, d365_port), (self._acs_app, acs_port)):
            runner = web.AppRunner(emulator.app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            self._runners.append(runner)
            site = web.TCPSite(runner, self.host, port)
            await site.start()
            ports.append(int(runner.addresses[0][1]))
        self.d365_port, self.acs_port = ports
        self._set_addresses()
        log.info("%s", self.describe())

    async def refuse_connections(self, emulator: str) -> None:
        """Stop listening on one emulator's port (``"d365"`` or ``"acs"``), keeping its state:
        clients get "connection refused", as from a service that is down, until
        :meth:`accept_connections`."""
        index = self._emulator_index(emulator)
        runner = self._runners[index]
        for site in list(runner.sites):
            await site.stop()
        if runner.server is not None:  # and drop the open (keep-alive) connections, as a crash would
            await runner.server.shutdown(0.1)

    async def accept_connections(self, emulator: str) -> None:
        """Listen again on the port :meth:`refuse_connections` closed."""
        index = self._emulator_index(emulator)
        port = (self.d365_port, self.acs_port)[index]
        await web.TCPSite(self._runners[index], self.host, port).start()

    @staticmethod
    def _emulator_index(emulator: str) -> int:
        try:
            return ("d365", "acs").index(emulator)
        except ValueError:
            raise ValueError(f"unknown emulator {emulator!r}: 'd365' or 'acs'") from None

    async def stop(self) -> None:
        self.faults.d365.release_hangs()
        self.faults.acs.release_hangs()
        self.faults.d365.release_held()
        self.faults.acs.release_held()
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


async def start_sandbox(host: str = "127.0.0.1", d365_port: int = 0, acs_port: int = 0, seed: SeedSpec | None = None,
                        options: SandboxOptions | None = None) -> Sandbox:
    """Start both emulators on ``host`` (port 0 = any free port) with in-memory state
    seeded from ``seed``; returns the running :class:`Sandbox`."""
    sandbox = Sandbox(host, options or SandboxOptions())
    if seed is not None:
        sandbox.seed(seed)
    try:
        await sandbox._start(d365_port, acs_port)
    except BaseException:
        await sandbox.stop()
        raise
    return sandbox


async def run_forever(host: str = "127.0.0.1", d365_port: int = 7480, acs_port: int = 7481,
                      seed: SeedSpec | None = None, options: SandboxOptions | None = None,
                      stop: asyncio.Event | None = None) -> None:
    """Run the sandbox until ``stop`` is set (or the task is cancelled)."""
    sandbox = await start_sandbox(host, d365_port, acs_port, seed, options)
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await sandbox.stop()
        log.info("sandbox emulators stopped")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="syncplane-sandbox", description=BANNER)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--d365-port", type=int, default=7480)
    p.add_argument("--acs-port", type=int, default=7481)
    p.add_argument("--org", default=SANDBOX_ACS_ORG, help="Campaign organisation in the URL")
    p.add_argument("--seed", type=int, default=42, help="random seed for data and faults")
    p.add_argument("--seed-contacts", type=int, default=0)
    p.add_argument("--seed-loyalty-cards", type=int, default=0)
    p.add_argument("--seed-events", type=int, default=0)
    p.add_argument("--seed-acs-profiles", type=int, default=0)
    p.add_argument("--d365-token-lifetime", type=float, default=3600.0, help="seconds")
    p.add_argument("--acs-token-lifetime", type=float, default=86400.0, help="seconds")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``syncplane-sandbox`` (``python -m syncplane_sandbox``): run both emulators until SIGINT/SIGTERM."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    spec = SeedSpec(contacts=args.seed_contacts, loyalty_cards=args.seed_loyalty_cards, events=args.seed_events,
                    acs_profiles=args.seed_acs_profiles, seed=args.seed)
    options = SandboxOptions(org=args.org, d365_token_lifetime_s=args.d365_token_lifetime,
                             acs_token_lifetime_s=args.acs_token_lifetime, fault_seed=args.seed)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run_forever(args.host, args.d365_port, args.acs_port, spec, options, stop)

    asyncio.run(runner())
    return 0
