"""One SQLite connection whose calls run on a dedicated thread, never on an event loop.

SQLite waits for another connection's write lock up to its busy timeout (30 s here): run
inline, that wait would stall the whole event loop (a worker's ``/status`` would miss the
supervisor's poll). The worker-state database (:class:`syncplane.state.sqlite.SqliteWorkerState`:
checkpoints, dead letters, held records, echo memory) keeps one connection and runs its async
calls through :meth:`SqliteConnection.run` on that connection's own thread, one call at a time.

Our own code rather than ``aiosqlite`` (which does the same, one thread per connection)
because the stores also keep their synchronous calls (the API's one-off accesses, tests):
both kinds share this one connection, serialised by a lock.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
#: Seconds a statement waits for another connection's lock before ``database is locked``.
BUSY_TIMEOUT = 30.0


class SqliteConnection:
    """An autocommit connection to ``path`` (WAL unless in memory), ``schema`` applied.

    :meth:`run` runs a function of the connection on its thread (awaitable; the event loop
    keeps serving meanwhile); :meth:`call` runs it in the caller's thread. Both raise what
    the function raises (``sqlite3.OperationalError: database is locked`` past the busy timeout).
    """

    def __init__(self, path: Path | str, schema: str = "", *, timeout: float = BUSY_TIMEOUT) -> None:
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=timeout, check_same_thread=False)
        self._lock = threading.Lock()
        self._thread: ThreadPoolExecutor | None = None
        if str(path) != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
        if schema:
            self.db.executescript(schema)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._lock:
            return fn(*args, **kwargs)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        loop = asyncio.get_running_loop()
        # The caller's context goes along (as asyncio.to_thread does): a function may read the
        # current trace span, e.g. a Start recording its trace parent in the spec it writes.
        context = contextvars.copy_context()
        return await loop.run_in_executor(self._thread, functools.partial(context.run, self.call, fn, *args, **kwargs))

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        with self._lock:
            self.db.close()
