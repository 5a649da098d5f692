"""A hostile endpoint for the security tests: an HTTP server on loopback that answers every
request and records what it received (method, path, headers), so a test can assert that no
credential ever arrived there."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Any]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class HostileEndpoint:
    """``await HostileEndpoint.start("127.0.0.2")``: every request is recorded in :attr:`received`."""

    host: str
    port: int = 0
    received: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @classmethod
    async def start(cls, host: str = "127.0.0.2", handler: Handler | None = None) -> HostileEndpoint:
        self = cls(host)

        async def record(request: web.Request) -> web.StreamResponse:
            self.received.append(Received(request.method, request.path_qs, dict(request.headers)))
            if handler is not None:
                result: web.StreamResponse = await handler(request)
                return result
            return web.json_response({"value": []})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    def credentials_seen(self) -> list[Received]:
        """Requests that carried a bearer token or an API key."""
        return [r for r in self.received
                if any(h.lower() in ("authorization", "x-api-key") for h in r.headers)]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
