"""An opt-in/out sync against the in-process sandbox: spec, profiles, flips, write counts.

Every check reads the sandbox (its rows, its request log), never the sync's own objects."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from syncplane.contract.report import WorkerReport
from syncplane.credentials import ConnectionSecret
from syncplane.optinout import OptInOutSync, build_optinout
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.service.verify import SqliteWorkerStateAccess
from syncplane.state.factory import embedded_stores
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.verify.compare import Difference
from syncplane.verify.run import verify
from syncplane_sandbox import MARKETING_USER, SANDBOX_CLIENT_ID, Sandbox
from syncplane_sandbox.quickstart import write_sandbox_secrets
from tests.factories import spec as default_spec

PAIRS = (("blackListEmail", "donotbulkemail"), ("blackList", "donotemail"))
DIRECTIONS = {"DISABLED": pb.OPT_IN_OUT_DIRECTION_DISABLED,
              "CRM_TO_MARKETING": pb.OPT_IN_OUT_DIRECTION_CRM_TO_MARKETING,
              "MARKETING_TO_CRM": pb.OPT_IN_OUT_DIRECTION_MARKETING_TO_CRM,
              "BIDIRECTIONAL": pb.OPT_IN_OUT_DIRECTION_BIDIRECTIONAL}


def optinout_spec(sb: Sandbox, direction: str, batch_size: int = 500) -> pb.WorkflowSpec:
    s = default_spec("opt_in_out")
    s.opt_in_out.direction = DIRECTIONS[direction]
    s.batch_size = batch_size
    crm = pb.Connection(kind=pb.CONNECTOR_KIND_DYNAMICS365, endpoint=sb.d365_url,
                        credentials=pb.SecretReference(name="d365-sandbox"))
    acs = pb.Connection(kind=pb.CONNECTOR_KIND_CAMPAIGN_STANDARD, endpoint=sb.acs_url,
                        credentials=pb.SecretReference(name="acs-sandbox"))
    # As validation wants it: the source is Campaign in MARKETING_TO_CRM mode.
    src, dst = (acs, crm) if direction == "MARKETING_TO_CRM" else (crm, acs)
    s.source.CopyFrom(src)
    s.destination.CopyFrom(dst)
    return s


async def start_worker(stub: svc_grpc.WorkflowServiceStub, data_dir: Path, sb: Sandbox, direction: str,
                       name: str = "optio") -> list[str]:
    """A workflow through the control plane (its worker a real process), polling every second,
    over profiles the integration created for every contact; returns the contacts' keys, sorted."""
    write_sandbox_secrets(sb, data_dir / "secrets")
    keys = sorted(sb.d365.table("contacts").rows)
    create_profiles(sb, keys)
    spec = optinout_spec(sb, direction)
    spec.poll_interval.seconds = 1
    await stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id=name, workflow=pb.Workflow(spec=spec)))
    await stub.StartWorkflow(svc.StartWorkflowRequest(name=f"workflows/{name}"))
    return keys


def secrets(sb: Sandbox) -> dict[str, ConnectionSecret]:
    """The secrets the specs reference: the sandbox's own, declaring the origins their tokens are for."""
    return {name: ConnectionSecret.parse(name, f"secret {name}", data) for name, data in sb.secrets().items()}


