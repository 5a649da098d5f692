"""The edit page's repeated fields in Chromium: "Add row" adds a blank, renumbered row (with the
defaults, whatever was typed into the row before it) whose inputs save into the spec at their
index, and whose violations appear next to its own fields."""

from __future__ import annotations

from playwright.async_api import Page, expect

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
