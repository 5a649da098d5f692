"""The worker's platform seam (``syncplane worker --platform embedded|kubernetes``): what differs
between the two platforms a worker runs on, behind one small interface (:class:`Platform`).

==========  =====================================  ======================================  ======================
Platform    secrets                                state (syncplane.state.factory)         heartbeat
==========  =====================================  ======================================  ======================
embedded    ``<secrets-dir>/<name>.json`` files    the worker-state SQLite file            polled on ``/status``
kubernetes  the Secrets the operator mounts        ConfigMaps (echo memory: a pod file)    a Lease per pod
==========  =====================================  ======================================  ======================

Everything else (the engine, the runners, ``/status``, draining) is the same on both:
:class:`syncplane.worker.main.Worker` asks its platform for the three and runs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from syncplane.contract.report import WorkerReport
from syncplane.credentials import ConnectionSecret, load_local_secrets
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.state.stores import Stores

#: The values of ``--platform``.
PLATFORMS = ("embedded", "kubernetes")


class HeartbeatRejected(RuntimeError):
    """The platform refuses the worker's heartbeat: retrying cannot help (the message says what to fix)."""


class Heartbeat(Protocol):
    """How the control plane learns the worker's report besides ``/status``."""

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until ``stop``; raises :class:`HeartbeatRejected` when no beat can ever succeed."""
        ...

    async def close(self, remove: bool = True) -> None:
        """Release the heartbeat (and remove what it wrote, when ``remove``)."""
        ...


class Platform(Protocol):
    """What a worker takes from its platform: its secrets, its stores and its heartbeat."""

    @property
    def name(self) -> str:
        """``embedded`` or ``kubernetes`` (:data:`PLATFORMS`)."""
        ...

    @property
    def holder(self) -> str:
        """This worker's name among workers without an index (the split first load's claims):
        its pod's on Kubernetes; empty embedded (the worker's index names it)."""
        ...

    def secrets(self, spec: pb.WorkflowSpec) -> dict[str, ConnectionSecret]:
        """The secrets ``spec`` references; raises ``CredentialsError`` (fatal: BAD_CREDENTIALS)."""
        ...

    def stores(self) -> Stores:
        """The worker's stores (closed by the worker with ``Stores.aclose``)."""
        ...

    def heartbeat(self, report: WorkerReport) -> Heartbeat | None:
        """The heartbeat carrying ``report``; None when the control plane polls ``/status`` instead."""
        ...


@dataclass(frozen=True)
class LocalFiles:
    """What both platforms keep in the worker's file system: the secrets under ``secrets_dir``
    (embedded: ``<name>.json`` files; kubernetes: the Secrets the operator mounts, a directory
    each) and the worker-state SQLite file ``state_db`` (kubernetes: the echo memory only)."""

    secrets_dir: Path
    state_db: Path

    def secrets(self, spec: pb.WorkflowSpec) -> dict[str, ConnectionSecret]:
        """The secrets ``spec`` references (``syncplane.credentials.load_local_secrets``); raises
        ``CredentialsError`` when one is missing, unreadable, exposed to other users or lacks a key."""
        return load_local_secrets(spec, self.secrets_dir)
