"""Issue 13 item 3 on the test cluster: on the Kubernetes backend each caller's own token decides.

The gRPC server (auth mode kubernetes) authenticates the caller's Kubernetes token with a
TokenReview and authorises each call with a SubjectAccessReview for its verb on ``workflows``
in the namespace. The chart aggregates the workflow rights into the built-in ClusterRoles, so a
user bound to ``view`` can list but not start, and a user bound to ``edit`` can start — through
gRPC, exactly as kubectl would allow them. Every mutating call leaves an audit line naming them."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from syncplane.console import ConsoleConfig
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.runtime.kubernetes import KubernetesServerConfig, serve_kubernetes
from tests.factories import spec

pytestmark = [pytest.mark.k8s, pytest.mark.security]
CHART = Path(__file__).resolve().parents[2] / "charts" / "syncplane"


def user_roles(cluster: Any, release: str) -> None:
    """The chart's aggregated user ClusterRoles (what `helm install` creates)."""
    out = cluster.helm("template", release, str(CHART), "--show-only", "templates/clusterrole.yaml").stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "ClusterRole"
            and "workflows" in d["metadata"]["name"]]
    assert len(docs) == 2, docs
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))


def user(cluster: Any, namespace: str, name: str, cluster_role: str) -> str:
    """A ServiceAccount bound to a built-in ClusterRole in the namespace; returns its token."""
    cluster.kubectl("create", "serviceaccount", name, "-n", namespace)
    cluster.kubectl("create", "rolebinding", f"{name}-{cluster_role}", f"--clusterrole={cluster_role}",
                    f"--serviceaccount={namespace}:{name}", "-n", namespace)
    cluster.wait_until(f"{cluster_role} to aggregate the workflow rights", lambda: cluster.kubectl(
        "auth", "can-i", "get", "workflows.syncplane.io", "-n", namespace,
        f"--as=system:serviceaccount:{namespace}:{name}", check=False).stdout.strip() == "yes")
    return str(cluster.kubectl("create", "token", name, "-n", namespace).stdout.strip())


@pytest.fixture
async def api(k8s_cluster, workflow_crd, operator, namespace, monkeypatch, tmp_path) -> AsyncIterator[int]:
    """The API server in auth mode kubernetes (its own identity: the test cluster's admin)."""
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    port_file = tmp_path / "port"
    stop = asyncio.Event()
    task = asyncio.create_task(serve_kubernetes(KubernetesServerConfig(
        namespace=namespace, address="127.0.0.1:0", port_file=port_file, auth="kubernetes",
        console=ConsoleConfig("127.0.0.1:0"), console_port_file=tmp_path / "console.port"), stop))
    for _ in range(600):
        if port_file.exists() or task.done():
            break
        await asyncio.sleep(0.05)
    assert port_file.exists(), task.exception() if task.done() else "no port file"
    yield int(port_file.read_text())
    stop.set()
    await task


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def test_view_can_list_but_not_start_edit_can_start(k8s_cluster, namespace, api,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="syncplane.audit")
    user_roles(k8s_cluster, "callers")   # cluster-scoped roles, idempotent: one release name
    viewer = user(k8s_cluster, namespace, "viewer", "view")
    editor = user(k8s_cluster, namespace, "editor", "edit")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api}") as channel:
        stub = svc_grpc.WorkflowServiceStub(channel)
        name = "workflows/guarded"
        # view: may not create; edit may
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.CreateWorkflow(svc.CreateWorkflowRequest(
                workflow_id="guarded", workflow=pb.Workflow(spec=spec())), metadata=_md(viewer))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="guarded", workflow=pb.Workflow(spec=spec())),
                                  metadata=_md(editor))
        # view: may list and get, not start
        listed = await stub.ListWorkflows(svc.ListWorkflowsRequest(), metadata=_md(viewer))
        assert [w.name for w in listed.workflows] == [name]
        await stub.GetWorkflow(svc.GetWorkflowRequest(name=name), metadata=_md(viewer))
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.StartWorkflow(svc.StartWorkflowRequest(name=name), metadata=_md(viewer))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not patch" in (denied.value.details() or "")
        # edit: may start
        started = await stub.StartWorkflow(svc.StartWorkflowRequest(name=name), metadata=_md(editor))
        assert started.spec.desired_state == pb.DESIRED_STATE_RUNNING
        # no token, or one the API server does not know: unauthenticated
        for token in (None, "not-a-kubernetes-token"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListWorkflows(svc.ListWorkflowsRequest(), metadata=_md(token))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # kubectl agrees with what gRPC allowed
    def can_i(who: str, verb: str) -> str:
        return str(k8s_cluster.kubectl("auth", "can-i", verb, "workflows.syncplane.io", "-n", namespace,
                                       f"--as=system:serviceaccount:{namespace}:{who}", check=False).stdout.strip())
    assert (can_i("viewer", "list"), can_i("viewer", "patch"), can_i("editor", "patch")) == ("yes", "no", "yes")
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "syncplane.audit"]
    assert [(a["who"].rsplit(":", 1)[-1], a["what"], a["workflow"], a["result"]) for a in audit] == [
        ("viewer", "CreateWorkflow", "guarded", "PERMISSION_DENIED"),
        ("editor", "CreateWorkflow", "guarded", "OK"),
        ("viewer", "StartWorkflow", "guarded", "PERMISSION_DENIED"),
        ("editor", "StartWorkflow", "guarded", "OK"),
    ]
    assert viewer not in caplog.text and editor not in caplog.text


