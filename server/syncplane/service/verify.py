"""The verify use case: compare a workflow's source and destination (syncplane.verify), keep the
summary as ``status.last_verify``, and optionally queue the differences for the next pass.

The comparison reads only, with the workflow's own credentials, while the workers may be
running. It compares against the spec the workers run (the applied snapshot) when there is one,
else the current spec.

- Embedded (`LocalVerifyRunner`): it runs in the API server; the workers' checkpoints and the
  repair queue are in <data-dir>/worker-state.db (WAL: the workers keep writing meanwhile).
- Kubernetes (`syncplane.verify.kube.KubernetesVerifyRunner`): the API server reads no Secret,
  so the comparison runs in a one-off Job as the workflow's worker identity (see verify/kube.py);
  this service waits for its result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from syncplane.connectors.base import ConnectorError, Record
from syncplane.connectors.http import RetryableError
from syncplane.credentials import ConnectionSecret, CredentialsError, check_endpoints, load_local_secrets
from syncplane.errors import FailedPrecondition, FieldViolation, InvalidArgument, Unavailable
from syncplane.lifecycle import effective_phase
from syncplane.proto.enums import phase_name
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.service.dead_letters import on_worker_state, validated
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.store.base import WorkflowStore
from syncplane.validation.names import parse_name, workflow_name
from syncplane.verify.compare import Difference
from syncplane.verify.run import Report, WorkerState, verify, workers_running

DEFAULT_SAMPLE_SIZE = 10
MAX_SAMPLE_SIZE = 1000
T = TypeVar("T")


class VerifyEnvironment(Protocol):
    """Where the backend keeps what a comparison needs besides the workflow."""

    async def secrets(self, spec: pb.WorkflowSpec) -> dict[str, ConnectionSecret]:
        """The connections' credentials; raises CredentialsError naming what is missing."""
        ...

    @property
    def state(self) -> WorkerState:
        """The workers' checkpoints and repair queue of this backend."""
        ...


class SqliteWorkerStateAccess:
    """The embedded workers' SQLite file, opened per call, off the event loop (a worker may be
    writing: SQLite's busy timeout waits for it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def _run(self, fn: Callable[[SqliteWorkerState], T]) -> T:
        return await on_worker_state(self.path, fn)

    async def committed(self, workflow: str, stream: str) -> tuple[str | None, float | None]:
        """(cursor, commit time in epoch seconds) of a stream; (None, None) before its first commit."""
        return await self._run(lambda s: s.committed(workflow, stream))

    async def queue_repairs(self, workflow: str, stream: str, records: Sequence[Record]) -> int:
        """Queue ``records`` for the worker's next pass to decide again; returns how many were queued."""
        return await self._run(lambda s: s.queue_repairs(workflow, stream, records))


class SecretFilesEnvironment:
    """Secrets read from a directory (syncplane.credentials.load_local_secrets: a ``<name>.json`` file
    or a mounted Secret's directory per reference), state wherever ``state`` keeps it."""

    def __init__(self, secrets_dir: Path, state: WorkerState) -> None:
        self.secrets_dir, self._state = secrets_dir, state

    async def secrets(self, spec: pb.WorkflowSpec) -> dict[str, ConnectionSecret]:
        """The connections' credentials from the secret files; raises CredentialsError naming what is missing."""
        return await asyncio.to_thread(load_local_secrets, spec, self.secrets_dir)

    @property
    def state(self) -> WorkerState:
        """The embedded workers' state file."""
        return self._state


class EmbeddedVerifyEnvironment(SecretFilesEnvironment):
    """Embedded: secrets are ``<data-dir>/secrets/<name>.json`` files, state the worker-state file."""

    def __init__(self, secrets_dir: Path, state_db: Path) -> None:
        super().__init__(secrets_dir, SqliteWorkerStateAccess(state_db))


def sample_size(requested: int) -> int:
    """Keys listed per kind of difference (0: the default); `InvalidArgument` beyond MAX_SAMPLE_SIZE."""
    if not 0 <= requested <= MAX_SAMPLE_SIZE:
        raise InvalidArgument([FieldViolation("sample_size", f"must be between 0 and {MAX_SAMPLE_SIZE} "
                                              f"(0 means {DEFAULT_SAMPLE_SIZE})")])
    return requested or DEFAULT_SAMPLE_SIZE


@dataclass(frozen=True)
class VerifyCall:
    """One VerifyWorkflow, validated: what a runner needs besides the store."""

    workflow_id: str
    workflow: pb.Workflow
    samples: int                 # sample keys per kind and stream
    repair: bool
    timeout: float | None        # seconds the caller still waits (its RPC deadline); None: no deadline

    @property
    def phase(self) -> str:
        """The workflow's phase as the API spells it (e.g. ``RUNNING``), for error details."""
        return phase_name(effective_phase(self.workflow))


class VerifyRunner(Protocol):
    """Runs one comparison where the backend can: in this process (embedded) or in a Job (Kubernetes)."""

    async def run(self, call: VerifyCall) -> svc.VerifyWorkflowResponse:
        """The result and per-stream detail; raises the errors `VerifyService.verify` lists."""
        ...