class Harness:
    """One workflow's sync, rebuildable over the same state file (a worker restart)."""

    def __init__(self, sb: Sandbox, tmp: Path, direction: str, name: str = "opt-in-out") -> None:
        self.sb, self.tmp, self.direction, self.name = sb, tmp, direction, name
        self.state = SqliteWorkerState(tmp / "worker.db")
        self.report = WorkerReport(name, 0, 1)
        self.sync: OptInOutSync = build_optinout(name, optinout_spec(sb, direction), secrets(sb),
                                                 embedded_stores(self.state), self.report)

    async def restart(self, direction: str | None = None) -> None:
        """A worker restart over the same state file (optionally after a mode change)."""
        self.direction = direction or self.direction
        await self.sync.aclose()
        self.state.close()
        self.state = SqliteWorkerState(self.tmp / "worker.db")
        self.sync = build_optinout(self.name, optinout_spec(self.sb, self.direction), secrets(self.sb),
                                   embedded_stores(self.state), self.report)

    async def aclose(self) -> None:
        await self.sync.aclose()
        self.state.close()

    async def verify(self) -> Difference:
        """`syncplane verify` of this workflow (its spec, its state file), as the API server runs it."""
        report = await verify(self.name, optinout_spec(self.sb, self.direction), secrets(self.sb),
                              SqliteWorkerStateAccess(self.tmp / "worker.db"), running=False)
        return report.total()

    async def converge(self, max_passes: int = 6) -> int:
        """Run passes until one writes nothing; returns the passes run. Bounded: no ping-pong."""
        for n in range(1, max_passes + 1):
            await self.sync.run_once(asyncio.Event())
            if self.sync.last.write_requests == 0:
                return n
        raise AssertionError(f"still writing after {max_passes} passes: {self.sync.last}")


def create_profiles(sb: Sandbox, keys: list[str], foreign: frozenset[str] | set[str] = frozenset()) -> None:
    """Profiles as ingress creates them (opt-outs false), except ``foreign`` ones, created by
    a marketer (who typed the CRM id in)."""
    profiles = sb.acs.profiles
    for k in keys:
        profiles.create(profiles.validate({"externalId": k, "email": f"{k[:8]}@example.com"}),
                        created_by=MARKETING_USER if k in foreign else SANDBOX_CLIENT_ID)


def crm_row(sb: Sandbox, key: str) -> dict[str, Any]:
    row = sb.d365.table("contacts").get(key)
    assert row is not None
    return row


def profile(sb: Sandbox, key: str) -> dict[str, Any]:
    row = sb.acs.profiles.by_key(key)
    assert row is not None
    return row


def set_crm(sb: Sandbox, key: str, **values: bool) -> None:
    sb.d365.table("contacts").upsert(key, **values)


def set_campaign(sb: Sandbox, key: str, **values: bool) -> None:
    pk = sb.acs.profiles.find(key)
    assert pk is not None
    sb.acs.profiles.set(pk, **values)


def disagreements(sb: Sandbox, keys: list[str]) -> list[tuple[str, str, Any, Any]]:
    out = []
    for k in keys:
        row, prof = crm_row(sb, k), profile(sb, k)
        for acs_f, crm_f in PAIRS:
            if bool(row.get(crm_f)) != bool(prof.get(acs_f)):
                out.append((k, acs_f, row.get(crm_f), prof.get(acs_f)))
    return out


def write_count(sb: Sandbox, since_acs: int = 0, since_parts: int = 0) -> int:
    """Writes the sandbox saw: PATCH/POST to Campaign profiles, PATCHes to Dynamics contacts
    (direct, or as parts of a $batch)."""
    acs = [r for r in sb.requests.records(since_acs, server="acs")
           if r.method in ("PATCH", "POST") and "/profileAndServices/profile" in r.path]
    direct = [r for r in sb.requests.records(since_acs, server="d365") if r.method == "PATCH" and "contacts(" in r.path]
    parts = [r for r in sb.batch_parts.records(since_parts) if r.method == "PATCH" and "contacts(" in r.path]
    return len(acs) + len(direct) + len(parts)


def marks(sb: Sandbox) -> tuple[int, int]:
    """Positions in the request log and the batch-part log, for :func:`write_count`."""
    last = sb.requests.records()
    parts = sb.batch_parts.records()
    return (last[-1].seq if last else 0), (parts[-1].seq if parts else 0)


def flip(sb: Sandbox, rng: random.Random, keys: list[str]) -> tuple[str, str, str]:
    """One real change: a random pair of a random key flipped on a random side."""
    key = rng.choice(keys)
    acs_f, crm_f = rng.choice(PAIRS)
    if rng.random() < 0.5:
        set_crm(sb, key, **{crm_f: not bool(crm_row(sb, key).get(crm_f))})
        return key, "crm", crm_f
    set_campaign(sb, key, **{acs_f: not bool(profile(sb, key).get(acs_f))})
    return key, "campaign", acs_f
