"""Calling VerifyWorkflow in integration tests, and reading its answer by stream."""

from __future__ import annotations

from syncplane.api.v1 import workflow_service_pb2 as svc
from syncplane.api.v1 import workflow_service_pb2_grpc as svc_grpc


async def verify(stub: svc_grpc.WorkflowServiceStub, name: str, *, repair: bool = False,
                 samples: int = 100) -> svc.VerifyWorkflowResponse:
    return await stub.VerifyWorkflow(svc.VerifyWorkflowRequest(name=f"workflows/{name}", sample_size=samples,
                                                               repair=repair))


def counts(resp: svc.VerifyWorkflowResponse) -> dict[str, tuple[int, int, int]]:
    """Stream → (missing, extra, different)."""
    return {s.stream: (s.counts.missing, s.counts.extra, s.counts.different) for s in resp.streams}


def in_sync(resp: svc.VerifyWorkflowResponse) -> bool:
    c = resp.result.counts
    return c.missing == c.extra == c.different == 0
