"""The WorkflowService logic, independent of gRPC and of the backend."""

from syncplane.service.workflows import WorkflowService

__all__ = ["WorkflowService"]
