"""An ingress workflow against the sandbox: the spec, the expected destination, and waits.

The expected destination is computed here from the sandbox's source rows with
the documented mapping rules, independently of the worker's transform.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.state.sqlite import SqliteWorkerState
from syncplane_sandbox import Sandbox, SeedSpec
from syncplane_sandbox.quickstart import write_sandbox_secrets
from tests.factories import spec as default_spec
from tests.integration.sandbox_fixtures import running_sandbox

PROFILE = {"contactid": "externalId", "emailaddress1": "email", "firstname": "firstName", "lastname": "lastName"}
LENGTHS = {"email": 128, "firstName": 30, "lastName": 50}
CARD = {"new_loyaltycardid": "crmId", "new_cardnumber": "cardNumber", "new_tier": "tier", "new_points": "points",
        "new_contactid": "profile"}  # a lookup to the contact → a link to its profile


def loyalty_mapping() -> pb.EntityMapping:
    m = pb.EntityMapping(source_table="new_loyaltycard", destination_resource="cusLoyaltyCard",
                         source_key="new_loyaltycardid", destination_key="crmId", apply_deletes=True)
    for src, dst in CARD.items():
        m.fields.add(source=src, destination=dst)
    return m


def ingress_spec(sandbox: Sandbox, *, cards: bool = False, batch_size: int = 500,
                 poll_seconds: int = 1) -> pb.WorkflowSpec:
    s = default_spec("ingress")
    s.source.endpoint = sandbox.d365_url
    s.destination.endpoint = sandbox.acs_url
    s.batch_size = batch_size
    s.poll_interval.seconds = poll_seconds
    if cards:
        s.ingress.entities.append(loyalty_mapping())
    return s


def prepare(sandbox: Sandbox, data_dir: Any) -> None:
    write_sandbox_secrets(sandbox, data_dir / "secrets")


@asynccontextmanager
async def prepared_sandbox(seed: SeedSpec, data_dir: Path) -> AsyncIterator[Sandbox]:
    """A running sandbox seeded with ``seed`` whose client secrets are written to ``data_dir``/secrets
    (where the embedded workers read them); stopped on the way out."""
    async with running_sandbox(seed) as sb:
        prepare(sb, data_dir)
        yield sb


def poison_contacts(sandbox: Sandbox, count: int) -> list[str]:
    """The first ``count`` contact ids (sorted), whose profiles Campaign now rejects (the sandbox's poison
    fault): each such record must end in the dead letters. Returns those ids."""
    keys = sorted(sandbox.d365.table("contacts").rows)[:count]
    sandbox.acs.poison_keys("profile", *keys)
    return keys


def passes(row: dict[str, Any], conditions: list[tuple[str, str]]) -> bool:
    return all(str(row.get(f)) == v for f, v in conditions)


def expected_profiles(sandbox: Sandbox, where: Callable[[dict[str, Any]], bool] = lambda _: True,
                      ) -> dict[str, dict[str, Any]]:
    """externalId → the profile fields the mapping must produce."""
    out: dict[str, dict[str, Any]] = {}
    for row in sandbox.d365.table("contacts").rows.values():
        if not where(row):
            continue
        values = {}
        for src, dst in PROFILE.items():
            v = row.get(src)
            if isinstance(v, str) and dst in LENGTHS:
                v = v[:LENGTHS[dst]]
            values[dst] = v
        out[str(row["contactid"])] = values
    return out


def actual_profiles(sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    rows = sandbox.acs.profiles.rows.values()
    return {str(r["externalId"]): {k: r.get(k) for k in PROFILE.values()} for r in rows if r.get("externalId")}


def profile_key_count(sandbox: Sandbox) -> tuple[int, int]:
    """(rows carrying an externalId, distinct externalIds): equal means no duplicates."""
    keys = [r["externalId"] for r in sandbox.acs.profiles.rows.values() if r.get("externalId")]
    return len(keys), len(set(keys))


def change_during_load(sandbox: Sandbox, rng: random.Random, changed: int, deleted: int, created: int) -> None:
    """Edit the source's contacts while a load reads them: ``changed`` rows get a new last name,
    up to ``deleted`` rows are deleted (sampled with replacement of the changed ones), ``created``
    new rows (random GUID keys) are added. The destination must still end equal to the source."""
    table = sandbox.d365.table("contacts")
    ids = sorted(table.rows)
    for rid in rng.sample(ids, changed):
        table.upsert(rid, lastname="Changed during the load")
    for rid in rng.sample(ids, deleted):
        if rid in table.rows:
            table.delete(rid)
    for i in range(created):
        table.upsert(str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                     emailaddress1=f"new{i}@example.com", lastname="Created during the load")


def expected_cards(sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    """The link to the profile is the PKey of the profile whose externalId is the card's contact."""
    out = {}
    for r in sandbox.d365.table("new_loyaltycards").rows.values():
        card = {dst: r.get(src) for src, dst in CARD.items()}
        card["profile"] = sandbox.acs.profiles.find(r["new_contactid"]) if r.get("new_contactid") else None
        out[str(r["new_loyaltycardid"])] = card
    return out


