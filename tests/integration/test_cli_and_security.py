"""The CLI over gRPC against a real `syncplane up` process; TLS, tokens, bind rules."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from syncplane.api.server import InsecureBindError, ServerSecurity, check_bind
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from tests.embedded_plane import worker_processes
from tests.integration.cli_env import cli, cli_process
from tests.integration.conftest import ServerProcess, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
async def server(tmp_path: Path):
    s = ServerProcess(tmp_path, "--defaults")
    await s.ready()
    yield s
    s.stop()
    # a workflow stopped at the end of a test may still be draining: its worker exits by itself
    await wait_until(lambda: not worker_processes(tmp_path), 30, "the stopped workflows' workers to exit")


async def test_list_shows_the_default_workflows(server: ServerProcess):
    res = await cli(server.port, "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "DESIRED", "PHASE", "DEGRADED", "BACKLOG", "DRIFT", "DEADLETTERS",
                                "AGE"]
    rows = {line.split()[0]: line.split()[1:7] for line in lines[1:]}
    assert rows == {
        "contacts-ingress": ["INGRESS", "STOPPED", "STOPPED", "-", "0", "no"],
        "email-events-egress": ["EGRESS", "STOPPED", "STOPPED", "-", "0", "no"],
        "opt-in-out": ["OPT_IN_OUT", "STOPPED", "STOPPED", "-", "0", "no"],
    }
    # The README's quickstart shows this output, apart from the commands.
    readme = README.read_text()
    shown = readme.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert shown[0] == lines[0] and {row.split()[0] for row in shown[1:]} == set(rows)
    commands = readme.split("In another terminal:\n\n```sh\n", 1)[1].split("```", 1)[0].splitlines()
    assert all(line.startswith(".venv/bin/syncplane ") for line in commands), commands


async def test_watch_prints_a_header_then_one_line_per_change(server: ServerProcess):
    proc = await cli_process(server.port, "watch")
    try:
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 60)).decode() for _ in range(4)]  # type: ignore[union-attr]
    finally:
        proc.terminate()
        await proc.wait()
    assert lines[0].split() == ["REVISION", "CHANGE", "NAME", "TYPE", "DESIRED", "PHASE", "DEGRADED", "BACKLOG",
                                "DRIFT", "DEADLETTERS"]
    names = sorted(line.split()[2] for line in lines[1:])
    assert names == ["contacts-ingress", "email-events-egress", "opt-in-out"], lines
    assert all(line.split()[1] == "ADDED" for line in lines[1:]), lines
    # The columns line up with the header.
    assert all(line.index("ADDED") == lines[0].index("CHANGE") for line in lines[1:]), lines


async def test_apply_start_edit_describe_stop(server: ServerProcess, tmp_path: Path):
    doc = yaml.safe_load((await cli(server.port, "get", "contacts-ingress", "-o", "yaml")).stdout)
    doc["metadata"] = {"name": "mine"}
    doc.pop("status")
    manifest = tmp_path / "wf.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    res = await cli(server.port, "apply", "-f", str(manifest))
    assert res.stdout.strip() == "workflow/mine created", res.stderr
    assert (await cli(server.port, "start", "mine")).returncode == 0
    watch = await cli_process(server.port, "watch", "mine", "-o", "json")
    assert watch.stdout is not None
    while True:
        event = json.loads(await watch.stdout.readline())
        if event["object"]["status"]["phase"] == "RUNNING":
            break
    doc["spec"]["batchSize"] = 42
    manifest.write_text(yaml.safe_dump(doc))
    assert (await cli(server.port, "apply", "-f", str(manifest))).stdout.strip() == "workflow/mine configured"
    while True:
        event = json.loads(await watch.stdout.readline())
        if event["object"]["status"].get("drift", {}).get("detected"):
            break
    watch.terminate()
    await watch.wait()
    described = (await cli(server.port, "describe", "mine")).stdout
    assert "Phase:        RUNNING" in described
    assert "restart required" in described and "~ spec.batch_size" in described
    assert "SpecDrift  True" in described
    listed = (await cli(server.port, "list")).stdout
    assert [line.split()[6] for line in listed.splitlines() if line.startswith("mine ")] == ["yes"]  # DRIFT
    res = await cli(server.port, "start", "mine")
    assert res.returncode == 1 and "FAILED_PRECONDITION" in res.stderr and "RUNNING" in res.stderr
    res = await cli(server.port, "delete", "mine")
    assert res.returncode == 1 and "stop it first" in res.stderr
    assert (await cli(server.port, "stop", "mine")).returncode == 0
    assert (await cli(server.port, "delete", "mine", "--force")).stdout.strip() == "workflow/mine deleted"


async def test_invalid_apply_prints_field_paths(server: ServerProcess):
    bad = """
apiVersion: syncplane.io/v1
kind: Workflow
metadata: {name: broken}
spec:
  type: EGRESS
  batchSize: 0
  workers: 40
  source: {kind: CAMPAIGN_STANDARD, endpoint: "not a url", credentials: {name: acs}}
  destination: {kind: DYNAMICS365, endpoint: "https://org.crm.dynamics.com/", credentials: {name: d365}}
  egress: {}
"""
    res = await cli(server.port, "apply", "-f", "-", stdin=bad)
    assert res.returncode == 1
    assert "INVALID_ARGUMENT" in res.stderr
    for path in ("spec.workers", "spec.source.endpoint", "spec.egress"):
        assert f"  {path}: " in res.stderr
    res = await cli(server.port, "apply", "-f", "-", stdin=bad.replace("EGRESS", "SIDEWAYS"))
    assert res.returncode == 1 and "spec.type" in res.stderr and "SIDEWAYS" in res.stderr


def test_non_loopback_needs_tls_and_token():
    check_bind("127.0.0.1:7443", ServerSecurity())
    check_bind("[::1]:7443", ServerSecurity())
    with pytest.raises(InsecureBindError, match=r"TLS .* and a bearer token"):
        check_bind("0.0.0.0:7443", ServerSecurity())
    with pytest.raises(InsecureBindError, match="a bearer token"):
        check_bind("0.0.0.0:7443", ServerSecurity(tls_cert=Path("c"), tls_key=Path("k")))


def test_up_refuses_insecure_public_bind(tmp_path: Path):
    res = subprocess.run([sys.executable, "-m", "syncplane", "up", "--data-dir", str(tmp_path),
                          "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "refusing to listen on 0.0.0.0:0" in res.stderr


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


async def test_tls_and_token_on_a_public_address(tmp_path: Path, certs: tuple[Path, Path]):
    cert, key = certs
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    token_file.chmod(0o600)
    server = ServerProcess(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--token-file",
                           str(token_file), listen="0.0.0.0:0")
    try:
        await server.ready()
        ok = await cli(server.port, "list", token="tok-123", ca=cert)
        assert ok.returncode == 0 and ok.stdout.startswith("NAME"), ok.stderr
        denied = await cli(server.port, "list", token="wrong", ca=cert)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
        assert "tok-123" not in denied.stderr and "wrong" not in denied.stderr
        creds = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{server.port}", creds) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await svc_grpc.WorkflowServiceStub(channel).ListWorkflows(svc.ListWorkflowsRequest())
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "tok-123" not in log
