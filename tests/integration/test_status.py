"""A status that never hides a stall, on the embedded backend: real worker processes, the
sandbox over real HTTP, the status read back through the API and `syncplane list`.

- a source answering 503 to everything, or refusing connections: RUNNING, Degraded with
  SOURCE_UNAVAILABLE, the last error and when it began; records/s falls to 0; it clears
  when data flows again;
- a stall with a backlog (the destination holds every write, unanswered): Degraded STALLED;
- a mapped field that does not exist: the start fails (STARTING → ERROR FIELD_NOT_FOUND);
- a missing Secret: ERROR, restarted automatically with backoff (attempts, next time shown);
  creating the Secret recovers the workflow without a restart;
- counters add up on what the real workers report, per workflow type.

The Kubernetes backend runs the same scenarios in tests/k8s/test_status.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from syncplane.lifecycle import Policy
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.runtime.supervisor import SupervisorConfig
from syncplane_sandbox import Sandbox, SeedSpec
from syncplane_sandbox.quickstart import write_sandbox_secrets
from tests.backends import eventually
from tests.embedded_plane import ControlPlane
from tests.integration.cli_env import cli
from tests.integration.conftest import watch_until
from tests.integration.ingress_env import ingress_spec, prepare
from tests.integration.optinout_env import optinout_spec
from tests.integration.sandbox_fixtures import running_sandbox
from tests.integration.test_egress import egress_spec, expected_activities
from tests.integration.test_ingress import start
from tests.source_faults import SOURCE_FAULTS, break_source, heal_source

# Low thresholds so that the scenarios take seconds; the defaults are 60 s and 5 s..5 min.
POLICY = Policy(degraded_after=2.0, restart_backoff=0.5, restart_backoff_cap=2.0)
CONFIG = SupervisorConfig(tick=0.1, stop_timeout=30.0, backoff_base=0.05, backoff_cap=0.5, crash_limit=50,
                          crash_window=600.0, orphan_timeout=30.0, poll_timeout=1.0, policy=POLICY)

pytestmark = pytest.mark.supervisor(CONFIG)


@pytest.fixture
async def sb() -> AsyncIterator[Sandbox]:
    async with running_sandbox(SeedSpec(contacts=300, events=500, seed=11)) as sandbox:
        yield sandbox


async def status(plane: ControlPlane, name: str) -> pb.WorkflowStatus:
    return (await plane.stub.GetWorkflow(svc.GetWorkflowRequest(name=f"workflows/{name}"))).status


def degraded(s: pb.WorkflowStatus) -> pb.Condition:
    return next(c for c in s.conditions if c.type == "Degraded")


def adds_up(s: pb.WorkflowStatus) -> bool:
    c = s.counters
    return c.read == c.written + c.deleted + c.filtered + c.dead_lettered + c.held + c.failed + s.backlog


async def until(plane: ControlPlane, name: str, check, what: str, timeout: float = 90.0) -> pb.WorkflowStatus:
    last: list[pb.WorkflowStatus] = []

    async def ok() -> bool:
        last[:] = [await status(plane, name)]
        return bool(check(last[0]))

    await eventually(ok, lambda: f"{what}; status: {last[0] if last else '-'}", timeout)
    return last[0]


async def list_row(plane: ControlPlane, name: str) -> dict[str, str]:
    res = await cli(plane.port, "list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = lines[0].split()
    row = next(line.split() for line in lines[1:] if line.split()[0] == name)
    return dict(zip(header, row, strict=False))


async def running_with_everything_written(plane: ControlPlane, sb: Sandbox, name: str) -> None:
    prepare(sb, plane.data_dir)
    await start(plane, name, ingress_spec(sb))
    await until(plane, name, lambda s: s.phase == pb.PHASE_RUNNING and s.counters.written == 300
                and s.backlog == 0, "the first load")


@pytest.mark.parametrize("fault", SOURCE_FAULTS)
async def test_a_source_that_stops_answering_is_degraded_while_running(plane: ControlPlane, sb: Sandbox,
                                                                       fault: str) -> None:
    await running_with_everything_written(plane, sb, "src")
    await break_source(sb, fault)  # everything, token endpoint included; or connections refused
    s = await until(plane, "src", lambda s: degraded(s).status == "True", "Degraded")
    assert s.phase == pb.PHASE_RUNNING  # retrying goes on
    assert degraded(s).reason == s.degradation.reason == "SOURCE_UNAVAILABLE"
    assert ("HTTP 503" if fault == "503" else "ClientConnectorError") in s.degradation.message
    assert s.degradation.HasField("time")
    assert (await list_row(plane, "src"))["DEGRADED"] == "SOURCE_UNAVAILABLE"
    described = (await cli(plane.port, "describe", "src")).stdout
    assert "Degraded:     SOURCE_UNAVAILABLE since" in described
    await until(plane, "src", lambda s: s.counters.records_per_second == 0.0, "records/s to fall to 0")

    await heal_source(sb, fault)
    s = await until(plane, "src", lambda s: degraded(s).status == "False" and s.counters.written > 300,
                    "Degraded to clear once data flows")
    assert not s.HasField("degradation")
    assert (await list_row(plane, "src"))["DEGRADED"] == "-"
    assert adds_up(s)


async def test_a_backlog_with_nothing_written_is_stalled(plane: ControlPlane, sb: Sandbox) -> None:
    await running_with_everything_written(plane, sb, "stall")
    # The destination holds every write (the sandbox's hold switch) until the stall has been seen:
    # nothing is written for as long as the test needs, whatever the machine's speed.
    with sb.faults.acs.holding():
        contacts = sb.d365.table("contacts")
        for rid in list(contacts.rows)[:50]:
            contacts.upsert(rid, lastname="Waiting")
        s = await until(plane, "stall", lambda s: degraded(s).status == "True", "STALLED")
        assert s.phase == pb.PHASE_RUNNING and s.backlog > 0
        assert degraded(s).reason == s.degradation.reason == "STALLED"
        assert (await list_row(plane, "stall"))["DEGRADED"] == "STALLED"
    s = await until(plane, "stall", lambda s: degraded(s).status == "False" and s.backlog == 0
                    and s.counters.written >= 350, "the stall to clear", timeout=120)
    assert adds_up(s)


async def test_a_mapped_field_that_does_not_exist_fails_the_start(plane: ControlPlane, sb: Sandbox) -> None:
    prepare(sb, plane.data_dir)
    spec = ingress_spec(sb)
    spec.ingress.entities[0].fields.add(source="new_nosuchfield", destination="middleName")
    rev = plane.store.revision()
    await start(plane, "nofield", spec)
    wf, phases = await watch_until(plane.stub, "nofield", lambda w: w.status.phase == pb.PHASE_ERROR, rev, 60)
    assert pb.PHASE_RUNNING not in phases, [pb.Phase.Name(p) for p in phases]
    assert phases[-2:] == [pb.PHASE_STARTING, pb.PHASE_ERROR]
    error = wf.status.last_error
    assert error.reason == "FIELD_NOT_FOUND"
    assert "'contact'" in error.message and "'new_nosuchfield'" in error.message
    assert "spec.ingress.entities[0].fields[" in error.message
    assert not wf.status.HasField("auto_restart")  # the spec's fault: it waits for the user
    assert sb.acs.profiles.rows == {} or len(sb.acs.profiles.rows) == 0


async def test_a_secret_created_afterwards_recovers_without_a_restart(plane: ControlPlane, sb: Sandbox) -> None:
    spec = ingress_spec(sb)
    spec.source.credentials.name = "d365-later"
    spec.destination.credentials.name = "acs-later"
    await start(plane, "later", spec)
    s = await until(plane, "later", lambda s: s.phase == pb.PHASE_ERROR and s.auto_restart.count >= 2
                    and s.auto_restart.HasField("next_restart_time"), "automatic restarts while the Secret is missing")
    assert s.last_error.reason == "BAD_CREDENTIALS" and "d365-later" in s.last_error.message
    assert "automatic restart" in degraded(s).message

    async def marked() -> bool:  # (between two attempts the row is STARTING, not marked)
        row = await list_row(plane, "later")
        return row["PHASE"] == "ERROR" and row["DEGRADED"] == "BAD_CREDENTIALS"

    await eventually(marked, "the list row marked BAD_CREDENTIALS", 60)
    described = (await cli(plane.port, "describe", "later")).stdout
    assert "Restarts:     " in described and " made" in described  # (the next time while in ERROR)
    generation = (await plane.stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/later"))).generation

    write_sandbox_secrets(sb, plane.data_dir / "secrets")  # the default names ...
    secrets = plane.data_dir / "secrets"
    (secrets / "d365-sandbox.json").rename(secrets / "d365-later.json")  # ... under the names the spec uses
    (secrets / "acs-sandbox.json").rename(secrets / "acs-later.json")
    s = await until(plane, "later", lambda s: s.phase == pb.PHASE_RUNNING and s.counters.written == 300,
                    "recovery once the Secret exists")
    wf = await plane.stub.GetWorkflow(svc.GetWorkflowRequest(name="workflows/later"))
    assert wf.generation == generation and wf.spec.restart_nonce == 0  # nobody restarted it
    assert not s.HasField("auto_restart") and not s.last_error.reason


async def test_counters_add_up_for_every_workflow_type(plane: ControlPlane, sb: Sandbox) -> None:
    prepare(sb, plane.data_dir)
    await start(plane, "in", ingress_spec(sb))
    await start(plane, "eg", egress_spec(sb))
    wanted = len(expected_activities(sb, {"send", "open", "click", "bounce"}))
    s = await until(plane, "eg", lambda s: s.counters.read == 500 and s.backlog == 0
                    and s.counters.written + s.counters.held == wanted, "the 500 events")
    # The events not written are the ones the spec does not want (soft bounces): filtered, and shown.
    assert s.counters.filtered == 500 - wanted > 0
    assert adds_up(s)
    described = (await cli(plane.port, "describe", "eg")).stdout
    assert f"filtered {500 - wanted}" in described
    s = await until(plane, "in", lambda s: s.counters.written == 300 and s.backlog == 0, "the 300 contacts")
    assert adds_up(s)
    await start(plane, "oio", optinout_spec(sb, "BIDIRECTIONAL"))
    s = await until(plane, "oio", lambda s: s.phase == pb.PHASE_RUNNING and s.counters.read >= 300
                    and s.backlog == 0, "the opt-in/out pass")
    assert adds_up(s)
    assert s.counters.filtered > 0  # profiles and contacts that already agree need no write
