"""What a user notices beyond the scenarios: times in the browser's own time zone and locale,
keyboard use (the toggle and the drift dialog without a mouse), no layout shift while live
updates arrive, and the pages readable at 390 px (no sideways scrolling)."""

from __future__ import annotations

from datetime import UTC
from zoneinfo import ZoneInfo

from playwright.async_api import Browser, Page, expect

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.e2e.conftest import Console, screenshot

SHIFTS = """() => {
  window.__shift = 0;
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) if (!e.hadRecentInput) window.__shift += e.value;
  }).observe({type: 'layout-shift', buffered: false});
}"""


async def test_keyboard_time_zone_and_no_layout_shift(console: Console, browser: Browser) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 800}, timezone_id="Asia/Tokyo",
                                        locale="en-GB")
    page = await context.new_page()
    try:
        wf = await console.create("contacts")
        await page.goto(console.url + "workflows/contacts")
        created = wf.create_time.ToDatetime(tzinfo=UTC).astimezone(ZoneInfo("Asia/Tokyo"))
        await expect(page.get_by_role("region", name="Status").get_by_role("time")).to_have_text(
            created.strftime("%d/%m/%Y, %H:%M:%S"))

        await page.goto(console.url)
        await page.evaluate(SHIFTS)
        # Keyboard only: Tab until the toggle has focus, Enter presses it.
        toggle = page.get_by_role("button", name="Start contacts")
        for _ in range(20):
            await page.keyboard.press("Tab")
            if await toggle.evaluate("b => b === document.activeElement"):
                break
        await expect(toggle).to_be_focused()
        await page.keyboard.press("Enter")
        status = page.locator('#wf-contacts [data-field="phase"]')
        await expect(status).to_have_text("RUNNING")
        await console.sandbox_drained("contacts")
        await expect(page.locator('#wf-contacts [data-field="backlog"]')).to_have_text("0")
        assert await page.evaluate("window.__shift") == 0, "live updates moved the layout"

        # The drift dialog by keyboard: Enter on Stop opens it, Escape closes it and nothing stops.
        current = await console.get("contacts")
        current.spec.batch_size = 50
        await console.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=current))
        stop = page.get_by_role("button", name="Stop contacts")
        await expect(page.locator('#wf-contacts [data-field="drift"]')).to_be_visible()
        await stop.focus()
        await page.keyboard.press("Enter")
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_be_visible()
        await page.keyboard.press("Escape")
        await expect(dialog).to_be_hidden()
        assert (await console.get("contacts")).spec.desired_state == pb.DESIRED_STATE_RUNNING
        assert await page.locator('#wf-contacts [data-field="drift"]').is_visible(), "nothing was restarted"

        # Again, and Enter on the dialog's first button: Restart to apply. The edit is then applied.
        await stop.focus()
        await page.keyboard.press("Enter")
        await expect(dialog.get_by_role("button", name="Restart to apply")).to_be_focused()
        await page.keyboard.press("Enter")
        await expect(page.locator('#wf-contacts [data-field="drift"]')).to_be_hidden()
        await expect(status).to_have_text("RUNNING")
        restarted = await console.get("contacts")
        assert restarted.status.applied_generation == restarted.generation and not restarted.status.drift.detected
        await screenshot(page, "5q-keyboard-tokyo")
    finally:
        await context.close()


async def test_readable_at_390_px(console: Console, browser: Browser) -> None:
    await console.create("contacts")
    context = await browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    page = await context.new_page()
    try:
        for path in ("", "workflows/contacts", "workflows/contacts/edit", "new?type=OPT_IN_OUT"):
            await page.goto(console.url + path)
            wide = await page.evaluate("document.scrollingElement.scrollWidth")
            assert wide <= 390, f"/{path} scrolls sideways at 390 px ({wide} px wide)"
        await page.goto(console.url)
        await expect(page.get_by_role("button", name="Start contacts")).to_be_visible()
        await screenshot(page, "5q-workflows-390px")
    finally:
        await context.close()


async def test_every_asset_comes_from_the_console_and_the_status_says_since_when(console: Console, page: Page) -> None:
    """No CDN: each page loads only from the console's own origin (its script and stylesheet
    included); hovering a status shows its phase's since-time in the browser's time zone."""
    await console.create("contacts")
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    for path in ("", "workflows/contacts", "workflows/contacts/edit", "new?type=EGRESS", "new?type=OPT_IN_OUT"):
        await page.goto(console.url + path)
        await page.wait_for_load_state("networkidle")
    foreign = [u for u in requested if not u.startswith(console.url)]
    assert not foreign, foreign
    assert any("/static/console.js" in u for u in requested) and any("/static/console.css" in u for u in requested)

    await page.goto(console.url)
    status = page.locator('#wf-contacts [data-field="phase"]')
    since = (await console.get("contacts")).status.phase_time.ToDatetime(tzinfo=UTC)
    shown = await page.evaluate("iso => new Date(iso).toLocaleString()", since.isoformat())
    await expect(status).to_have_attribute("title", f"STOPPED since {shown}")


STATUS_STYLE = """(phases) => {
  const shown = document.querySelector('#wf-contacts [data-field="phase"]');
  return phases.map((phase) => {
    // The badge as the page draws a row in that phase (console.js: className and text by phase).
    const badge = shown.cloneNode(false);
    badge.className = shown.className.replace(/status-[a-z]+/, 'status-' + phase.toLowerCase());
    badge.textContent = phase;
    shown.parentNode.appendChild(badge);
    const style = getComputedStyle(badge);
    const out = {phase, text: badge.innerText, color: style.color, background: style.backgroundColor,
                 mark: getComputedStyle(badge, '::before').content};
    badge.remove();
    return out;
  });
}"""


def _luminance(css: str) -> float:
    """WCAG 2 relative luminance of a computed `rgb(r, g, b)` colour."""
    channels = [int(c) / 255 for c in css[css.index("(") + 1:css.index(")")].split(",")[:3]]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG 2 contrast ratio of two computed colours (1 to 21)."""
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


async def test_each_status_has_its_own_accessible_colour_and_text(console: Console, page: Page) -> None:
    """Every phase's badge, with the console's own stylesheet: its text is the phase, its colours
    pass WCAG AA (4.5:1), and no two phases share a background colour or a mark, so a phase is
    never told by colour alone nor confused with another."""
    await console.create("contacts")
    await page.goto(console.url)
    phases = [name.removeprefix("PHASE_") for name in (v.name for v in pb.Phase.DESCRIPTOR.values)
              if name != "PHASE_UNSPECIFIED"]
    styles = await page.evaluate(STATUS_STYLE, phases)
    for s in styles:
        assert s["text"].endswith(s["phase"]), s
        assert contrast(s["color"], s["background"]) >= 4.5, s
    assert len({s["background"] for s in styles}) == len(phases), styles
    assert len({s["mark"] for s in styles}) == len(phases) and "none" not in {s["mark"] for s in styles}, styles
