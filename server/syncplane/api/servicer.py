"""The WorkflowService servicer: translation only; logic lives in syncplane.service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.service import WorkflowService
from syncplane.service.dead_letters import DeadLetterService
from syncplane.service.verify import VerifyService

# grpc ships no type stubs; the context is untyped here.
Ctx: TypeAlias = Any


class WorkflowServicer(svc_grpc.WorkflowServiceServicer):
    def __init__(self, service: WorkflowService, dead_letters: DeadLetterService | None = None,
                 verifier: VerifyService | None = None) -> None:
        self.service = service
        # Without a dead-letter store (or what verify needs) the calls fail with FAILED_PRECONDITION, saying why.
        self.dead_letters = dead_letters or DeadLetterService(service.store, None)
        self.verifier = verifier or VerifyService(service.store, None)

    async def CreateWorkflow(self, request: svc.CreateWorkflowRequest, context: Ctx) -> pb.Workflow:
        return await self.service.create(request)

    async def GetWorkflow(self, request: svc.GetWorkflowRequest, context: Ctx) -> pb.Workflow:
        return await self.service.get(request.name)

    async def ListWorkflows(self, request: svc.ListWorkflowsRequest, context: Ctx) -> svc.ListWorkflowsResponse:
        return await self.service.list(request)

    async def UpdateWorkflow(self, request: svc.UpdateWorkflowRequest, context: Ctx) -> pb.Workflow:
        return await self.service.update(request)

    async def DeleteWorkflow(self, request: svc.DeleteWorkflowRequest, context: Ctx) -> svc.DeleteWorkflowResponse:
        await self.service.delete(request)
        return svc.DeleteWorkflowResponse()

    async def StartWorkflow(self, request: svc.StartWorkflowRequest, context: Ctx) -> pb.Workflow:
        return await self.service.start(request)

    async def StopWorkflow(self, request: svc.StopWorkflowRequest, context: Ctx) -> pb.Workflow:
        return await self.service.stop(request)

    async def RestartWorkflow(self, request: svc.RestartWorkflowRequest, context: Ctx) -> pb.Workflow:
        return await self.service.restart(request)

    async def WatchWorkflows(self, request: svc.WatchWorkflowsRequest,
                             context: Ctx) -> AsyncIterator[svc.WatchWorkflowsResponse]:
        async for change in self.service.watch(request):
            yield svc.WatchWorkflowsResponse(type=svc.ChangeType.ValueType(change.type),
                                             workflow=change.workflow, revision=change.revision)

    async def ListDeadLetters(self, request: svc.ListDeadLettersRequest,
                              context: Ctx) -> svc.ListDeadLettersResponse:
        return await self.dead_letters.list(request)

    async def RetryDeadLetters(self, request: svc.RetryDeadLettersRequest,
                               context: Ctx) -> svc.RetryDeadLettersResponse:
        return await self.dead_letters.retry(request)

    async def VerifyWorkflow(self, request: svc.VerifyWorkflowRequest, context: Ctx) -> svc.VerifyWorkflowResponse:
        return await self.verifier.verify(request, context.time_remaining())