CSRF = re.compile(r'name="csrf-token" content="([0-9a-f]+)"')


async def signed_in(url: str, token: str) -> tuple[aiohttp.ClientSession, str]:
    """A browser-like session signed in to the console with ``token``, and its CSRF token."""
    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))   # cookies for 127.0.0.1
    html = {"Accept": "text/html"}
    async with session.get(f"{url}/login", headers=html) as resp:
        csrf = CSRF.search(await resp.text())
    assert csrf
    async with session.post(f"{url}/login", data={"csrf": csrf.group(1), "token": token, "next": "/"},
                            allow_redirects=False) as resp:
        assert resp.status in (303, 401), resp.status
        if resp.status == 401:
            await session.close()
            raise PermissionError("sign-in refused")
    async with session.get(f"{url}/", headers=html) as resp:
        assert resp.status == 200
        csrf = CSRF.search(await resp.text())
    assert csrf
    return session, csrf.group(1)


async def test_the_console_takes_each_users_own_kubernetes_token(k8s_cluster, namespace, api, tmp_path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Issue 13 item 3 for the web console: with auth mode kubernetes it signs users in with their own
    Kubernetes token and authorises each page as the gRPC call it is (one path: callers.Call), so a
    `view` user sees the workflows but cannot start one, an `edit` user can, and both are audited."""
    caplog.set_level(logging.INFO, logger="syncplane.audit")
    url = f"http://127.0.0.1:{int((tmp_path / 'console.port').read_text())}"
    user_roles(k8s_cluster, "callers")
    viewer = user(k8s_cluster, namespace, "viewer", "view")
    editor = user(k8s_cluster, namespace, "editor", "edit")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api}") as channel:
        await svc_grpc.WorkflowServiceStub(channel).CreateWorkflow(svc.CreateWorkflowRequest(
            workflow_id="guarded", workflow=pb.Workflow(spec=spec())), metadata=_md(editor))
    caplog.clear()
    async with aiohttp.ClientSession() as anonymous:
        # no token, or one the API server does not know: nothing but the sign-in page
        async with anonymous.get(f"{url}/api/workflows") as resp:
            assert resp.status == 401
        async with anonymous.get(f"{url}/api/workflows", headers=_bearer("not-a-kubernetes-token")) as resp:
            assert resp.status == 401
        # a script may send its token as a header
        async with anonymous.get(f"{url}/api/workflows", headers=_bearer(viewer)) as resp:
            assert resp.status == 200 and "guarded" in await resp.text()
    with pytest.raises(PermissionError):
        await signed_in(url, "not-a-kubernetes-token")
    start = {"expected_phase": "STOPPED"}
    view, view_csrf = await signed_in(url, viewer)
    edit, edit_csrf = await signed_in(url, editor)
    try:
        async with view.get(f"{url}/api/workflows") as resp:
            assert resp.status == 200 and [w["id"] for w in (await resp.json())["workflows"]] == ["guarded"]
        async with view.post(f"{url}/workflows/guarded/start", json=start,
                             headers={"X-CSRF-Token": view_csrf}) as resp:
            assert resp.status == 403 and (await resp.json())["code"] == "PERMISSION_DENIED"
        async with edit.post(f"{url}/workflows/guarded/start", json=start,
                             headers={"X-CSRF-Token": edit_csrf}) as resp:
            assert resp.status == 200, await resp.text()
    finally:
        await view.close()
        await edit.close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{api}") as channel:
        wf = await svc_grpc.WorkflowServiceStub(channel).GetWorkflow(
            svc.GetWorkflowRequest(name="workflows/guarded"), metadata=_md(viewer))
    assert wf.spec.desired_state == pb.DESIRED_STATE_RUNNING
    audit = [json.loads(r.getMessage()) for r in caplog.records if r.name == "syncplane.audit"]
    assert [(a["who"].rsplit(":", 1)[-1], a["what"], a["workflow"], a["result"]) for a in audit] == [
        ("viewer", "StartWorkflow", "guarded", "PERMISSION_DENIED"),
        ("editor", "StartWorkflow", "guarded", "OK"),
    ]
    assert viewer not in caplog.text and editor not in caplog.text


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
