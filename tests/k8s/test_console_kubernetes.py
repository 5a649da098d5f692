"""Scenario 5: the Workflows page against the Kubernetes backend. `syncplane server --backend
kubernetes` (in-process, with its console on a loopback port) over the test cluster's Workflow
resources, the operator reconciling them, the fake kubelet running the worker pod against the
sandbox; in Chromium, signed in with a user's own Kubernetes token, Start moves the row to STARTING
then RUNNING with no reload, and the backlog rises and falls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from syncplane.console import ConsoleConfig
from syncplane.runtime.kubernetes import KubernetesServerConfig, serve_kubernetes
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.e2e.conftest import browser, page, screenshot, writes_held_until  # noqa: F401 (fixtures)
from tests.e2e.test_workflows_page import BACKLOG_SHOWN, OBSERVE
from tests.integration.conftest import wait_until
from tests.k8s.kubelet import FakeKubelet
from tests.k8s.test_security_callers import user, user_roles
from tests.k8s.test_worker_data import apply_workflow, create_secrets

pytestmark = pytest.mark.k8s
CONTACTS = 2000


@pytest.mark.timeout(900)
async def test_the_workflows_page_on_kubernetes(k8s_cluster, namespace, operator, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, page: Page) -> None:  # noqa: F811
    monkeypatch.setenv("KUBECONFIG", str(k8s_cluster.kubeconfig))
    sb = await start_sandbox(seed=SeedSpec(contacts=CONTACTS, seed=5))
    stop = asyncio.Event()
    port_file = tmp_path / "console.port"
    server = asyncio.create_task(serve_kubernetes(KubernetesServerConfig(
        namespace=namespace, address="127.0.0.1:0", console=ConsoleConfig("127.0.0.1:0"),
        console_port_file=port_file), stop))
    try:
        await create_secrets(k8s_cluster, namespace, sb)
        name = await apply_workflow(k8s_cluster, namespace, sb, tmp_path, "10-contacts-ingress.yaml", workers=1)
        await wait_until(lambda: port_file.exists() or server.done(), timeout=60, what="the console's port")
        assert not server.done(), server
        url = f"http://127.0.0.1:{int(port_file.read_text())}/"
        # the server checks each caller's own Kubernetes token: sign in as a user bound to `edit`
        user_roles(k8s_cluster, "console")
        token = user(k8s_cluster, namespace, "an-editor", "edit")
        async with FakeKubelet(namespace, Path(k8s_cluster.kubeconfig), tmp_path / "containers"):
            await page.goto(url)
            await page.locator("#token").fill(token)
            await page.get_by_role("button", name="Sign in").click()
            await page.wait_for_url(url)
            row = page.locator(f"#wf-{name}")
            await expect(row.locator('[data-field="phase"]')).to_have_text("STOPPED")
            await page.evaluate(OBSERVE, name)
            # Campaign's writes are held until the page has shown a backlog: it rises before it
            # falls to 0 whatever the machine's speed and the destination's concurrency.
            async with writes_held_until(page, sb.faults.acs, BACKLOG_SHOWN):
                await row.get_by_role("button", name=f"Start {name}").click()
                await expect(row.locator('[data-field="phase"]')).to_have_text("RUNNING")

            await wait_until(lambda: len(sb.acs.profiles.rows) >= CONTACTS, timeout=400, what="every contact")
            await expect(row.locator('[data-field="backlog"]')).to_have_text("0")
            seen = await page.evaluate("({phases: window.__phases, backlogs: window.__backlogs, "
                                       "same: !!window.__notReloaded})")
            assert seen["same"], "the page reloaded"
            assert seen["phases"][:3] == ["STOPPED", "STARTING", "RUNNING"], seen["phases"]
            assert max(seen["backlogs"]) > 0 and seen["backlogs"][-1] == 0, seen["backlogs"]
            await screenshot(page, "5-kubernetes-start-running")
            await row.get_by_role("button", name=f"Stop {name}").click()
            await expect(row.locator('[data-field="phase"]')).to_have_text("STOPPED")
    finally:
        stop.set()
        await asyncio.wait_for(server, 60)
        await sb.stop()
