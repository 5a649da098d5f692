"""Scenario 6: the console's auth is the API's. Off loopback without a token it refuses to
start; with a token, a request without the session cookie is refused, signing in with the
token sets an HttpOnly, SameSite=Strict cookie, and a cross-site POST is refused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Page, expect

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.e2e.conftest import Console, screenshot, start_console

TOKEN = "console-e2e-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def test_off_loopback_without_a_token_the_console_refuses_to_start(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "syncplane", "up", "--data-dir", str(tmp_path), "--no-defaults",
                          "--listen", "127.0.0.1:0", "--console-listen", "0.0.0.0:0"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "refusing to listen on 0.0.0.0:0" in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.fixture
async def authed(tmp_path: Path) -> AsyncIterator[Console]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)  # the server refuses a token file others can read
    async for c in start_console(tmp_path, "--token-file", str(token_file)):
        yield c


async def test_without_the_cookie_requests_are_refused_and_the_login_sets_it(authed: Console, page: Page) -> None:
    await authed.stub.CreateWorkflow(svc.CreateWorkflowRequest(
        workflow_id="contacts", workflow=pb.Workflow(spec=authed.ingress_spec())), metadata=AUTH)
    async with aiohttp.ClientSession() as http:
        for method, path in (("GET", "api/workflows"), ("GET", "events"), ("GET", "workflows/contacts"),
                             ("POST", "workflows/contacts/start")):
            async with http.request(method, authed.url + path, allow_redirects=False,
                                    headers={"Accept": "application/json"}) as resp:
                assert resp.status in (401, 403), (method, path, resp.status)

    await page.goto(authed.url)
    await expect(page).to_have_url(authed.url + "login?next=/")
    await page.get_by_label("The server's bearer token").fill("wrong")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("alert")).to_have_text("That token is not the server's.")
    await page.get_by_label("The server's bearer token").fill(TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#wf-contacts")).to_be_visible()
    cookies = {c["name"]: c for c in await page.context.cookies()}
    session = cookies["syncplane_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert TOKEN not in session["value"], "the cookie never holds the token itself"
    await screenshot(page, "6-signed-in")


async def test_a_cross_site_post_is_refused(authed: Console, page: Page) -> None:
    await authed.stub.CreateWorkflow(svc.CreateWorkflowRequest(
        workflow_id="contacts", workflow=pb.Workflow(spec=authed.ingress_spec())), metadata=AUTH)
    await page.goto(authed.url + "login")
    await page.get_by_label("The server's bearer token").fill(TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.locator("#wf-contacts")).to_be_visible()

    # Another site (another origin on this machine) whose page posts a form to the console.
    evil = web.Application()

    async def attack(_: web.Request) -> web.Response:
        return web.Response(content_type="text/html", text=(
            f'<form id="f" method="post" action="{authed.url}workflows/contacts/start">'
            '<input name="expected_phase" value="STOPPED"></form><script>f.submit()</script>'))

    evil.router.add_get("/", attack)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.2", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with page.expect_response(f"{authed.url}workflows/contacts/start") as caught:
            await page.goto(f"http://127.0.0.2:{port}/")
        assert (await caught.value).status in (401, 403)
    finally:
        await runner.cleanup()
    wf = await authed.stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/contacts"), metadata=AUTH)
    assert wf.spec.desired_state != pb.DESIRED_STATE_RUNNING, "the cross-site POST started the workflow"

    # Even with the session cookie and a form, another Origin is refused (CSRF), not only by SameSite.
    session = {c["name"]: c["value"] for c in await page.context.cookies()}
    async with aiohttp.ClientSession(cookies=session) as http:
        async with http.post(authed.url + "workflows/contacts/start", data={"expected_phase": "STOPPED"},
                             headers={"Origin": "http://evil.example", "Accept": "application/json"}) as resp:
            assert resp.status == 403
        async with http.post(authed.url + "workflows/contacts/start", data={"expected_phase": "STOPPED"},
                             headers={"Accept": "application/json"}) as resp:
            assert resp.status == 403, "a POST without the page's CSRF token"
    await page.goto(authed.url)
    await screenshot(page, "6-cross-site-refused")
