"""The embedded platform: workers are child processes of the embedded control plane on one machine.

Secrets are ``<secrets-dir>/<name>.json`` files (default ``<state-dir>/secrets``, written by
``syncplane secret``), all state is in the worker-state SQLite file shared by the workflow's
workers (:mod:`syncplane.state.sqlite`), and the supervisor polls each worker's ``/status``
(no heartbeat of its own; a worker nobody polls stops itself, see ``--orphan-timeout``).
"""

from __future__ import annotations

from dataclasses import dataclass

from syncplane.contract.report import WorkerReport
from syncplane.state.factory import worker_stores
from syncplane.state.stores import Stores
from syncplane.worker.platform import Heartbeat, LocalFiles


@dataclass(frozen=True)
class EmbeddedPlatform(LocalFiles):
    """``state_db``: the worker-state file; ``secrets_dir``: the secret files' directory."""

    name: str = "embedded"
    holder: str = ""

    def stores(self) -> Stores:
        """Every store in the worker-state file."""
        return worker_stores("embedded", state_db=self.state_db)

    def heartbeat(self, report: WorkerReport) -> Heartbeat | None:
        """None: the supervisor polls ``/status``."""
        return None
