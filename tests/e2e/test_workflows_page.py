"""Scenarios 1-4 of the Workflows page, each as a user sees it in Chromium against `syncplane up`
and the sandbox: start and watch it run, edit while running (the drift warning), invalid edits
and etag conflicts, dead letters retried once the destination accepts them."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Page, expect

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.e2e.conftest import Console, screenshot, writes_held_until

# Records what the page shows, as it changes: each status text and each backlog value.
OBSERVE = """(id) => {
  window.__notReloaded = true;
  window.__phases = []; window.__backlogs = [];
  const row = document.getElementById('wf-' + id);
  const status = row.querySelector('[data-field="phase"]');
  const backlog = row.querySelector('[data-field="backlog"]');
  const note = () => {
    if (window.__phases[window.__phases.length - 1] !== status.textContent) window.__phases.push(status.textContent);
    window.__backlogs.push(Number(backlog.textContent.replace(/[^0-9]/g, '')));
  };
  note();
  new MutationObserver(note).observe(row, {subtree: true, childList: true, characterData: true, attributes: true});
}"""
# Whether the observed row has shown a backlog above 0.
BACKLOG_SHOWN = "() => window.__backlogs.some(b => b > 0)"


def row(page: Page, name: str) -> Any:
    return page.locator(f"#wf-{name}")


async def test_start_shows_starting_then_running_live_and_the_backlog_rises_and_falls(
        console: Console, page: Page) -> None:
    """Scenario 1."""
    await console.create("contacts")
    await page.goto(console.url)
    r = row(page, "contacts")
    await expect(r.locator('[data-field="phase"]')).to_have_text("STOPPED")
    toggle = r.get_by_role("button", name="Start contacts")
    await expect(toggle).to_be_enabled()
    await page.evaluate(OBSERVE, "contacts")

    # Campaign's writes are held until the page has shown a backlog, so it rises whatever the speed.
    async with writes_held_until(page, console.sandbox.faults.acs, BACKLOG_SHOWN):
        await toggle.click()
        await expect(r.locator('[data-field="phase"]')).to_have_text("RUNNING")
        await expect(r.get_by_role("button", name="Stop contacts")).to_be_enabled()
    # The backlog drains to 0 once the 2,000 contacts are written.
    await console.sandbox_drained("contacts")
    await expect(r.locator('[data-field="backlog"]')).to_have_text("0")

    seen = await page.evaluate("({phases: window.__phases, backlogs: window.__backlogs, same: !!window.__notReloaded})")
    assert seen["same"], "the page reloaded"
    assert seen["phases"][:3] == ["STOPPED", "STARTING", "RUNNING"], seen["phases"]
    peak = max(seen["backlogs"])
    assert peak > 0, f"the backlog never rose: {seen['backlogs']}"
    assert seen["backlogs"][-1] == 0 and seen["backlogs"].index(peak) < len(seen["backlogs"]) - 1
    await screenshot(page, "1-start-running")


async def test_edit_while_running_warns_on_stop_until_a_stop_and_start(console: Console, page: Page) -> None:
    """Scenario 2: the edit is made on the edit page's form; the warning names the field."""
    await console.create("contacts")
    await console.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/contacts"))
    await console.phase_is("contacts", pb.PHASE_RUNNING)
    applied_before = (await console.get("contacts")).status.applied_generation

    await page.goto(console.url + "workflows/contacts/edit")
    await expect(page.get_by_text("a saved change applies at the next start")).to_be_visible()
    # Names stay updated on the CRM side only: the first name is written when a profile is created.
    await page.get_by_label("Apply updates").nth(2).uncheck()
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator("#message")).to_contain_text("applies at the next start")
    edited = await console.get("contacts")
    # The workflow page's drift diff: the field, its applied value (unset: the default) and its edited value.
    await page.goto(console.url + "workflows/contacts")
    diff = page.get_by_role("region", name="Edits not applied yet").get_by_role("row").filter(
        has_text="spec.ingress.entities[0].fields[2].apply_updates")
    await expect(diff.get_by_role("cell")).to_have_text(["not set", "false"])

    await page.goto(console.url)
    r = row(page, "contacts")
    warning = r.locator('[data-field="drift"]')
    await expect(warning).to_be_visible()
    await expect(warning).to_have_attribute("title", "Edited: spec.ingress.entities[0].fields[2].apply_updates; "
                                                     "applies at the next start")
    await r.get_by_role("button", name="Stop contacts").click()
    dialog = page.get_by_role("dialog")
    await expect(dialog.get_by_role("button", name="Restart to apply")).to_be_visible()
    await dialog.get_by_role("button", name="Stop", exact=True).click()
    await expect(r.locator('[data-field="phase"]')).to_have_text("STOPPED")
    await r.get_by_role("button", name="Start contacts").click()
    await expect(r.locator('[data-field="phase"]')).to_have_text("RUNNING")
    await expect(warning).to_be_hidden()

    await page.goto(console.url + "workflows/contacts")
    now = await console.get("contacts")
    assert now.status.applied_generation > edited.generation > applied_before
    assert now.spec.ingress.entities[0].fields[2].HasField("apply_updates")
    assert not now.spec.ingress.entities[0].fields[2].apply_updates
    assert now.status.phase == pb.PHASE_RUNNING and not now.status.last_error.reason, now.status
    await expect(page.locator('[data-field="appliedGeneration"]')).to_have_text(str(now.status.applied_generation))
    await expect(page.get_by_role("heading", name="Edits not applied yet")).to_have_count(0)
    await screenshot(page, "2-edit-applied-after-restart")


