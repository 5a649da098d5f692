"""Items 7-10 of issue 13: cleartext and unsafe targets, validation holes, naming, exposure switches."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.api.server import ServerSecurity, create_server
from syncplane.errors import InvalidArgument
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.service import WorkflowService
from syncplane.store.sqlite import SqliteStore
from syncplane.validation import validate_labels
from syncplane.validation.endpoints import endpoint_problem
from syncplane.validation.names import DNS1123_LABEL, parse_name
from syncplane.validation.rules import CAMPAIGN_IDENTIFIER, CRM_IDENTIFIER
from tests.embedded_plane import ControlPlane, serve
from tests.factories import spec

pytestmark = pytest.mark.security


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    async for p in serve(tmp_path):
        yield p


ENDPOINTS = [
    # (endpoint, allow_cleartext, refused because ...)
    ("http://contoso.crm.dynamics.com/api/data/v9.2/", False, "must use https"),
    ("http://10.0.0.7/api/data/v9.2/", False, "must use https"),
    ("http://169.254.169.254/latest/meta-data/", True, "link-local or cloud metadata"),
    ("https://169.254.169.254/latest/", False, "link-local or cloud metadata"),
    ("https://[fe80::1]/api/", False, "link-local or cloud metadata"),
    ("https://[::ffff:169.254.169.254]/", False, "link-local or cloud metadata"),
    ("https://metadata.google.internal/computeMetadata/v1/", False, "link-local or cloud metadata"),
    ("https://100.100.100.200/latest/", False, "link-local or cloud metadata"),
    ("https://contoso.crm.dynamics.com/api data/", False, "spaces or control characters"),
    ("https://contoso.crm.dynamics.com/api/\n", False, "spaces or control characters"),
    ("https://contoso.crm.dynamics.com/\x00/", False, "spaces or control characters"),
    ("https://contoso.crm.dynamics.com\t/", False, "spaces or control characters"),
    ("https://user:pw@contoso.crm.dynamics.com/", False, "must not carry credentials"),
    ("ftp://contoso.crm.dynamics.com/", False, "http(s) URL"),
    ("https://contoso.crm.dynamics.com:99999/", False, "http(s) URL"),
]
ACCEPTED = [
    ("https://contoso.crm.dynamics.com/api/data/v9.2/", False),
    ("http://127.0.0.1:7480/api/data/v9.2/", False),       # the sandbox, on loopback
    ("http://localhost:7480/api/data/v9.2/", False),
    ("http://[::1]:7480/api/data/v9.2/", False),
    ("http://crm.test.internal/api/data/v9.2/", True),     # cleartext, explicitly
]


@pytest.mark.parametrize(("endpoint", "cleartext", "reason"), ENDPOINTS)
async def test_unsafe_endpoints_are_refused_naming_the_field(plane: ControlPlane, endpoint: str, cleartext: bool,
                                                             reason: str) -> None:
    wf = pb.Workflow(spec=spec("ingress"))
    wf.spec.source.endpoint = endpoint
    wf.spec.source.allow_cleartext = cleartext
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await plane.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="unsafe", workflow=wf))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    problem = endpoint_problem(endpoint, cleartext)
    assert problem is not None and reason in problem


@pytest.mark.parametrize(("endpoint", "cleartext"), ACCEPTED)
def test_safe_endpoints_are_accepted(endpoint: str, cleartext: bool) -> None:
    assert endpoint_problem(endpoint, cleartext) is None


def test_a_kubectl_applied_endpoint_is_checked_by_the_worker_too() -> None:
    """The worker applies the same rules at start (a Workflow applied with kubectl skips the API)."""
    from syncplane.credentials import CredentialsError, check_endpoints
    s = spec("ingress")
    s.source.endpoint = "https://169.254.169.254/api/data/v9.2/"
    with pytest.raises(CredentialsError) as caught:
        check_endpoints(s, {})
    assert caught.value.reason == "ENDPOINT_NOT_ALLOWED" and "spec.source.endpoint" in str(caught.value)


# ------------------------------------------------------------------ full matches
NAMES = st.from_regex(DNS1123_LABEL, fullmatch=True).filter(lambda s: 0 < len(s) <= 63)
TAILS = st.sampled_from(["\n", "\r\n", " ", "\t", "\x00", "\n\n"])


@given(NAMES, TAILS)
def test_a_name_with_a_trailing_newline_or_space_is_refused(name: str, tail: str) -> None:
    parse_name(name)
    with pytest.raises(InvalidArgument):
        parse_name(name + tail)


@settings(deadline=None)  # pure code; the first example also imports and builds a spec, on a shared machine
@given(st.from_regex(CRM_IDENTIFIER, fullmatch=True), st.from_regex(CAMPAIGN_IDENTIFIER, fullmatch=True), TAILS)
def test_identifiers_with_a_trailing_newline_are_refused(crm: str, campaign: str, tail: str) -> None:
    from syncplane.validation import validate_spec
    s = spec("ingress")
    s.ingress.entities[0].fields[0].source = crm + tail
    s.ingress.entities[0].fields[0].destination = campaign + tail
    with pytest.raises(InvalidArgument) as caught:
        validate_spec(s)
    fields = {v.field for v in caught.value.violations}
    assert {"spec.ingress.entities[0].fields[0].source", "spec.ingress.entities[0].fields[0].destination"} <= fields


@given(TAILS)
def test_labels_with_a_trailing_newline_are_refused(tail: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_labels({"team": "crm" + tail})
    with pytest.raises(InvalidArgument):
        validate_labels({"team" + tail: "crm"})


# ------------------------------------------------------------------ syncplane apply: bounded YAML
def _bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(("what", "text"), [
    ("alias bomb", _bomb()),
    ("deep nesting", "spec: " + "[" * 100_000 + "]" * 100_000 + "\n"),
    ("many aliases", "a: &a x\nb: [" + ",".join(["*a"] * 1000) + "]\n"),
    ("huge", "# " + "x" * (2 * 1024 * 1024) + "\n"),
])
async def test_apply_refuses_hostile_yaml_with_one_error_line(tmp_path: Path, what: str, text: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    # No server is needed: the file is refused before anything is sent (the port is closed).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncplane", "--server", "127.0.0.1:9", "apply", "-f", str(path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1, err.decode()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), lines


# ------------------------------------------------------------------ the CLI's token
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os
    return subprocess.run([sys.executable, "-m", "syncplane", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_the_cli_refuses_a_cleartext_token_to_a_remote_server() -> None:
    res = _cli("--server", "192.0.2.10:7443", "list", env={"SYNCPLANE_TOKEN": "t0ken-4711"})
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error: refusing to send the token in clear text to 192.0.2.10:7443")
    assert "t0ken-4711" not in res.stderr


def test_a_token_flag_warns_it_shows_in_ps(tmp_path: Path) -> None:
    res = _cli("--server", "127.0.0.1:9", "--token", "t0ken-4711", "get", "x")
    assert "warning: --token shows in the process list" in res.stderr
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-4711")
    token_file.chmod(0o600)
    res = _cli("--server", "127.0.0.1:9", "--token-file", str(token_file), "get", "x")
    assert "warning" not in res.stderr


# ------------------------------------------------------------------ naming and reflection
def test_the_bind_refusal_names_the_variable_the_server_reads(tmp_path: Path) -> None:
    res = _cli("up", "--data-dir", str(tmp_path), "--listen", "0.0.0.0:0")
    assert res.returncode != 0 and "SYNCPLANE_SERVER_TOKEN" in res.stderr
    assert "SYNCPLANE_TOKEN " not in res.stderr and "SYNCPLANE_TOKEN)" not in res.stderr


@pytest.mark.parametrize("reflection", [True, False])
async def test_reflection_can_be_turned_off(tmp_path: Path, reflection: bool) -> None:
    store = SqliteStore(tmp_path / "s.db")
    server, port, _ = await create_server(WorkflowService(store), "127.0.0.1:0",
                                          ServerSecurity(reflection=reflection))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            if reflection:
                names = [s.name async for r in call for s in r.list_services_response.service]
                assert "syncplane.v1.WorkflowService" in names
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in call:
                        pass
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
        store.close()


def test_the_cli_refuses_an_exposed_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("t0ken-4711")
    token_file.chmod(0o644)
    res = _cli("--server", "127.0.0.1:9", "--token-file", str(token_file), "get", "x")
    assert res.returncode == 1 and f"chmod 600 {token_file}" in res.stderr and "t0ken-4711" not in res.stderr
