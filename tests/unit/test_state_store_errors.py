"""How a state-store failure is classified: an outage (5xx, 429, a refused connection) that
outlasts the store's retries is transient (the engine retries the pass, Degraded); a refusal
(403 Forbidden, a missing namespace, a rejected object) is fatal with its message.

The API server is played by an HTTP server answering as kube-apiserver does (a `Status` body)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from syncplane.worker.engine import state_store_fatal
from syncplane.worker.kube_checkpoints import CheckpointError, ConfigMapCheckpoints, Retry


def _status(code: int, reason: str, kind: str = "configmaps") -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": f"{reason} (test)",
            "reason": reason, "details": {"name": "wf-checkpoints", "kind": kind}, "code": code}
    return web.Response(status=code, text=json.dumps(body), content_type="application/json")


# (answer of the API server, transient?, text the message must carry)
VARIANTS = [
    (lambda: _status(503, "ServiceUnavailable"), True, "HTTP 503"),
    (lambda: _status(500, "InternalError"), True, "HTTP 500"),
    (lambda: _status(429, "TooManyRequests"), True, "HTTP 429"),
    (lambda: _status(403, "Forbidden"), False, "needs get, list, create, patch and delete on configmaps"),
    (lambda: _status(404, "NotFound", kind="namespaces"), False, "does not exist"),
    (lambda: _status(422, "Invalid"), False, "HTTP 422"),
]


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[str, list[Callable[[], web.Response]]]]:
    answers: list[Callable[[], web.Response]] = []

    async def handle(request: web.Request) -> web.Response:
        return answers[0]()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", answers
    await runner.cleanup()


@asynccontextmanager
async def _store(host: str) -> AsyncIterator[ConfigMapCheckpoints]:
    from kubernetes_asyncio import client

    async with client.ApiClient(client.Configuration(host=host)) as api:
        yield ConfigMapCheckpoints("ns", api_client=api, retry=Retry(attempts=2, base=0.001, cap=0.001))


@pytest.mark.parametrize(("answer", "transient", "text"), VARIANTS)
async def test_api_answers_are_classified(api_server, answer, transient, text):
    host, answers = api_server
    answers.append(answer)
    async with _store(host) as store:
        calls: list[Coroutine[Any, Any, object]] = [store.acommit("wf", "contact", "c")]
        if text != "does not exist":  # a read in a missing namespace is a missing ConfigMap: nothing committed
            calls.append(store.aload("wf", "contact"))
        for call in calls:
            with pytest.raises(CheckpointError) as exc:
                await call
            assert exc.value.transient is transient and text in str(exc.value)
            fatal = state_store_fatal(exc.value)
            if transient:
                assert fatal is None and exc.value.reason == "STATE_STORE_UNAVAILABLE"
            else:
                assert fatal is not None and fatal.reason == "STATE_STORE_REJECTED" and text in str(fatal)


async def test_a_refused_connection_is_transient():
    with socket.socket() as s:   # a port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with _store(f"http://127.0.0.1:{port}") as store:
        with pytest.raises(CheckpointError) as exc:
            await store.acommit("wf", "contact", "c")
        assert exc.value.transient and state_store_fatal(exc.value) is None
        assert "cannot commit the checkpoint of wf/contact" in str(exc.value)
