"""Where workflows live: an interface and its embedded (SQLite) backend.
The Kubernetes backend implements the same interface over Workflow CRs."""

from syncplane.store.base import Change, Mutation, WorkflowStore
from syncplane.store.sqlite import SqliteStore

__all__ = ["Change", "Mutation", "SqliteStore", "WorkflowStore"]
