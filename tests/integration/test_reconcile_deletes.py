"""Deletes made while the source could not report them (issue 11, fault 2), with real worker
processes against the sandbox: every full re-read (an expired delta token, a replay, a filter
change, a stored delta link discarded because the source endpoint moved) ends by reconciling deletes.
A full read carries no ``$deletedEntity`` rows, as in Dataverse; the records the integration wrote
that the source no longer has are deleted (with applyDeletes) or counted and left (without). Profiles
the integration did not create are never touched, even one whose externalId names a deleted contact."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from google.protobuf import field_mask_pb2

from syncplane.credentials import write_local_secret
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane_sandbox import MARKETING_USER, SANDBOX_CLIENT_ID, Sandbox, SeedSpec, start_sandbox
from tests.backends import eventually
from tests.embedded_plane import ControlPlane
from tests.integration.cli_env import cli
from tests.integration.conftest import watch_until
from tests.integration.ingress_env import converge, diff, expected_profiles, ingress_spec, prepare, status_until
from tests.integration.verify_env import verified


def owned_profiles(sb: Sandbox) -> dict[str, dict[str, Any]]:
    """The profiles the integration created, by externalId (mapped fields only)."""
    return {str(r["externalId"]): {k: r.get(k) for k in ("externalId", "email", "firstName", "lastName")}
            for r in sb.acs.profiles.rows.values() if r.get("externalId") and r["createdBy"] == SANDBOX_CLIENT_ID}


def level(sb: Sandbox) -> bool:
    return owned_profiles(sb) == expected_profiles(sb)


async def start_with(plane: ControlPlane, name: str, spec: pb.WorkflowSpec, path: str) -> None:
    """Edit the stopped workflow, then start it."""
    wf = pb.Workflow(name=f"workflows/{name}", spec=spec)
    await plane.stub.UpdateWorkflow(svc.UpdateWorkflowRequest(workflow=wf,
                                                              update_mask=field_mask_pb2.FieldMask(paths=[path])))
    await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name=f"workflows/{name}"))


@pytest.mark.parametrize("apply_deletes", [True, False])
@pytest.mark.parametrize("trigger", ["expired-token", "replay", "filter-change", "endpoint-moved"])
async def test_every_full_re_read_reconciles_deletes(plane: ControlPlane, trigger: str, apply_deletes: bool) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=30, seed=21))
    try:
        prepare(sb, plane.data_dir)
        contacts = sb.d365.table("contacts")
        ids = sorted(contacts.rows)
        # Made by hand in Campaign: one with its own key, one naming a contact that is deleted below.
        mine = sb.acs.profiles.add(externalId="marketer-made-1", email="m1@example.com", lastName="Keep")
        theirs = sb.acs.profiles.add(externalId=ids[1], email="m2@example.com", lastName="Keep too")
        spec = ingress_spec(sb)
        entity = spec.ingress.entities[0]
        entity.apply_deletes = apply_deletes
        await plane.stub.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id="rd", workflow=pb.Workflow(spec=spec)))
        await plane.stub.StartWorkflow(svc.StartWorkflowRequest(name="workflows/rd"))
        # contact 1's profile exists already, made by someone else: it is left alone (a dead letter)
        await converge(lambda: level(sb) or set(expected_profiles(sb)) - set(owned_profiles(sb)) == {ids[1]}, 120,
                       lambda: "the first load: " + diff(expected_profiles(sb), owned_profiles(sb)))

        deleted = [ids[0], ids[1], ids[2]]
        if trigger == "expired-token":
            # Deleted, then the token expires before the next poll (one synchronous step: no poll between).
            for rid in deleted:
                contacts.delete(rid)
            sb.expire_delta_tokens()
        else:
            rev = plane.store.revision()
            await plane.stub.StopWorkflow(svc.StopWorkflowRequest(name="workflows/rd"))
            await watch_until(plane.stub, "rd", lambda w: w.status.phase == pb.PHASE_STOPPED, rev, timeout=90)
            for rid in deleted:
                contacts.delete(rid)
            changed = pb.WorkflowSpec()
            changed.CopyFrom(spec)
            if trigger == "endpoint-moved":
                # the same service under another host name (brief s7-bugs 2): the stored delta link, under the old
                # one, is refused by the credentials' new audience; it is discarded and the table read in full
                moved = sb.d365_origin.replace("127.0.0.1", "localhost")
                write_local_secret(plane.data_dir / "secrets", "d365-sandbox",
                                   {**sb.secrets()["d365-sandbox"], "scope": f"{moved}/.default"})
                changed.source.endpoint = sb.d365_url.replace(sb.d365_origin, moved)
                await start_with(plane, "rd", changed, "spec.source.endpoint")
            elif trigger == "replay":
                changed.ingress.replay.source_table = "contact"
                changed.ingress.replay.request_id = "r1"
                await start_with(plane, "rd", changed, "spec.ingress.replay")
            else:  # a filter every remaining contact passes: the table is read again in full
                changed.ingress.entities[0].filter.conditions.add(field="contactid",
                                                                  operator=pb.FILTER_OPERATOR_IS_NOT_NULL)
                await start_with(plane, "rd", changed, "spec.ingress")
        expected = expected_profiles(sb)
        gone = {ids[0], ids[2]}  # ids[1]'s profile was never ours

        async def worker_report() -> dict[str, Any]:
            try:
                reports = await plane.worker_reports("rd")
            except (AssertionError, KeyError, httpx.HTTPError):
                return {}  # a worker starting: no port (or no group) yet
            return reports[0] if reports else {}

        if apply_deletes:
            await converge(lambda: level(sb), 120, lambda: f"after {trigger}: " + diff(expected, owned_profiles(sb)))
            assert not gone & set(owned_profiles(sb))
        else:
            async def counted() -> bool:
                return (await worker_report()).get("stale", {}).get("contact") == len(gone)

            await eventually(counted, lambda: f"{len(gone)} stale records counted after {trigger}", 120)
            assert gone <= set(owned_profiles(sb)), "deletes are off: the profiles stay"
            # where a user looks: the status's table row, and describe
            await status_until(plane.stub, "rd", lambda s: [(t.source_table, t.stale) for t in s.tables]
                               == [("contact", len(gone))], 60)
            described = (await cli(plane.port, "describe", "rd")).stdout
            row = f"contact {len(contacts.rows)} rows ({len(gone)} stale: not at the source, deletes off)"
            assert row in described, described
        # never touched: the profiles made by hand
        assert sb.acs.profiles.rows[mine]["lastName"] == "Keep"
        assert sb.acs.profiles.rows[theirs]["lastName"] == "Keep too"
        assert sb.acs.profiles.rows[theirs]["createdBy"] == MARKETING_USER
        # verify agrees: with deletes off, exactly the stale profiles are extra
        resp = await verified(plane.stub, "rd", {"contact": (0, 0 if apply_deletes else len(gone), 0)})
        assert set(resp.streams[0].extra_keys) == (set() if apply_deletes else gone)
    finally:
        await sb.stop()
