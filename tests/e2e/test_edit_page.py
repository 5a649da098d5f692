"""The edit page in Chromium: "Add row" adds a blank, renumbered row (with the defaults, whatever
was typed into the row before it) whose inputs save into the spec at their index, and whose
violations appear next to its own fields; the YAML tab shows the spec, shows a violation of the
text it holds, and saves an edit."""

from __future__ import annotations

import re

from playwright.async_api import Page, expect

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.e2e.conftest import Console, screenshot

FIELDS = "spec.ingress.entities[0].fields"


async def test_add_row_in_the_mapping_editor(console: Console, page: Page) -> None:
    created = await console.create("contacts")
    before = len(created.spec.ingress.entities[0].fields)
    await page.goto(console.url + "workflows/contacts/edit")
    mappings = page.get_by_role("group", name="Field mappings")
    blank = f"{FIELDS}[{before}]"
    # The blank row the page ends with, then two more from "Add row".
    await page.locator(f'[id="{blank}.source"]').fill("telephone1")
    await page.locator(f'[id="{blank}.destination"]').fill("phone")
    await page.locator(f'[id="{blank}.apply_updates"]').uncheck()   # a new row still starts with the default
    for n in (1, 2):
        await mappings.get_by_role("button", name="Add row to Field mappings").click()
        added = f"{FIELDS}[{before + n}]"
        source = mappings.get_by_label("Source field").nth(before + n)
        await expect(source).to_have_attribute("name", f"{added}.source")
        await expect(source).to_be_focused()
        await expect(source).to_have_value("")
        await expect(mappings.get_by_label("Apply updates").nth(before + n)).to_be_checked()
    # The first added row: a destination another row has; the second left blank (dropped).
    await mappings.get_by_label("Source field").nth(before + 1).fill("jobtitle")
    await mappings.get_by_label("Destination field").nth(before + 1).fill("email")
    await mappings.get_by_label("Apply updates").nth(before + 1).uncheck()
    await page.get_by_role("button", name="Save").click()

    error = page.locator(f'[data-error-for="{FIELDS}[{before + 1}].destination"]')
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("is the destination of more than one source field")
    await expect(page.get_by_label("Destination field").nth(before + 1)).to_have_attribute("aria-invalid", "true")
    assert len((await console.get("contacts")).spec.ingress.entities[0].fields) == before, "nothing was saved"

    await page.get_by_label("Destination field").nth(before + 1).fill("jobTitle")
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator("#message")).to_have_text("Saved.")
    fields = (await console.get("contacts")).spec.ingress.entities[0].fields
    assert [(f.source, f.destination) for f in fields[before:]] == [("telephone1", "phone"), ("jobtitle", "jobTitle")]
    assert fields[before].HasField("apply_updates") and not fields[before].apply_updates
    assert fields[before + 1].HasField("apply_updates") and not fields[before + 1].apply_updates
    await screenshot(page, "3c-mapping-rows-added")


async def test_yaml_tab_shows_the_spec_and_saves_an_edit(console: Console, page: Page) -> None:
    await console.create("contacts", console.ingress_spec(batch_size=100))
    await console.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/contacts"))
    await console.phase_is("contacts", pb.PHASE_RUNNING)
    await page.goto(console.url + "workflows/contacts/edit")
    yaml_tab = page.get_by_role("tab", name="YAML")
    await yaml_tab.click()
    await expect(yaml_tab).to_have_attribute("aria-selected", "true")
    spec = page.get_by_label("Spec (YAML")
    await expect(spec).to_be_visible()
    await expect(page.locator("#panel-form")).to_be_hidden()
    text = await spec.input_value()
    assert "batchSize: 100" in text and f"endpoint: {console.sandbox.d365_url}" in text, text

    # A value the rules refuse: its violation shows in the YAML tab, and nothing is saved.
    await spec.fill(text.replace("batchSize: 100", "batchSize: -5"))
    await page.get_by_role("button", name="Save").click()
    error = page.get_by_role("alert").filter(has_text="spec.batch_size")
    await expect(error).to_be_visible()
    await expect(error).to_contain_text("must be between 1 and")
    await expect(spec).to_have_attribute("aria-invalid", "true")
    await expect(spec).to_be_focused()
    await expect(page.get_by_role("tab", name="YAML")).to_have_attribute("aria-selected", "true")
    await expect(spec).to_have_value(re.compile("batchSize: -5"))
    assert (await console.get("contacts")).spec.batch_size == 100

    await spec.fill(text.replace("batchSize: 100", "batchSize: 37"))
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator("#message")).to_contain_text("Saved. The change applies at the next start.")
    assert (await console.get("contacts")).spec.batch_size == 37
    # The workflow page it lands on shows the saved edit as not applied yet: applied → edited.
    drift = page.get_by_role("region", name="Edits not applied yet").get_by_role("row").filter(
        has_text="spec.batch_size")
    await expect(drift.get_by_role("cell")).to_have_text(["100", "37"])
    await screenshot(page, "3d-yaml-tab-saved")
