"""Dead-letter use cases: list a workflow's poison records, mark them for retry.

The workers own the sink, so a retry is a mark: each worker re-sends the marked
records of its streams at the start of its next pass (see worker.pipeline).
Embedded, the records live in the workers' SQLite file (<data-dir>/worker-state.db,
WAL: the workers keep writing while this reads and marks). On Kubernetes they are
ConfigMaps, 16 shards per workflow read by name (state.kube_records). A server built without a store
says so (FAILED_PRECONDITION).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload

from google.protobuf import struct_pb2, timestamp_pb2

from syncplane.errors import FailedPrecondition, FieldViolation, InvalidArgument
from syncplane.proto.enums import phase_name
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.state.records import DeadLetter
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.store.base import WorkflowStore
from syncplane.validation.names import parse_name, workflow_name

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_KEYS = 1000
T = TypeVar("T")


class DeadLetterStore(Protocol):
    """Where a platform's workers keep their dead letters, as the API reads and marks them."""

    async def page(self, workflow_id: str, after: tuple[str, str] | None,
                   limit: int) -> tuple[list[DeadLetter], int]:
        """Up to ``limit`` letters after ``after`` in (stream, key) order, and how many there are in all."""
        ...

    async def mark(self, workflow_id: str, keys: Sequence[str]) -> tuple[int, list[str]]:
        """(marked, unknown keys); all or nothing."""
        ...


async def on_worker_state(path: Path, fn: Callable[[SqliteWorkerState], T]) -> T:
    """Run `fn` on the embedded workers' SQLite file, opened for this one call and closed after it,
    on a thread (a worker may be writing: SQLite's busy timeout waits for it off the event loop)."""

    def call() -> T:
        state = SqliteWorkerState(path)
        try:
            return fn(state)
        finally:
            state.close()

    return await asyncio.to_thread(call)


