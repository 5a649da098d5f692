"""The workflow page in Chromium against `syncplane up` and the sandbox: its status beyond the
row (counters, workers, conditions, last error, table sizes) follows the event stream with no
reload."""

from __future__ import annotations

import re

from playwright.async_api import Locator, Page, expect

from syncplane.api.v1 import workflow_service_pb2 as svc
from tests.e2e.conftest import Console, screenshot

NOT_RELOADED = "() => { window.__notReloaded = true; }"


def figure(n: int) -> re.Pattern[str]:
    """A count as the browser prints it in any locale's grouping (2000, 2,000, 2.000, 2 000)."""
    digits = str(n)
    head = len(digits) % 3 or 3
    groups = [digits[:head]] + [digits[i:i + 3] for i in range(head, len(digits), 3)]
    return re.compile("^" + r"[,.\s\u202f\u00a0]?".join(groups) + "$")


def condition_row(page: Page, ctype: str) -> Locator:
    return page.locator("#condition-rows tr").filter(has=page.get_by_role("rowheader", name=ctype, exact=True))


async def test_counters_workers_conditions_and_last_error_update_live(console: Console, page: Page) -> None:
    await console.create("contacts")
    await page.goto(console.url + "workflows/contacts")
    await page.evaluate(NOT_RELOADED)
    await expect(page.locator('[data-field="counters.written"]')).to_have_text("0")
    await expect(page.locator('[data-field="lastError"]')).to_have_text("none")

    await page.get_by_role("button", name="Start contacts").click()
    await expect(page.locator('[data-field="phase"]')).to_have_text("RUNNING")
    await expect(page.locator('[data-field="readyWorkers"]')).to_have_text("1")
    await expect(page.locator('[data-field="desiredWorkers"]')).to_have_text("1")
    await expect(condition_row(page, "Ready")).to_contain_text("WorkersReady")
    await console.sandbox_drained("contacts")
    contacts = len(console.sandbox.d365.table("contacts").rows)
    await expect(page.locator('[data-field="counters.written"]')).to_have_text(figure(contacts))
    await expect(page.locator('[data-field="counters.read"]')).to_have_text(figure(contacts))
    tables = page.locator("#table-rows tr").filter(has=page.get_by_role("rowheader", name="contact", exact=True))
    await expect(tables.locator("td")).to_have_text(figure(contacts))

    # A mapped field the CRM does not have: the next start ends in ERROR, its reason shown live.
    await page.get_by_role("button", name="Stop contacts").click()
    await expect(page.locator('[data-field="phase"]')).to_have_text("STOPPED")
    await expect(page.locator('[data-field="readyWorkers"]')).to_have_text("0")
    wf = await console.get("contacts")
    wf.spec.ingress.entities[0].fields[1].source = "nosuchfield"
    await console.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=wf))
    await page.get_by_role("button", name="Start contacts").click()
    await expect(page.locator('[data-field="phase"]')).to_have_text("ERROR")
    await expect(page.locator('[data-field="lastError"]')).to_contain_text("FIELD_NOT_FOUND")
    await expect(page.locator('[data-field="lastError"]')).to_contain_text("nosuchfield")
    await expect(page.locator('[data-field="lastError"] time')).not_to_have_text("")
    await expect(condition_row(page, "Ready")).to_contain_text("False")
    assert await page.evaluate("!!window.__notReloaded"), "the page reloaded"
    await screenshot(page, "7-workflow-page-live")
