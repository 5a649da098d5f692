"""The workflow page in Chromium against `syncplane up` and the sandbox: its status beyond the
row (counters, workers, conditions, last error, table sizes) follows the event stream with no
reload; the dead letters page through and a selected one is retried; a replay is refused, with
the 2,000,000-record guard explained, once the table's last full read counted that many rows;
the chart draws backlog and records/s from the stream and the server's history; the last verify
shows its counts; the Degraded reason appears and clears live."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Locator, Page, expect

from syncplane.console.app import DEAD_LETTER_PAGE
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.validation.rules import MAX_REPLAY_ROWS
from syncplane.worker.pipeline import Checkpoint
from tests.backends import eventually
from tests.e2e.conftest import Console, screenshot, start_console, writes_held_until

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


async def test_dead_letters_page_through(console: Console, page: Page) -> None:
    count = DEAD_LETTER_PAGE + 5
    bad = sorted(console.sandbox.d365.table("contacts").rows)[:count]
    console.sandbox.acs.poison_keys("profile", *bad)
    await console.create("contacts")
    await console.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/contacts"))

    async def dead_lettered() -> bool:
        return (await console.get("contacts")).status.dead_letters == count

    await eventually(dead_lettered, f"{count} dead letters", 240)
    await page.goto(console.url + "workflows/contacts")
    letters = page.locator("#dl-rows tr")
    await expect(page.locator("#dl-total")).to_have_text(f"{count} in all")
    await expect(letters).to_have_count(DEAD_LETTER_PAGE)
    first = set(await page.locator('#dl-rows input[name="keys"]').evaluate_all("bs => bs.map(b => b.value)"))
    more = page.get_by_role("button", name="Next page")
    await expect(more).to_be_visible()
    await more.click()
    await expect(letters).to_have_count(count - DEAD_LETTER_PAGE)
    await expect(more).to_be_hidden()
    second = set(await page.locator('#dl-rows input[name="keys"]').evaluate_all("bs => bs.map(b => b.value)"))
    assert not first & second and first | second == set(bad), (first, second)

    # The destination accepts them again: "Retry selected" sends only the ticked one.
    console.sandbox.acs.clear_poison()
    picked = sorted(second)[0]
    await page.get_by_role("checkbox", name=f"Select {picked}").check()
    await page.get_by_role("button", name="Retry selected").click()
    await expect(page.locator("#message")).to_contain_text("1 marked for retry")
    await expect(page.locator('[data-field="deadLetters"]')).to_have_text(str(count - 1))
    await expect(page.locator("#dl-total")).to_have_text(f"{count - 1} in all")
    await expect(page.locator("#dl-rows")).not_to_contain_text(picked)
    await screenshot(page, "4b-dead-letters-second-page")


def record_full_read(state_db: Path, workflow: str, table: str, rows: int) -> None:
    """What a last full read of `rows` rows leaves in the workers' checkpoint (seeding 2,000,000
    contacts into the sandbox would take the test minutes): the cursor stays, the count changes."""
    state = SqliteWorkerState(state_db)
    try:
        cp = Checkpoint.loads(state.load(workflow, table))
        assert cp.rows >= 0 and cp.cursor, cp
        cp.rows = rows
        state.commit(workflow, table, cp.dumps())
    finally:
        state.close()


async def test_a_replay_is_accepted_then_refused_at_the_guard_with_its_reason(
        console: Console, page: Page, tmp_path: Path) -> None:
    await console.create("contacts")
    await page.goto(console.url + "workflows/contacts")
    replay = page.get_by_role("button", name="Replay at next start")
    await page.get_by_label("Replay a table").select_option("contact")
    await replay.click()
    message = page.locator("#message")
    await expect(message).to_contain_text("table contact will be read again at the next start")
    assert (await console.get("contacts")).spec.ingress.replay.source_table == "contact"

    # The start runs the replay's full read, which counts the table.
    await page.get_by_role("button", name="Start contacts").click()
    await console.sandbox_drained("contacts")
    contacts = len(console.sandbox.d365.table("contacts").rows)
    tables = page.locator("#table-rows tr").filter(has=page.get_by_role("rowheader", name="contact", exact=True))
    await expect(tables.locator("td")).to_have_text(figure(contacts))
    await page.get_by_role("button", name="Stop contacts").click()
    await expect(page.locator('[data-field="phase"]')).to_have_text("STOPPED")

    record_full_read(tmp_path / "worker-state.db", "contacts", "contact", MAX_REPLAY_ROWS)
    await page.get_by_role("button", name="Start contacts").click()
    await expect(tables.locator("td")).to_have_text(figure(MAX_REPLAY_ROWS))
    await replay.click()
    await expect(message).to_contain_text("replay refused: table 'contact' holds")
    await expect(message).to_contain_text("the limit is 2,000,000")
    await expect(message).to_have_class(re.compile(r"\berror\b"))
    assert (await console.get("contacts")).status.phase == pb.PHASE_RUNNING
    await screenshot(page, "8-replay-refused")


# The chart's y (SVG units, growing downward) of a value v is 155 - v / peak * 145 (console.js `chart`): the zero
# line is at ZERO_Y, the peak at PEAK_Y.
ZERO_Y, PEAK_Y = 155.0, 10.0
# The chart's polylines as [x, y] pairs.
CHART_POINTS = """cls => Array.from(document.querySelector('#chart polyline.' + cls).points)
    .map(p => [p.x, p.y])"""


async def test_the_chart_draws_backlog_and_records_per_second_from_the_stream(console: Console, page: Page) -> None:
    await console.create("contacts")
    await page.goto(console.url + "workflows/contacts")
    await page.evaluate(NOT_RELOADED)
    # Campaign's writes held until the backlog line has left the zero line, whatever the speed.
    async with writes_held_until(page, console.sandbox.faults.acs,
                                 f"() => ({CHART_POINTS})('line-backlog').some(p => p[1] < {ZERO_Y:g})"):
        await page.get_by_role("button", name="Start contacts").click()
    # Polled in the page until the stream has drawn both lines off the zero line (rAF-independent).
    await page.wait_for_function(f"""() => {{
        const pts = {CHART_POINTS};
        return ["line-backlog", "line-rps"].every(c => pts(c).length >= 2 && pts(c).some(p => p[1] < {ZERO_Y:g}));
    }}""")
    await console.sandbox_drained("contacts")
    await expect(page.locator('[data-field="backlog"]')).to_have_text("0")
    backlog = await page.evaluate(f"({CHART_POINTS})('line-backlog')")
    # The backlog rose (its peak at the top) and fell back to 0 since: the last point is on the zero line.
    assert min(y for _, y in backlog) == PEAK_Y and backlog[-1][1] == ZERO_Y, backlog
    assert all(0 <= x <= 600 for x, _ in backlog), backlog
    assert [x for x, _ in backlog] == sorted(x for x, _ in backlog), "points in time order"
    await expect(page.locator("#chart-range")).to_have_text(re.compile(r"^peak backlog [1-9][\d,.\s]*, peak "))
    assert await page.evaluate("!!window.__notReloaded"), "the page reloaded"

    # A fresh page draws the server's recent history at once (its ring keeps a sample at least every 10 s).
    await page.reload()
    await page.wait_for_function(f"() => ({CHART_POINTS})('line-backlog').length >= 1")
    await screenshot(page, "9-chart")


async def test_the_verify_result_shows_its_counts(console: Console, page: Page) -> None:
    await console.create("contacts")
    await page.goto(console.url + "workflows/contacts")
    await expect(page.locator("#verify")).to_have_text("No verify result yet.")
    await page.get_by_role("button", name="Start contacts").click()
    await console.sandbox_drained("contacts")
    await page.get_by_role("button", name="Stop contacts").click()
    await expect(page.locator('[data-field="phase"]')).to_have_text("STOPPED")

    # Two profiles deleted in Campaign behind the workflow's back: verify finds them missing.
    gone = sorted(console.sandbox.acs.profiles.rows)[:2]
    async with httpx.AsyncClient(base_url=console.sandbox.acs_origin) as http:
        for pk in gone:
            assert (await http.delete(f"/_sandbox/resources/profile/records/{pk}")).status_code == 204
    resp = await console.stub.VerifyWorkflow(svc.VerifyWorkflowRequest(name="workflows/contacts"))
    c = resp.result.counts
    contacts = len(console.sandbox.d365.table("contacts").rows)
    assert (c.compared, c.missing, c.extra, c.different) == (contacts, 2, 0, 0), resp

    await page.reload()   # the page shows the verify result as it loaded (its note says so)
    verify = page.locator("#verify")
    await expect(verify).to_contain_text(f"{contacts} records compared, 2 missing, 0 extra, 0 different")
    await expect(verify).to_contain_text("(0 of them in flight, expected to converge); 0 foreign records left out.")
    await expect(verify.locator("time")).to_have_text(re.compile(r"\d"))   # in the browser's zone, not ISO
    await expect(verify.locator("time")).not_to_have_text(re.compile("T.*Z$"))
    await screenshot(page, "10-verify")


@pytest.fixture
async def degrading_console(tmp_path: Path) -> AsyncIterator[Console]:
    """A console whose workflows turn Degraded after 2 s of trouble (60 s by default)."""
    async for c in start_console(tmp_path, "--degraded-after", "2"):
        yield c


async def test_the_degraded_reason_shows_and_clears_live(degrading_console: Console, page: Page) -> None:
    console = degrading_console
    await console.create("contacts")
    await page.goto(console.url + "workflows/contacts")
    await page.evaluate(NOT_RELOADED)
    reason = page.locator('[data-field="degraded"]')
    await expect(reason).to_be_hidden()
    await page.get_by_role("button", name="Start contacts").click()
    await console.sandbox_drained("contacts")

    console.sandbox.faults.d365.set(rate_503=1.0, include_auth=True)   # the CRM answers 503 to everything
    await expect(reason).to_be_visible()
    await expect(reason).to_contain_text("SOURCE_UNAVAILABLE: ")
    await expect(reason).to_contain_text("HTTP 503")
    await expect(page.locator('[data-field="phase"]')).to_have_text("RUNNING")   # retrying goes on
    await expect(condition_row(page, "Degraded")).to_contain_text("SOURCE_UNAVAILABLE")
    await screenshot(page, "11-degraded")

    # The CRM answers again and a change flows: the reason goes, still without a reload.
    console.sandbox.faults.d365.reset()
    contacts = console.sandbox.d365.table("contacts")
    contacts.upsert(next(iter(contacts.rows)), lastname="Flowing")
    await expect(reason).to_be_hidden()
    await expect(condition_row(page, "Degraded")).to_contain_text("False")
    assert await page.evaluate("!!window.__notReloaded"), "the page reloaded"