async def compare(workflow_id: str, spec: pb.WorkflowSpec, environment: VerifyEnvironment, *, phase: str,
                  running: bool, repair: bool) -> Report:
    """`syncplane.verify.run.verify` with its failures as the API's errors (one mapping for both
    backends).

    Raises:
        FailedPrecondition: no credentials (the CredentialsError's reason, e.g. BAD_CREDENTIALS), an
            endpoint its secret is not for (ENDPOINT_NOT_ALLOWED), or an API refused a read (the
            ConnectorError's reason).
        Unavailable: an API stayed unavailable past the connectors' retries.
    """
    try:
        secrets = await environment.secrets(spec)
        check_endpoints(spec, secrets)  # as a worker does: a token goes only to an origin its secret is for
        return await verify(workflow_id, spec, secrets, environment.state, running=running, repair=repair)
    except CredentialsError as exc:
        raise FailedPrecondition(str(exc), phase, exc.reason) from None
    except ConnectorError as exc:
        raise FailedPrecondition(f"reading a side failed: {exc}", phase, exc.reason) from None
    except RetryableError as exc:
        raise Unavailable(f"a side stayed unavailable: {exc}") from None


def response_of(report: Report, repair: bool, samples: int) -> svc.VerifyWorkflowResponse:
    """The RPC's answer: the summary (timed now) and each stream with up to ``samples`` keys per kind."""
    return svc.VerifyWorkflowResponse(result=summary(report, repair),
                                      streams=[stream_proto(s.stream, s.source, s.destination, s.diff, s.queued,
                                                            samples) for s in report.streams])


class LocalVerifyRunner:
    """Compares in this process (embedded: the server may read the workflows' secret files)."""

    def __init__(self, workflows: WorkflowStore, environment: VerifyEnvironment) -> None:
        self.workflows, self.environment = workflows, environment

    async def run(self, call: VerifyCall) -> svc.VerifyWorkflowResponse:
        """Compare against the spec the workers run (the applied snapshot) or else the current one."""
        running = workers_running(call.workflow)
        name = workflow_name(call.workflow_id)
        applied = await self.workflows.get_applied(name) if running else None
        spec = applied if applied is not None else call.workflow.spec
        report = await compare(call.workflow_id, spec, self.environment, phase=call.phase, running=running,
                               repair=call.repair)
        return response_of(report, call.repair, call.samples)


class VerifyService:
    """VerifyWorkflow: compares both sides of a workflow through a `VerifyRunner` (here or in a Job)."""

    def __init__(self, workflows: WorkflowStore, runner: VerifyRunner | None,
                 unavailable: str = "this server's backend cannot reach the workers' state") -> None:
        """``runner``: where comparisons run; None answers every call FAILED_PRECONDITION
        (VERIFY_UNAVAILABLE) with ``unavailable``."""
        self.workflows, self.runner, self.unavailable = workflows, runner, unavailable

    async def verify(self, req: svc.VerifyWorkflowRequest, timeout: float | None = None) -> svc.VerifyWorkflowResponse:
        """Compare, record ``status.last_verify``, answer the per-stream detail.

        Args:
            timeout: seconds the caller still waits (the RPC's deadline); None: no deadline.

        Raises:
            InvalidArgument: a bad name or sample size.
            NotFound: no such workflow.
            FailedPrecondition: no credentials (BAD_CREDENTIALS), an API refused a read, or (on
                Kubernetes) the verify Job could not run (its reason says why).
            Unavailable: an API stayed unavailable past the connectors' retries, or (on Kubernetes)
                no result came before the deadline (VERIFY_TIMEOUT).
        """
        workflow_id, samples = validated(lambda: parse_name(req.name, "name"), lambda: sample_size(req.sample_size))
        name = workflow_name(workflow_id)
        wf = await self.workflows.get(name)
        call = VerifyCall(workflow_id, wf, samples, req.repair, timeout)
        if self.runner is None:
            raise FailedPrecondition(f"{self.unavailable} (workflow {name})", call.phase, "VERIFY_UNAVAILABLE")
        response = await self.runner.run(call)
        await self.workflows.set_last_verify(name, response.result)
        return response


def counts_proto(d: Difference) -> pb.VerifyCounts:
    """A comparison's counts (records) as the API's message."""
    return pb.VerifyCounts(compared=d.compared, missing=len(d.missing), extra=len(d.extra),
                           different=len(d.different), in_flight=len(d.in_flight), foreign=d.foreign,
                           held=d.held)


def summary(report: Report, repair: bool, now: float | None = None) -> pb.VerifyResult:
    """The summary kept as ``status.last_verify``: the total counts, stamped ``now`` (epoch seconds)."""
    result = pb.VerifyResult(counts=counts_proto(report.total()), repair_requested=repair, requests=report.requests)
    result.verify_time.FromNanoseconds(int((now if now is not None else time.time()) * 1e9))
    return result


def stream_proto(stream: str, source: str, destination: str, diff: Difference, queued: int,
                 samples: int) -> svc.VerifyStream:
    """One stream's detail: counts and up to ``samples`` keys per kind of difference."""
    return svc.VerifyStream(stream=stream, source=source, destination=destination, counts=counts_proto(diff),
                            missing_keys=diff.missing[:samples], extra_keys=diff.extra[:samples],
                            different_keys=diff.different[:samples],
                            in_flight_keys=sorted(diff.in_flight)[:samples], queued=queued)
