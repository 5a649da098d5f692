"""Calling VerifyWorkflow in integration tests, and reading its answer by stream.

Every ingress, egress and opt-in/out scenario that runs through the control plane ends with
:func:`verified`: `syncplane verify` must agree with what the test checked on the sandbox."""

from __future__ import annotations

from collections.abc import Mapping

from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc

Counts = tuple[int, int, int]  # (missing, extra, different)


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
