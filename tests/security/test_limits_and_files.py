"""Items 4 and 6 of issue 13: bounded response bodies and memory; private files.

- Every response body a connector reads is bounded (after decompression, whatever the
  Content-Length says); past the bound the request fails with RESPONSE_TOO_LARGE, a fatal
  reason (the workflow goes to ERROR instead of RUNNING with a growing worker).
- Embedded workers run under a data segment limit.
- The embedded data directory and everything in it is 0700/0600; a secret file, token file
  or TLS key that other users can access is refused, naming the file and the fix.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from syncplane.connectors.base import ConnectorError
from syncplane.connectors.dynamics import DynamicsSource
from syncplane.connectors.http import Credentials, OAuth2ClientCredentials, RetryableError, RetryPolicy, Transport
from syncplane.credentials import CredentialsError, load_local_secrets, write_local_secret
from syncplane.private_files import ExposedFileError, check_private
from syncplane.worker.engine import FATAL_REASONS
from tests.factories import UNREACHABLE_SECRETS, spec
from tests.integration.conftest import ServerProcess, wait_until
from tests.security.hostile import HostileEndpoint

pytestmark = pytest.mark.security
LIMIT = 256 * 1024


def _chunked(size: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)   # no Content-Length: chunked
        block = b" " * 65536
        for _ in range(size // len(block)):
            await resp.write(block)
        return resp
    return handle


async def _gzip_bomb(request: web.Request) -> web.Response:
    body = gzip.compress(b"0" * (8 * LIMIT))   # a few KiB on the wire
    return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})


async def _declared(request: web.Request) -> web.Response:
    return web.Response(body=b"{}" * (LIMIT // 2 + 1))


@pytest.mark.parametrize(("variant", "handler"), [
    ("chunked, no length", _chunked(4 * LIMIT)),
    ("gzip bomb", _gzip_bomb),
    ("Content-Length above the bound", _declared),
])
async def test_a_response_above_the_bound_fails_the_request(variant: str, handler: Callable[..., object]) -> None:
    service = await HostileEndpoint.start("127.0.0.1", handler)
    transport = Transport(max_response_bytes=LIMIT)
    try:
        with pytest.raises(ConnectorError) as caught:
            await transport.request("GET", f"{service.origin}/big")
        assert caught.value.reason == "RESPONSE_TOO_LARGE"
        assert str(LIMIT) in str(caught.value)
        assert caught.value.reason in FATAL_REASONS   # the workflow goes to ERROR, it does not go on
    finally:
        await transport.aclose()
        await service.stop()


async def test_a_body_past_its_content_length_is_not_read() -> None:
    """A server that declares a small Content-Length and sends more after it: the answer is never
    more than the declared bytes (HTTP frames the body by its length; aiohttp takes what follows
    for a next answer and refuses it as one), so an uncompressed answer with a Content-Length
    under the bound is read whole, without counting its chunks."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                     + b" " * (4 * LIMIT))
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = Transport(max_response_bytes=LIMIT, policy=RetryPolicy(max_attempts=1))
    try:
        response = await transport.request("GET", f"http://127.0.0.1:{port}/lying")
    except RetryableError:
        pass   # the bytes after the body, read as a next answer, failed the exchange: nothing kept
    else:
        assert response.content == b"{}"
    finally:
        await transport.aclose()
        server.close()
        await server.wait_closed()


async def test_connectors_read_pages_through_the_bound() -> None:
    """A Dataverse page above the bound fails the read (the source's own transport is bounded)."""
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/token":
            return web.json_response({"access_token": "t", "expires_in": 3600})
        return await _chunked(4 * LIMIT)(request)
    service = await HostileEndpoint.start("127.0.0.1", handle)
    tokens = OAuth2ClientCredentials(f"{service.origin}/token",
                                     Credentials("c", "s", scope=f"{service.origin}/.default"))
    src = DynamicsSource(f"{service.origin}/api/data/v9.2/", tokens, key_column="contactid",
                         transport=Transport(max_response_bytes=LIMIT, gate=tokens.gate))
    try:
        with pytest.raises(ConnectorError) as caught:
            async for _ in src.pages("contacts", ["contactid"], None):
                pass
        assert caught.value.reason == "RESPONSE_TOO_LARGE"
    finally:
        await src.transport.aclose()
        await tokens.aclose()
        await service.stop()


# ------------------------------------------------------------------ private files
@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)   # as a user's umask 022 would leave it
    server = ServerProcess(data, "--defaults")
    await server.ready()
    yield server
    server.stop()


def _exposed(root: Path) -> list[str]:
    """Each path under ``root`` (itself included) that its group or others may use, with its mode.
    A file gone between the listing and its stat (the ``-journal`` a running worker's SQLite makes
    and removes per transaction, with the database's own mode; a rotated log) is skipped: listing
    while the worker runs raced it (CI: FileNotFoundError on ``worker-state.db-journal``)."""
    exposed = []
    for p in [root, *root.rglob("*")]:
        try:
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            exposed.append(f"{p} {mode & 0o777:04o}")
    return exposed


