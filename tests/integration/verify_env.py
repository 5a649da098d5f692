"""Calling VerifyWorkflow in integration tests, and reading its answer by stream.

Every ingress, egress and opt-in/out scenario that runs through the control plane ends with
:func:`verified`: `syncplane verify` must agree with what the test checked on the sandbox."""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane_sandbox import SANDBOX_CLIENT_ID, Sandbox

Counts = tuple[int, int, int]  # (missing, extra, different)


async def tamper_profiles(sb: Sandbox) -> tuple[list[str], list[str], list[str]]:
    """Tamper with Campaign's profiles through the sandbox's control routes: 3 deleted, 4 edited
    (``lastName``), 2 written by the integration's client for contacts that do not exist.
    Returns their CRM ids (``externalId``), each sorted: (deleted, extra, edited), the order of
    verify's (missing, extra, different)."""
    profiles = sorted(sb.acs.profiles.rows)  # PKeys
    deleted, edited = profiles[:3], profiles[3:7]
    deleted_keys = sorted(sb.acs.profiles.rows[pk]["externalId"] for pk in deleted)
    edited_keys = sorted(sb.acs.profiles.rows[pk]["externalId"] for pk in edited)
    extra_keys = [f"00000000-0000-0000-0000-00000000000{i}" for i in range(2)]
    async with httpx.AsyncClient(base_url=sb.acs_origin) as http:
        for pk in deleted:
            assert (await http.delete(f"/_sandbox/resources/profile/records/{pk}")).status_code == 204
        for pk in edited:
            assert (await http.patch(f"/_sandbox/resources/profile/records/{pk}",
                                     json={"lastName": "Tampered"})).status_code == 200
        for key in extra_keys:
            assert (await http.post("/_sandbox/resources/profile/records",
                                    json={"externalId": key, "email": f"{key}@example.com",
                                          "createdBy": SANDBOX_CLIENT_ID})).status_code == 201
    return deleted_keys, extra_keys, edited_keys


async def verify(stub: svc_grpc.WorkflowServiceStub, name: str, *, repair: bool = False,
                 samples: int = 100) -> svc.VerifyWorkflowResponse:
    return await stub.VerifyWorkflow(svc.VerifyWorkflowRequest(name=f"workflows/{name}", sample_size=samples,
                                                               repair=repair))


def counts(resp: svc.VerifyWorkflowResponse) -> dict[str, Counts]:
    """Stream → (missing, extra, different)."""
    return {s.stream: (s.counts.missing, s.counts.extra, s.counts.different) for s in resp.streams}


def in_sync(resp: svc.VerifyWorkflowResponse) -> bool:
    c = resp.result.counts
    return c.missing == c.extra == c.different == 0


async def settled(stub: svc_grpc.WorkflowServiceStub, name: str, expected: Mapping[str, Counts]) -> bool:
    """verify ``name`` finds exactly ``expected`` (stream → counts), none of it in flight: poll
    this with a deadline (tests.backends.eventually) while the workers settle."""
    resp = await verify(stub, name)
    return counts(resp) == expected and resp.result.counts.in_flight == 0


async def verified(stub: svc_grpc.WorkflowServiceStub, name: str,
                   expected: Mapping[str, Counts] | None = None) -> svc.VerifyWorkflowResponse:
    """The end of a scenario: verify ``name`` and assert every stream has 0 differences, except
    the streams in ``expected`` (stream → exact (missing, extra, different)). What is left then
    is settled, not in flight: the workers have had the chance to write it."""
    resp = await verify(stub, name)
    got = counts(resp)
    assert got == {stream: (0, 0, 0) for stream in got} | dict(expected or {}), resp
    assert resp.result.counts.in_flight == 0, resp
    return resp
