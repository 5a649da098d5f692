"""Shared by the SQLite tests: a call that must wait for another connection's write lock without
stalling its event loop (an HTTP endpoint on the same loop keeps answering meanwhile)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from syncplane.runtime.supervisor import SupervisorConfig


async def waits_for_the_lock_without_stalling(path: Path, start: Any, what: str) -> Any:
    """Hold the write lock of the SQLite file ``path`` from another connection, start the
    coroutine ``start()`` returns, check a `/status` on the same loop answers three times within
    the supervisor's poll timeout and that the call is still waiting, then release the lock:
    returns what the call returns once it completes."""

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"ready": True})

    app = web.Application()
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    locker = sqlite3.connect(str(path), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    call: Awaitable[Any] = start()
    task = asyncio.ensure_future(call)
    try:
        async with httpx.AsyncClient(timeout=SupervisorConfig().poll_timeout) as http:
            for _ in range(3):
                assert (await http.get(f"http://127.0.0.1:{port}/status")).json() == {"ready": True}
        assert not task.done(), f"{what} did not wait for the lock"
        locker.execute("COMMIT")
        return await asyncio.wait_for(task, 60)
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
