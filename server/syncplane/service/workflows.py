"""Workflow use cases: validate, apply lifecycle rules, persist through a store.

gRPC servicers stay thin and call this; the CLI reaches it only over gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from google.protobuf import field_mask_pb2

from syncplane import lifecycle
from syncplane.errors import FailedPrecondition, FieldViolation, InvalidArgument
from syncplane.proto.enums import phase_name
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.store.base import CHANGE_DELETED, Change, WorkflowStore
from syncplane.telemetry import current_trace_parent
from syncplane.validation import apply_defaults, validate_labels, validate_spec
from syncplane.validation.names import parse_name, workflow_name

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
#: Distinct ListWorkflows queries whose last page is kept (the oldest goes first).
PAGE_CACHE = 64
# Update may touch these; the lifecycle fields go through Start/Stop/Restart.
LIFECYCLE_PATHS = {"spec.desired_state", "spec.restart_nonce", "spec.trace_parent"}
IMMUTABLE_PATHS = {"name", "uid", "etag", "generation", "create_time", "update_time", "status", "spec.type"}
# How long a mutating call waits for the controller (the embedded supervisor, the operator) to
# observe its effect before it answers with the resource as it then is (seconds).
SETTLE_TIMEOUT = 10.0


def observed(wf: pb.Workflow) -> bool:
    """The controller has reconciled this generation: status (phase, drift, conditions) is its answer to it."""
    return wf.status.observed_generation >= wf.generation


class WorkflowService:
    """Every mutating call (Create, Update, Start, Stop, Restart) returns the resource as it is
    after its effect (AIP-134): once the controller has observed the new generation, so the
    response shows the phase, drift and conditions the change leads to, as a Get would. If no
    controller answers within ``settle_timeout`` seconds, the resource as stored then."""

    def __init__(self, store: WorkflowStore, on_change: Callable[[], None] | None = None,
                 settle_timeout: float = SETTLE_TIMEOUT) -> None:
        self.store = store
        self._on_change = on_change or (lambda: None)
        self.settle_timeout = settle_timeout
        # The one cache of list results: the last page answered per query, with the store's
        # list_version it was read at. While that version stays, the page is answered again without
        # asking the store; copying up to MAX_PAGE_SIZE workflows into a response was most of a
        # ListWorkflows call. A store that cannot tell (None) is asked every time.
        self._pages: dict[tuple[tuple[int, ...], tuple[int, ...], str, int],
                          tuple[int, svc.ListWorkflowsResponse]] = {}

    async def _settled(self, wf: pb.Workflow) -> pb.Workflow:
        """``wf`` (just written) once the controller has observed its generation."""
        if observed(wf) or self.settle_timeout <= 0:
            return wf
        latest = wf
        try:
            changes = self.store.watch(0, wf.name)
            async with asyncio.timeout(self.settle_timeout), aclosing(changes):  # type: ignore[type-var]
                async for change in changes:
                    if change.type == CHANGE_DELETED:
                        break
                    latest = change.workflow
                    if latest.generation > wf.generation or observed(latest):
                        break
        except TimeoutError:
            pass
        return latest

    async def create(self, req: svc.CreateWorkflowRequest) -> pb.Workflow:
        """Create a workflow (defaults applied, output fields cleared), idempotent by ``request_id``.

        Raises `InvalidArgument` with field paths, `AlreadyExists`. ``validate_only`` writes nothing.
        """
        workflow_id = parse_name(req.workflow_id, "workflow_id")
        wf = pb.Workflow()
        wf.CopyFrom(req.workflow)
        wf.name = workflow_name(workflow_id)
        wf.ClearField("status")
        for f in ("uid", "etag", "generation", "create_time", "update_time"):
            wf.ClearField(f)
        apply_defaults(wf.spec)
        validate_labels(dict(wf.labels))
        validate_spec(wf.spec)
        if req.validate_only:
            return wf
        created = await self.store.create(wf, req.request_id)
        self._on_change()
        return await self._settled(created)

    async def get(self, name: str) -> pb.Workflow:
        """The workflow ``workflows/<id>`` (or a bare id); `InvalidArgument`, `NotFound`."""
        return await self.store.get(workflow_name(parse_name(name)))

    async def list(self, req: svc.ListWorkflowsRequest) -> svc.ListWorkflowsResponse:
        """One page (AIP-158) by name, filtered by type and phase; `InvalidArgument` for a bad size or token.
        The response may be shared with other callers: do not mutate it."""
        if req.page_size < 0:
            raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
        size = min(req.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(req.page_token, req) if req.page_token else ""
        types, phases = list(req.types), list(req.phases)
        key = (tuple(types), tuple(phases), after, size)
        version = self.store.list_version()  # before the list: a write during it makes the page a miss
        hit = self._pages.get(key)
        if version is not None and hit is not None and hit[0] == version:
            return hit[1]
        rows = await self.store.list(types=types, phases=phases, after=after, limit=size + 1)
        resp = svc.ListWorkflowsResponse(workflows=rows[:size])
        if len(rows) > size:
            resp.next_page_token = _encode_token(rows[size - 1].name, req)
        if version is not None:
            if len(self._pages) >= PAGE_CACHE and key not in self._pages:
                self._pages.pop(next(iter(self._pages)))
            self._pages[key] = (version, resp)
        return resp

    async def update(self, req: svc.UpdateWorkflowRequest) -> pb.Workflow:
        """Update labels and spec by field mask (AIP-134; empty: both), never the lifecycle fields.

        Raises `InvalidArgument` (mask paths, spec), `Aborted` (stale etag), `NotFound`, and
        `FailedPrecondition` for a replay refused at 2,000,000 records.
        """
        name = workflow_name(parse_name(req.workflow.name, "workflow.name"))
        paths = list(req.update_mask.paths) or ["labels", "spec"]
        bad = [FieldViolation(f"update_mask.paths[{i}]", _why_not_updatable(p)) for i, p in enumerate(paths)
               if _why_not_updatable(p)]
        if bad:
            raise InvalidArgument(bad)

        def mutate(current: pb.Workflow) -> pb.Workflow:
            lifecycle.check_preconditions(current, req.workflow.etag, 0)
            new = pb.Workflow()
            new.CopyFrom(current)
            mask = field_mask_pb2.FieldMask(paths=_expand(paths))
            try:
                mask.MergeMessage(req.workflow, new, replace_message_field=True, replace_repeated_field=True)
            except ValueError as exc:
                raise InvalidArgument([FieldViolation("update_mask", str(exc))]) from exc
            # The lifecycle is never changed by Update, even with a whole-spec mask.
            new.spec.desired_state = current.spec.desired_state
            new.spec.restart_nonce = current.spec.restart_nonce
            new.spec.trace_parent = current.spec.trace_parent
            new.spec.type = current.spec.type
            apply_defaults(new.spec)
            validate_labels(dict(new.labels))
            validate_spec(new.spec)
            lifecycle.check_replay(current, new.spec)
            return new

        updated = await self.store.update(name, mutate)
        self._on_change()
        return await self._settled(updated)

    async def delete(self, req: svc.DeleteWorkflowRequest) -> None:
        """Delete a stopped (or failed) workflow; `FailedPrecondition` WORKERS_RUNNING unless ``force``."""
        name = workflow_name(parse_name(req.name))

        def check(wf: pb.Workflow) -> None:
            lifecycle.check_preconditions(wf, req.etag, 0)
            phase = lifecycle.effective_phase(wf)
            if phase != pb.PHASE_STOPPED and phase != pb.PHASE_ERROR and not req.force:
                raise FailedPrecondition(
                    f"workflow {name} is {phase_name(phase)}: stop it first, or delete with force",
                    phase_name(phase), "WORKERS_RUNNING")

        await self.store.delete(name, check)
        self._on_change()

    async def _transition(self, name: str, etag: str, expected_phase: int,
                          request: Callable[[pb.Workflow], pb.WorkflowSpec]) -> pb.Workflow:
        full = workflow_name(parse_name(name))

        def mutate(current: pb.Workflow) -> pb.Workflow:
            lifecycle.check_preconditions(current, etag, expected_phase)
            current.spec.CopyFrom(request(current))
            return current

        updated = await self.store.update(full, mutate)
        self._on_change()
        return await self._settled(updated)

    async def start(self, req: svc.StartWorkflowRequest) -> pb.Workflow:
        """Set desired RUNNING; `FailedPrecondition` unless the effective phase is STOPPED or ERROR."""
        return await self._transition(req.name, req.etag, req.expected_phase, traced(lifecycle.request_start))

    async def stop(self, req: svc.StopWorkflowRequest) -> pb.Workflow:
        """Set desired STOPPED; `FailedPrecondition` unless starting, running or in error."""
        return await self._transition(req.name, req.etag, req.expected_phase, lifecycle.request_stop)

    async def restart(self, req: svc.RestartWorkflowRequest) -> pb.Workflow:
        """Bump ``spec.restart_nonce`` (applies edits); `FailedPrecondition` unless starting, running or in error."""
        return await self._transition(req.name, req.etag, req.expected_phase, traced(lifecycle.request_restart))

    def watch(self, req: svc.WatchWorkflowsRequest) -> AsyncIterator[Change]:
        """The changes after ``start_revision`` (0: the current state first), of one workflow or all."""
        if req.start_revision < 0:
            raise InvalidArgument([FieldViolation("start_revision", "must not be negative")])
        name = workflow_name(parse_name(req.name)) if req.name else ""
        return self.store.watch(req.start_revision, name)


def traced(request: Callable[[pb.Workflow], pb.WorkflowSpec]) -> Callable[[pb.Workflow], pb.WorkflowSpec]:
    """``request`` (a Start or Restart), also recording the current trace context in ``spec.trace_parent``:
    the spec snapshot of the run it starts carries it to the workers."""

    def with_trace(current: pb.Workflow) -> pb.WorkflowSpec:
        spec = request(current)
        spec.trace_parent = current_trace_parent()
        return spec

    return with_trace


def _why_not_updatable(path: str) -> str:
    if path in LIFECYCLE_PATHS:
        return f"{path} is changed by StartWorkflow/StopWorkflow/RestartWorkflow, not UpdateWorkflow"
    if path in IMMUTABLE_PATHS or path.startswith("status"):
        return f"{path} cannot be updated"
    root = path.split(".", 1)[0]
    if root not in ("labels", "spec"):
        return f"{path} is not a field of Workflow"
    if root == "spec" and "." in path:
        field = path.split(".")[1]
        if field not in pb.WorkflowSpec.DESCRIPTOR.fields_by_name:
            return f"{path} is not a field of Workflow"
    return ""


def _expand(paths: list[str]) -> list[str]:
    """`spec` means every updatable spec field (the lifecycle ones are restored after)."""
    out: list[str] = []
    for p in paths:
        if p == "spec":
            out.extend(f"spec.{f.name}" for f in pb.WorkflowSpec.DESCRIPTOR.fields
                       if f"spec.{f.name}" not in LIFECYCLE_PATHS | IMMUTABLE_PATHS)
        else:
            out.append(p)
    return out


def _filter_key(req: svc.ListWorkflowsRequest) -> str:
    return f"{sorted(req.types)}|{sorted(req.phases)}"


def _encode_token(after: str, req: svc.ListWorkflowsRequest) -> str:
    raw = json.dumps({"after": after, "filter": _filter_key(req)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_token(token: str, req: svc.ListWorkflowsRequest) -> str:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        after, key = str(data["after"]), data["filter"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument([FieldViolation("page_token", "is not a token this server issued")]) from exc
    if key != _filter_key(req):
        raise InvalidArgument([FieldViolation("page_token", "was issued for a different filter")])
    return after
