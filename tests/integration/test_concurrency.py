"""Adaptive concurrency (AIMD) against the sandbox: a worker's requests in flight fall under
injected 429s, grow back once they stop, and never exceed the spec's maxConcurrency, counted by
the sandbox itself (its record of the requests it served at once), not by the worker."""

from __future__ import annotations

import aiohttp
import pytest

from syncplane.cli import describe_text
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.embedded_plane import ControlPlane
from tests.integration.ingress_env import ingress_spec, prepare, status_until

MAX = 8


@pytest.mark.timeout(600)
async def test_concurrency_backs_off_under_429s_grows_back_and_never_exceeds_the_maximum(
        plane: ControlPlane) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=20_000, seed=4))
    try:
        prepare(sb, plane.data_dir)
        sb.faults.set(latency_ms=20)  # like a cloud API: concurrency pays
        spec = ingress_spec(sb, batch_size=500, poll_seconds=60)
        spec.destination.max_concurrency = MAX
        spec.source.max_concurrency = 2
        spec.desired_state = pb.DESIRED_STATE_RUNNING
        await plane.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow=pb.Workflow(spec=spec),
                                                                  workflow_id="aimd"))

        def destination(s: pb.WorkflowStatus) -> tuple[int, int]:
            return s.destination_concurrency.limit, s.destination_concurrency.max

        status = await status_until(plane.stub, "aimd", lambda s: s.counters.written >= 200, 120)
        assert destination(status) == (MAX, MAX), "a clean start keeps the configured maximum"

        sb.faults.acs.set(latency_ms=20, rate_429=0.3, retry_after_s=0)
        status = await status_until(plane.stub, "aimd", lambda s: 0 < destination(s)[0] <= MAX // 2, 120)
        assert status.destination_concurrency.max == MAX

        sb.faults.acs.set(latency_ms=20, rate_429=0.0)
        written = status.counters.written
        await status_until(plane.stub, "aimd", lambda s: destination(s) == (MAX, MAX) and s.counters.written > written,
                           120)
        wf = await plane.stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/aimd"))
        now = wf.status.destination_concurrency.limit
        assert f"source {wf.status.source_concurrency.limit}/2, destination {now}/{MAX} requests in flight" \
            in describe_text(wf)

        assert sum(1 for r in sb.requests.records(server="acs") if r.status == 429) > 0, "429s were injected"
        # The sandbox's own count of the API requests it served at once (token requests aside).
        assert 0 < sb.acs_in_flight.peak <= MAX, sb.acs_in_flight.to_json()
        async with aiohttp.ClientSession() as http, http.get(f"{sb.acs_origin}/_sandbox/concurrency") as r:
            assert (await r.json())["peak"] == sb.acs_in_flight.peak
        assert 0 < sb.d365_in_flight.peak <= 2, sb.d365_in_flight.to_json()
        assert sb.requests.retry_after_violations(in_flight_grace=0.5) == []
    finally:
        await sb.stop()