def profiles_match(sandbox: Sandbox, where: Callable[[dict[str, Any]], bool] | None = None) -> bool:
    """The destination's profiles equal the mapped source; cheap (a count) until it may be so."""
    rows = sandbox.d365.table("contacts").rows.values()
    wanted = len(sandbox.d365.table("contacts").rows) if where is None else sum(1 for r in rows if where(r))
    if len(sandbox.acs.profiles.rows) != wanted:
        return False
    return actual_profiles(sandbox) == expected_profiles(sandbox, where or (lambda _: True))


def cards_match(sandbox: Sandbox) -> bool:
    if len(sandbox.acs.resource("cusLoyaltyCard").rows) != len(sandbox.d365.table("new_loyaltycards").rows):
        return False
    return actual_cards(sandbox) == expected_cards(sandbox)


def actual_cards(sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    rows = sandbox.acs.resource("cusLoyaltyCard").rows.values()
    return {str(r["crmId"]): {k: r.get(k) for k in CARD.values()} for r in rows}


async def converge(check: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    """Wait for the destination to reach a state (the outside world), with a deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.5)  # the sandbox shares this event loop: leave it the time


async def profiles_converge(sandbox: Sandbox, timeout: float, what: str, *,
                            expected: dict[str, dict[str, Any]] | None = None,
                            where: Callable[[dict[str, Any]], bool] | None = None, cards: bool = False) -> None:
    """Wait up to ``timeout`` seconds for Campaign's profiles to equal ``expected`` (externalId → fields)
    or, when None, the mapped source as it is at each poll (its contacts passing ``where``; with
    ``cards``, the loyalty cards must match too). On the deadline, AssertionError names ``what`` and the
    difference (:func:`diff`, of the cards too with ``cards``)."""
    if expected is None:
        def level() -> bool:
            return profiles_match(sandbox, where) and (not cards or cards_match(sandbox))
    else:
        def level() -> bool:
            return actual_profiles(sandbox) == expected

    def wanted() -> dict[str, dict[str, Any]]:
        return expected if expected is not None else expected_profiles(sandbox, where or (lambda _: True))

    def difference() -> str:
        profiles = diff(wanted(), actual_profiles(sandbox))
        return f"{what}: {profiles}" + (f"; cards: {diff(expected_cards(sandbox), actual_cards(sandbox))}"
                                        if cards else "")

    await converge(level, timeout, difference)


def dead_letters(data_dir: Path, workflow: str) -> list[dict[str, Any]]:
    """A workflow's dead letters, as the embedded workers stored them."""
    state = SqliteWorkerState(data_dir / "worker-state.db")
    try:
        return state.dead_letters(workflow)
    finally:
        state.close()


async def status_of(stub: svc_grpc.WorkflowServiceStub, name: str) -> pb.WorkflowStatus:
    wf = await stub.GetWorkflow(svc.GetWorkflowRequest(name=f"workflows/{name}"))
    return wf.status


def diff(expected: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]]) -> str:
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    wrong = [k for k in expected.keys() & actual.keys() if expected[k] != actual[k]]
    sample = wrong[:1]
    return (f"missing {len(missing)}, extra {len(extra)}, different {len(wrong)}"
            + (f" (e.g. {sample[0]}: expected {expected[sample[0]]}, got {actual[sample[0]]})" if sample else ""))


async def status_until(stub: svc_grpc.WorkflowServiceStub, name: str,
                       predicate: Callable[[pb.WorkflowStatus], bool], timeout: float) -> pb.WorkflowStatus:
    """Poll the workflow's status through the API until the predicate holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate(status := await status_of(stub, name)):
        if loop.time() > deadline:
            raise AssertionError(f"timed out; last status: {status}")
        await asyncio.sleep(0.2)
    return status