async def test_invalid_edit_shows_the_error_at_its_field_and_a_conflict_offers_a_reload(
        console: Console, page: Page) -> None:
    """Scenario 3."""
    await console.create("contacts")
    await page.goto(console.url + "workflows/contacts/edit")
    await page.get_by_label("Batch size (records)").fill("999999")
    await page.get_by_role("button", name="Save").click()
    error = page.locator('[data-error-for="spec.batch_size"]')
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("must be between 1 and")
    await expect(page.get_by_label("Batch size (records)")).to_have_attribute("aria-invalid", "true")
    assert (await console.get("contacts")).spec.batch_size == 100, "nothing was saved"

    # Another client edits first: this page's etag is stale.
    await page.goto(console.url + "workflows/contacts/edit")
    other = await console.get("contacts")
    other.spec.batch_size = 300
    await console.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=other))
    await page.get_by_label("Batch size (records)").fill("200")
    await page.get_by_role("button", name="Save").click()
    conflict = page.get_by_role("alert").filter(has_text="Someone else changed this workflow")
    await expect(conflict).to_be_visible()
    await expect(conflict.get_by_role("link", name="Reload the latest version")).to_be_visible()
    assert (await console.get("contacts")).spec.batch_size == 300, "the other client's edit stands"
    await screenshot(page, "3-etag-conflict")


async def test_a_stale_toggle_is_refused_with_a_message(console: Console, page: Page) -> None:
    """A double click from a page that has not caught up: the expected phase it sends is
    refused (FAILED_PRECONDITION) and shown as a message, not an error page."""
    await console.create("contacts")
    await page.route("**/events*", lambda route: route.abort())   # this page gets no live updates
    await page.goto(console.url)
    await console.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/contacts"))
    await row(page, "contacts").get_by_role("button", name="Start contacts").click()
    await expect(page.locator("#message")).to_contain_text("expected phase STOPPED but the workflow is")
    await expect(page).to_have_url(console.url)
    await screenshot(page, "1b-stale-toggle-refused")


async def test_poison_records_show_as_dead_letters_and_a_retry_clears_them(console: Console, page: Page) -> None:
    """Scenario 4."""
    bad = sorted(console.sandbox.d365.table("contacts").rows)[:3]
    console.sandbox.acs.poison_keys("profile", *bad)
    await console.create("contacts")
    await console.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/contacts"))

    await page.goto(console.url)
    await expect(row(page, "contacts").locator('[data-field="deadLetters"]')).to_have_text("3")
    await page.get_by_role("link", name="contacts", exact=True).click()
    letters = page.locator("#dl-rows")
    for key in bad:
        await expect(letters.get_by_role("row").filter(has_text=key)).to_contain_text("poison")

    console.sandbox.acs.clear_poison()
    await page.get_by_role("button", name="Retry all").click()
    await expect(page.locator("#message")).to_contain_text("3 marked for retry")
    await expect(page.locator('[data-field="deadLetters"]')).to_have_text("0")
    await expect(letters).to_contain_text("none")
    await screenshot(page, "4-dead-letters-retried")


async def test_create_from_a_template_and_delete_refused_while_running_unless_forced(
        console: Console, page: Page) -> None:
    """The edit page's create (from the opt-in/out template) and the workflow page's delete."""
    await page.goto(console.url + "new")
    await page.get_by_role("link", name="OPT_IN_OUT").click()
    await expect(page.get_by_role("heading", name="New OPT_IN_OUT workflow")).to_be_visible()
    await page.get_by_label("Name", exact=True).fill("Bad Name")
    await page.get_by_role("button", name="Create").click()
    await expect(page.locator('[data-error-for="workflow_id"]')).to_be_visible()
    await page.get_by_label("Name", exact=True).fill("flags")
    await page.get_by_role("button", name="Create").click()
    await expect(page.locator("#message")).to_have_text("Created (stopped).")
    created = await console.get("flags")
    assert created.spec.type == pb.WORKFLOW_TYPE_OPT_IN_OUT and created.spec.desired_state == pb.DESIRED_STATE_STOPPED

    await console.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/flags"))
    await page.reload()
    await page.get_by_role("button", name="Delete flags").click()
    await expect(page.locator("#message")).to_contain_text("stop it first, or delete with force")
    await console.get("flags")   # still there
    await page.get_by_label("Delete even while running").check()
    await page.get_by_role("button", name="Delete flags").click()
    await expect(page.locator("#message")).to_have_text("deleted flags")
    await expect(page.locator("#wf-flags")).to_have_count(0)
    await screenshot(page, "3b-create-and-delete")