async def test_the_embedded_data_directory_is_private(up: ServerProcess) -> None:
    channel, stub = up.stub()
    from syncplane.proto.v1 import workflow_service_pb2 as svc
    async with channel:
        await stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/contacts-ingress"))
        # a worker has run: its log, spec file and state database exist
        await wait_until(lambda: any((up.data_dir / "run" / "logs").glob("*.log")), what="a worker log")
        await wait_until(lambda: any((up.data_dir / "run" / "specs").iterdir()), what="a spec file")
    # the test's own server.log and port file come from the test, not the control plane
    leaks = [e for e in _exposed(up.data_dir) if "server.log" not in e and "/port." not in e]
    assert leaks == []


async def test_an_embedded_worker_runs_under_a_memory_limit(tmp_path: Path) -> None:
    from syncplane.runtime.processes import spawn
    spec_file = tmp_path / "spec.json"
    spec_file.write_text("{}")
    proc = spawn("wf", 0, 1, spec_file, tmp_path, tmp_path, 1.0, 0.0, secrets_dir=tmp_path,
                 state_db=tmp_path / "s.db", memory_limit=1536 * 1024 ** 2)

    def data_limit() -> list[str]:
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        return next(x for x in limits.splitlines() if x.startswith("Max data size")).split()[3:5]
    try:
        await wait_until(lambda: data_limit() == ["1610612736", "1610612736"], what="the worker's RLIMIT_DATA")
    finally:
        proc.signal(__import__("signal").SIGKILL)
        assert proc.popen is not None
        proc.popen.wait()


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o602, 0o666])
def test_an_exposed_secret_file_is_refused_naming_it_and_the_fix(tmp_path: Path, mode: int) -> None:
    secrets = tmp_path / "secrets"
    for name, data in UNREACHABLE_SECRETS.items():
        write_local_secret(secrets, name, data)
    exposed = secrets / "acs-sandbox.json"
    exposed.chmod(mode)
    with pytest.raises(CredentialsError) as caught:
        load_local_secrets(spec("ingress"), secrets)
    message = str(caught.value)
    assert str(exposed) in message and f"chmod 600 {exposed}" in message
    assert "test-secret" not in message


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_a_private_secret_file_is_accepted(tmp_path: Path, mode: int) -> None:
    """Group read stays allowed: Kubernetes projects Secret volumes 0440 to the pod's fsGroup."""
    path = tmp_path / "key.pem"
    path.write_text("x")
    path.chmod(mode)
    check_private(path, "TLS key")


@pytest.mark.parametrize("flag", ["--tls-key", "--token-file"])
def test_the_server_refuses_an_exposed_tls_key_or_token_file(tmp_path: Path, flag: str) -> None:
    exposed = tmp_path / "exposed"
    exposed.write_text("not-a-real-key")
    exposed.chmod(0o644)
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    args = ["--tls-cert", str(cert), "--tls-key", str(exposed)] if flag == "--tls-key" else [flag, str(exposed)]
    out = subprocess.run([sys.executable, "-m", "syncplane", "up", "--data-dir", str(tmp_path / "d"),
                          "--listen", "127.0.0.1:0", "--no-defaults", *args],
                         capture_output=True, text=True, timeout=60, env={**os.environ})
    assert out.returncode != 0
    assert f"chmod 600 {exposed}" in out.stderr and "Traceback" not in out.stderr
    assert "not-a-real-key" not in out.stderr + out.stdout


def test_check_private_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("x")
    path.chmod(0o604)
    with pytest.raises(ExposedFileError, match=r"mode 0604.*chmod 600"):
        check_private(path, "token file")


def test_a_mounted_secret_volume_is_read_and_checked(tmp_path: Path) -> None:
    """Issue 13 item 2: on Kubernetes the worker reads the Secret volumes the operator mounts (a file per
    key, as the kubelet writes them: symlinks into ..data); an exposed key file or an empty (missing,
    optional) volume is refused."""
    root = tmp_path / "secrets"
    for name, data in UNREACHABLE_SECRETS.items():
        data_dir = root / name / "..2026_11_29"
        data_dir.mkdir(parents=True)
        (root / name / "..data").symlink_to(data_dir.name)
        for key, value in data.items():
            (data_dir / key).write_text(value)
            (data_dir / key).chmod(0o440)
            (root / name / key).symlink_to(f"..data/{key}")
    secrets = load_local_secrets(spec("ingress"), root)
    assert secrets["acs-sandbox"].organization == "sandbox" and secrets["d365-sandbox"].client_id == "test-client"
    (root / "acs-sandbox" / "..2026_11_29" / "clientSecret").chmod(0o444)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load_local_secrets(spec("ingress"), root)
    for key in UNREACHABLE_SECRETS["acs-sandbox"]:
        (root / "acs-sandbox" / key).unlink()
    with pytest.raises(CredentialsError, match=r"acs-sandbox .*was not found"):
        load_local_secrets(spec("ingress"), root)