class SqliteDeadLetters:
    """The embedded workers' dead-letter table, opened per call (calls are rare; a worker
    may be writing: SQLite's busy timeout waits for it, off the event loop)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def _run(self, fn: Callable[[SqliteWorkerState], T]) -> T:
        return await on_worker_state(self.path, fn)

    async def page(self, workflow_id: str, after: tuple[str, str] | None,
                   limit: int) -> tuple[list[DeadLetter], int]:
        """Up to ``limit`` letters after ``after`` in (stream, key) order, and how many there are in all."""
        return await self._run(lambda s: (s.list_dead_letters(workflow_id, after, limit),
                                          s.dead_letter_count(workflow_id)))

    async def mark(self, workflow_id: str, keys: Sequence[str]) -> tuple[int, list[str]]:
        """Mark ``keys`` (all when empty) for a retry: (marked, unknown keys); all or nothing."""
        return await self._run(lambda s: s.mark_for_retry(workflow_id, keys))


class DeadLetterService:
    """ListDeadLetters and RetryDeadLetters: validation, paging tokens, NOT_FOUND and
    FAILED_PRECONDITION (a backend with no dead-letter store), over a `DeadLetterStore`."""

    def __init__(self, workflows: WorkflowStore, letters: DeadLetterStore | None,
                 unavailable: str = "dead letters are kept by the embedded workers only; "
                                    "this server's backend has no dead-letter store") -> None:
        self.workflows, self.letters, self.unavailable = workflows, letters, unavailable

    async def _store_for(self, workflow_id: str) -> DeadLetterStore:
        """The store, once the workflow is known to exist (else NOT_FOUND)."""
        wf = await self.workflows.get(workflow_name(workflow_id))
        if self.letters is None:
            raise FailedPrecondition(f"{self.unavailable} (workflow {wf.name})", phase_name(wf.status.phase),
                                     "DEAD_LETTERS_UNAVAILABLE")
        return self.letters

    async def list(self, req: svc.ListDeadLettersRequest) -> svc.ListDeadLettersResponse:
        """One page (AIP-158) of a workflow's dead letters, oldest stream/key first, and their total.

        Raises `InvalidArgument` (parent, page_size, page_token), `NotFound`, `FailedPrecondition`.
        """
        workflow_id, size, after = validated(
            lambda: parse_name(req.parent, "parent"), lambda: page_size(req.page_size),
            lambda: decode_token(req.page_token, req.parent) if req.page_token else None)
        letters = await self._store_for(workflow_id)
        rows, total = await letters.page(workflow_id, after, size + 1)
        resp = svc.ListDeadLettersResponse(dead_letters=[to_proto(d) for d in rows[:size]], total_size=total)
        if len(rows) > size:
            last = rows[size - 1]
            resp.next_page_token = encode_token(req.parent, (last.stream, last.key))
        return resp

    async def retry(self, req: svc.RetryDeadLettersRequest) -> svc.RetryDeadLettersResponse:
        """Mark dead letters for the workers' next pass to re-send (all when ``keys`` is empty).

        Raises `InvalidArgument` naming each unknown or repeated key (nothing marked then),
        `NotFound`, `FailedPrecondition`.
        """
        workflow_id, keys = validated(lambda: parse_name(req.parent, "parent"), lambda: validate_keys(req.keys))
        letters = await self._store_for(workflow_id)
        marked, unknown = await letters.mark(workflow_id, keys)
        if unknown:
            index = {k: i for i, k in reversed(list(enumerate(keys)))}
            raise InvalidArgument([FieldViolation(f"keys[{index[k]}]", f"workflow {workflow_id} has no dead letter "
                                                  f"with key {k!r}; nothing was marked") for k in unknown])
        return svc.RetryDeadLettersResponse(marked_count=marked)


A = TypeVar("A")
B = TypeVar("B")
C = TypeVar("C")


@overload
def validated(a: Callable[[], A], b: Callable[[], B], /) -> tuple[A, B]: ...


@overload
def validated(a: Callable[[], A], b: Callable[[], B], c: Callable[[], C], /) -> tuple[A, B, C]: ...


def validated(*checks: Callable[[], Any]) -> tuple[Any, ...]:
    """Run every check; one INVALID_ARGUMENT with all their field violations, or their results."""
    results, bad = [], []
    for check in checks:
        try:
            results.append(check())
        except InvalidArgument as exc:
            bad.extend(exc.violations)
    if bad:
        raise InvalidArgument(bad)
    return tuple(results)


def page_size(requested: int) -> int:
    """The page size to use (records): the default for 0, at most MAX_PAGE_SIZE; negative is INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def validate_keys(keys: Sequence[str]) -> list[str]:
    """The keys of a retry, checked: at most MAX_KEYS, none empty or repeated (`InvalidArgument`, per index)."""
    bad: list[FieldViolation] = []
    if len(keys) > MAX_KEYS:
        bad.append(FieldViolation("keys", f"at most {MAX_KEYS} keys per call (an empty list retries all)"))
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if not key.strip():
            bad.append(FieldViolation(f"keys[{i}]", "must not be empty"))
        elif key in seen:
            bad.append(FieldViolation(f"keys[{i}]", f"{key!r} is listed twice"))
        seen.add(key)
    if bad:
        raise InvalidArgument(bad)
    return list(keys)


def encode_token(parent: str, after: tuple[str, str]) -> str:
    """An opaque page token (URL-safe base64 JSON) for the page after (stream, key) of ``parent``."""
    raw = json.dumps({"parent": _canonical(parent), "after": list(after)}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_token(token: str, parent: str) -> tuple[str, str]:
    """The (stream, key) a token of :func:`encode_token` resumes after; `InvalidArgument` on
    ``page_token`` for a token not issued by this server or issued for another parent."""
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        issued_for, (stream, key) = data["parent"], data["after"]
        after = (str(stream), str(key))
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument([FieldViolation("page_token", "is not a token this server issued")]) from exc
    if issued_for != _canonical(parent):
        raise InvalidArgument([FieldViolation("page_token", "was issued for another parent")])
    return after


def _canonical(parent: str) -> str:
    """`workflows/x` and a bare `x` name the same workflow (an invalid name fails later, by its field)."""
    return parent.removeprefix("workflows/")


def to_proto(d: DeadLetter) -> svc.DeadLetter:
    """A stored dead letter (payload already redacted) as the API's message."""
    payload = struct_pb2.Struct()
    payload.update(d.payload)
    first, last = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    first.FromNanoseconds(int(d.first_seen * 1e9))
    last.FromNanoseconds(int(d.last_seen * 1e9))
    return svc.DeadLetter(stream=d.stream, key=d.key, resource=d.resource, key_field=d.key_field,
                          payload=payload, deleted=d.deleted, http_status=d.status, error=d.error,
                          first_seen_time=first, last_seen_time=last, attempts=d.attempts, retry_pending=d.retry)
