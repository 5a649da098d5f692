"""Item 3 of issue 13 (both backends' half): every mutating call writes one audit line — who,
what, which workflow, the result — and reads write none. The Kubernetes backend's caller
identity (TokenReview + SubjectAccessReview) is tested on the test cluster
(tests/k8s/test_security_callers.py)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from syncplane.api.callers import VERBS
from syncplane.api.server import ServerSecurity
from syncplane.console import ConsoleConfig
from syncplane.console.app import create_console, start_console
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.service import WorkflowService
from tests.embedded_plane import ControlPlane, serve
from tests.factories import spec

pytestmark = pytest.mark.security
TOKEN = "audit-t0ken"


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    async for p in serve(tmp_path, ServerSecurity(token=TOKEN)):
        yield p


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "syncplane.audit"]


async def test_every_mutating_call_writes_an_audit_line(plane: ControlPlane,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="syncplane.audit")
    md = (("authorization", f"Bearer {TOKEN}"),)
    stub = plane.stub
    name = "workflows/audited"
    await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="audited", workflow=pb.Workflow(spec=spec())),
                              metadata=md)
    await stub.GetWorkflow(svc.GetWorkflowRequest(name=name), metadata=md)
    await stub.ListWorkflows(svc.ListWorkflowsRequest(), metadata=md)
    await stub.StartWorkflow(svc.StartWorkflowRequest(name=name), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError):   # already running: refused, and audited as refused
        await stub.StartWorkflow(svc.StartWorkflowRequest(name=name), metadata=md)
    await stub.StopWorkflow(svc.StopWorkflowRequest(name=name), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError):   # no token: audited as unauthenticated, not executed
        await stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=name, force=True))
    await stub.DeleteWorkflow(svc.DeleteWorkflowRequest(name=name, force=True), metadata=md)
    lines = _lines(caplog)
    assert [(x["who"], x["what"], x["workflow"], x["result"]) for x in lines] == [
        ("token-holder", "CreateWorkflow", "audited", "OK"),
        ("token-holder", "StartWorkflow", "audited", "OK"),
        ("token-holder", "StartWorkflow", "audited", "FAILED_PRECONDITION"),
        ("token-holder", "StopWorkflow", "audited", "OK"),
        ("unauthenticated", "DeleteWorkflow", "audited", "UNAUTHENTICATED"),
        ("token-holder", "DeleteWorkflow", "audited", "OK"),
    ]
    assert TOKEN not in caplog.text


CSRF = re.compile(r'name="csrf-token" content="([0-9a-f]+)"')


async def _csrf(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url, headers={"Accept": "text/html"}) as resp:
        found = CSRF.search(await resp.text())
    assert found
    return found.group(1)


async def test_the_console_audits_its_mutating_pages_as_the_api_does(plane: ControlPlane,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """The console calls the service in-process: its pages go through the same check and audit line
    (callers.Call) as the gRPC calls they stand for."""
    caplog.set_level(logging.INFO, logger="syncplane.audit")
    await plane.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="audited", workflow=pb.Workflow(
        spec=spec())), metadata=(("authorization", f"Bearer {TOKEN}"),))
    security = ServerSecurity(token=TOKEN)
    runner, port = await start_console(create_console(WorkflowService(plane.store), security=security),
                                       ConsoleConfig("127.0.0.1:0", security))
    url = f"http://127.0.0.1:{port}"
    caplog.clear()
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            csrf = await _csrf(http, f"{url}/login")
            async with http.post(f"{url}/workflows/audited/start", json={}, headers={"X-CSRF-Token": csrf}) as resp:
                assert resp.status == 401   # not signed in: refused, and audited as such
            async with http.post(f"{url}/login", data={"csrf": csrf, "token": TOKEN}, allow_redirects=False) as resp:
                assert resp.status == 303
            csrf = await _csrf(http, f"{url}/")
            for path in ("/workflows/audited/start", "/workflows/missing/stop"):
                async with http.post(url + path, json={}, headers={"X-CSRF-Token": csrf}):
                    pass
            async with http.get(f"{url}/api/workflows") as resp:   # a read: no line
                assert resp.status == 200
    finally:
        await runner.cleanup()
    assert [(x["who"], x["what"], x["workflow"], x["result"]) for x in _lines(caplog)] == [
        ("unauthenticated", "StartWorkflow", "audited", "UNAUTHENTICATED"),
        ("token-holder", "StartWorkflow", "audited", "OK"),
        ("token-holder", "StopWorkflow", "missing", "NOT_FOUND"),
    ]
    assert TOKEN not in caplog.text


def test_every_rpc_has_a_verb() -> None:
    methods = svc.DESCRIPTOR.services_by_name["WorkflowService"].methods_by_name
    assert set(methods) == set(VERBS)
    assert svc_grpc  # the stubs the mapping is about
