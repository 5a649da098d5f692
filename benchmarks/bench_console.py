"""The web console in Debian's chromium against `syncplane up` (three workflows, workers started
with credentials for an address nothing listens on: they run and retry, which is enough to move
phases): page weight, time to first render, and watch-to-screen latency.

- Page weight: the bytes of the Workflows page and its assets (HTML, CSS, JS), uncompressed.
- First render: the browser's first-contentful-paint after navigation, median of 10 loads.
- Watch-to-screen: for 20 phase changes (start/stop cycles), the browser's clock when the row's
  status changed minus the store's time of that phase (status.phase_time, written by the
  supervisor); same machine, same clock. Baseline: a gRPC WatchWorkflows client's receipt time
  for the same changes, so the ratio is what the event stream and the page add."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from playwright.async_api import async_playwright

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.embedded_plane import worker_processes
from tests.factories import spec
from tests.integration.conftest import ServerProcess, wait_until

CHANGES = 20
LOADS = 10

RECORD = """(id) => {
  window.__seen = [];
  const status = document.querySelector('#wf-' + id + ' [data-field="phase"]');
  let last = status.textContent;
  new MutationObserver(() => {
    if (status.textContent === last) return;   // a repaint of the same phase (backlog, counters)
    last = status.textContent;
    window.__seen.push({phase: last, since: status.dataset.since, at: Date.now()});
  })
    .observe(status, {childList: true, characterData: true, subtree: true});
}"""


async def _grpc_receipts(stub: Any, name: str, out: list[float], stop: asyncio.Event) -> None:
    call = stub.WatchWorkflows(svc.WatchWorkflowsRequest(name=name))
    last = None
    try:
        async for event in call:
            phase = event.workflow.status.phase
            if last is not None and phase != last:
                out.append(time.time() - event.workflow.status.phase_time.ToNanoseconds() / 1e9)
            last = phase
            if stop.is_set():
                return
    finally:
        call.cancel()


async def run() -> dict[str, Any]:
    """The figures of the module docstring: ``page_weight_kb`` (KiB, uncompressed), ``page_requests``,
    ``first_contentful_paint_ms`` (median, max), ``watch_to_screen_s`` and ``baseline_grpc_watch_s``
    (seconds: median, max, changes), ``ratio_screen_vs_grpc_watch`` (medians)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        port_file = data / "console.port"
        server = ServerProcess(data, "--console-port-file", str(port_file))
        try:
            await server.ready()
            await wait_until(port_file.exists, what="console port")
            url = f"http://127.0.0.1:{int(port_file.read_text())}/"
            channel, stub = server.stub()
            for name in ("contacts", "events", "optinout"):
                kind = {"contacts": "ingress", "events": "egress", "optinout": "opt_in_out"}[name]
                await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id=name,
                                                                    workflow=pb.Workflow(spec=spec(kind))))
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = await browser.new_page(viewport={"width": 1280, "height": 800})
                sizes: dict[str, int] = {}

                async def sized(response: Any) -> None:
                    if "/events" not in response.url:
                        sizes[response.url] = len(await response.body())

                page.on("response", sized)
                paints = []
                for _ in range(LOADS):
                    await page.goto(url, wait_until="load")
                    fcp = await page.wait_for_function(
                        "performance.getEntriesByName('first-contentful-paint').map(e => e.startTime)[0]")
                    paints.append(float(await fcp.json_value()))
                weight = sum(sizes.values())

                await page.evaluate(RECORD, "contacts")
                receipts: list[float] = []
                stop = asyncio.Event()
                follower = asyncio.create_task(_grpc_receipts(stub, "workflows/contacts", receipts, stop))
                seen: list[dict[str, Any]] = []
                while len(seen) < CHANGES:
                    wf = await stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/contacts"))
                    if wf.status.phase == pb.PHASE_RUNNING:
                        await stub.StopWorkflow(svc.StopWorkflowRequest(name=wf.name))
                        target = pb.PHASE_STOPPED
                    else:
                        await stub.StartWorkflow(svc.StartWorkflowRequest(name=wf.name))
                        target = pb.PHASE_RUNNING

                    await page.wait_for_function(
                        "(p) => document.querySelector('#wf-contacts [data-field=\"phase\"]').textContent === p",
                        arg=pb.Phase.Name(target).removeprefix("PHASE_"), timeout=120_000)
                    seen = await page.evaluate("window.__seen")
                stop.set()
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                    await follower
                await browser.close()
            await channel.close()
        finally:
            await asyncio.to_thread(server.stop)
            for proc in worker_processes(data):
                proc.kill()
    latencies = [(s["at"] - _ms(s["since"])) / 1000 for s in seen[:CHANGES]]
    screen, watch = statistics.median(latencies), statistics.median(receipts[:CHANGES])
    result = {
        "page_weight_kb": round(weight / 1024, 1), "page_requests": len(sizes),
        "first_contentful_paint_ms": {"median": round(statistics.median(paints), 1), "max": round(max(paints), 1)},
        "watch_to_screen_s": {"median": round(screen, 4), "max": round(max(latencies), 4), "changes": len(latencies)},
        "baseline_grpc_watch_s": {"median": round(watch, 4), "changes": len(receipts[:CHANGES])},
        "ratio_screen_vs_grpc_watch": round(screen / watch, 2) if watch > 0 else None,
    }
    print("console:", result)
    return result


def _ms(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


if __name__ == "__main__":
    asyncio.run(run())
