"""The console over plain HTTP against `syncplane up` (no browser): the event stream resumes
after the last revision it delivered, an open stream does not hold up a stop, errors are the
API's (the same codes and field violations), and a POST without the page's CSRF token or from
another origin is refused."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.backends import eventually
from tests.factories import spec
from tests.integration.conftest import ServerProcess, wait_until
from tests.integration.test_cli_and_security import certs  # noqa: F401 (fixture)


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[tuple[ServerProcess, str]]:
    port_file = tmp_path / "console.port"
    server = ServerProcess(tmp_path, "--console-port-file", str(port_file))
    try:
        await server.ready()
        await wait_until(port_file.exists, what="console port")
        yield server, f"http://127.0.0.1:{int(port_file.read_text())}"
    finally:
        await asyncio.to_thread(server.stop)


async def events(http: aiohttp.ClientSession, url: str, count: int, **headers: str) -> list[dict[str, Any]]:
    """The first `count` change events of a stream: their id and data."""
    out: list[dict[str, Any]] = []
    async with http.get(url + "/events", headers=headers) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        event: dict[str, Any] = {}
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                event["id"] = int(line[4:])
            elif line.startswith("data: "):
                event["data"] = json.loads(line[6:])
            elif not line and "data" in event:
                out.append(event)
                event = {}
                if len(out) == count:
                    return out
    raise AssertionError("the stream ended")


async def csrf_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/", headers={"Accept": "text/html"}) as resp:
        match = re.search(r'name="csrf-token" content="([0-9a-f]+)"', await resp.text())
    assert match
    return match.group(1)


async def test_up_prints_the_console_url_at_start_up(up: tuple[ServerProcess, str]) -> None:
    """`syncplane up` (and so `make run`) prints the URL a user opens, with the port it bound."""
    server, url = up
    await wait_until(lambda: f"syncplane console: {url}/" in (server.data_dir / "server.log").read_text(),
                     what="the console's URL on stdout")


async def test_the_stream_resumes_after_the_last_event_id(up: tuple[ServerProcess, str]) -> None:
    server, url = up
    channel, stub = server.stub()
    async with channel, aiohttp.ClientSession() as http:
        await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="a", workflow=pb.Workflow(spec=spec())))
        first = (await events(http, url, 1))[0]
        assert first["data"]["type"] == "ADDED" and first["data"]["row"]["id"] == "a"
        await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="b", workflow=pb.Workflow(spec=spec())))
        # A reconnect with Last-Event-ID gets what happened after it, not the snapshot again.
        after = (await events(http, url, 1, **{"Last-Event-ID": str(first["id"])}))[0]
        assert after["data"]["row"]["id"] == "b" and after["id"] > first["id"]

        # The server keeps recent samples per workflow from the same watch: the chart's history.
        async def sampled() -> bool:
            async with http.get(url + "/api/workflows/b") as resp:
                history = (await resp.json())["history"]
            return len(history) >= 1 and len(history[0]) == 3   # [seconds, backlog, records/s]

        await eventually(sampled, "a history sample of b")


async def test_an_open_stream_does_not_hold_up_a_stop(up: tuple[ServerProcess, str]) -> None:
    server, url = up
    async with aiohttp.ClientSession() as http, http.get(url + "/events") as resp:
        assert (await resp.content.readline()).startswith(b"retry:")
        began = time.monotonic()
        await asyncio.to_thread(server.proc.send_signal, signal.SIGTERM)
        await asyncio.to_thread(server.proc.wait, 30)
        assert server.proc.returncode == 0
        assert time.monotonic() - began < 30, "the server waited for the browser to go away"


async def test_errors_are_the_apis_and_posts_need_the_csrf_token(up: tuple[ServerProcess, str]) -> None:
    server, url = up
    channel, stub = server.stub()
    async with channel, aiohttp.ClientSession() as http:
        await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="a", workflow=pb.Workflow(spec=spec())))
        token = await csrf_of(http, url)
        json_headers = {"Accept": "application/json", "X-CSRF-Token": token}
        async with http.post(url + "/workflows/a/stop", headers=json_headers) as resp:
            body = await resp.json()
            assert (resp.status, body["code"], body["reason"]) == (400, "FAILED_PRECONDITION",
                                                                  "TRANSITION_NOT_ALLOWED")
        async with http.post(url + "/workflows/a/start", data={"expected_phase": "RUNNING"},
                             headers=json_headers) as resp:
            assert (resp.status, (await resp.json())["reason"]) == (400, "PHASE_MISMATCH")
        async with http.post(url + "/workflows/a/edit", data={"mode": "yaml", "spec": "batchSize: 5000"},
                             headers=json_headers) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["fieldViolations"][0]["field"] == "spec.batch_size", body
        async with http.get(url + "/api/workflows/nope") as resp:
            assert (resp.status, (await resp.json())["code"]) == (404, "NOT_FOUND")

        for headers in ({"Accept": "application/json"},                              # no token
                        {**json_headers, "Origin": "http://attacker.example"},      # another origin
                        {**json_headers, "Sec-Fetch-Site": "cross-site"}):
            async with http.post(url + "/workflows/a/start", headers=headers) as resp:
                assert resp.status == 403, headers
        wf = await stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/a"))
        assert wf.spec.desired_state != pb.DESIRED_STATE_RUNNING


async def test_a_console_port_in_use_is_one_error_line(up: tuple[ServerProcess, str], tmp_path: Path) -> None:
    """A second `up` whose console address is taken says so in one line and leaves nothing running."""
    _, url = up
    taken = url.removeprefix("http://")
    res = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "syncplane", "up", "--data-dir", str(tmp_path / "second"), "--no-defaults",
        "--listen", "127.0.0.1:0", "--console-listen", taken], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"error: cannot listen on {taken} for the console: address already in use (another `syncplane up`?); "
        "choose another with --console-listen"], res.stderr


async def test_off_loopback_the_console_is_https_with_a_login(tmp_path: Path,
                                                             certs: tuple[Path, Path]) -> None:  # noqa: F811
    """With TLS and a token the console may listen off loopback: HTTPS only, pages behind the login
    form, whose session cookie is Secure, HttpOnly and SameSite=Strict and never the token."""
    cert, key = certs
    (tmp_path / "token").write_text("tok-console\n")
    (tmp_path / "token").chmod(0o600)  # the server refuses a token file others can read
    port_file = tmp_path / "console.port"
    server = ServerProcess(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--token-file",
                           str(tmp_path / "token"), "--console-listen", "0.0.0.0:0", "--console-port-file",
                           str(port_file))
    try:
        await server.ready()
        await wait_until(port_file.exists, what="console port")
        url = f"https://127.0.0.1:{int(port_file.read_text())}"
        tls = ssl.create_default_context(cafile=str(cert))
        # unsafe=True: aiohttp keeps no cookies for an IP address otherwise (browsers do).
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls),
                                         cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(url + "/", headers={"Accept": "text/html"}, allow_redirects=False) as resp:
                assert (resp.status, resp.headers["Location"]) == (303, "/login?next=/")
            async with http.get(url + "/api/workflows") as resp:
                assert resp.status == 401
            async with http.get(url + "/login") as resp:
                token = re.search(r'name="csrf-token" content="([0-9a-f]+)"', await resp.text())
            assert token
            async with http.post(url + "/login", data={"csrf": token.group(1), "token": "tok-console", "next": "/"},
                                 allow_redirects=False) as resp:
                assert resp.status == 303
                cookie = resp.headers["Set-Cookie"]
            for flag in ("Secure", "HttpOnly", "SameSite=Strict"):
                assert flag in cookie, cookie
            assert "tok-console" not in cookie
            async with http.get(url + "/api/workflows") as resp:
                assert resp.status == 200 and (await resp.json()) == {"workflows": []}
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(url.replace("https", "http") + "/login"):
                    pass
    finally:
        await asyncio.to_thread(server.stop)
