"""The API fuzzer: random wire-valid requests for every RPC of WorkflowService (tests/fuzz_api.py)
sent to a live server, and the invariants it must keep:

- no INTERNAL (nor UNKNOWN, nor RESOURCE_EXHAUSTED: an error too big to reach the client);
- no ERROR line and no traceback in the server's log, nor in the workers' logs;
- every INVALID_ARGUMENT carries BadRequest field violations;
- the store stays consistent: ListWorkflows lists exactly the successful Creates minus the
  successful Deletes.

`make test` runs a bounded number of examples (SYNCPLANE_FUZZ_EXAMPLES, default 40 embedded,
15 on Kubernetes); `make fuzz` runs for SYNCPLANE_FUZZ_SECONDS and prints how many it tried.

Shared by both backends (tests/backends.py); the k8s tier collects it in
tests/k8s/test_grpc_kubernetes.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings

from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.backends import ApiPlane, error_lines, eventually
from tests.fuzz_api import calls

T = TypeVar("T")
# RESOURCE_EXHAUSTED too: the server sets no quota, so it can only be an error whose trailers
# outgrew the client's metadata limit (an echoed 20,000-character name did, before clipping).
BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.RESOURCE_EXHAUSTED)
EXAMPLES = {"embedded": 40, "kubernetes": 15}
STREAM_WAIT = 2.0   # seconds to wait for a watch's first event before cancelling it
FORMAT = logging.Formatter("%(levelname)s %(name)s %(message)s")   # with the traceback of an exception


class Fuzz:
    """One live server under fuzzing: what it was sent, what it answered, what it must hold."""

    def __init__(self, cp: ApiPlane, caplog: pytest.LogCaptureFixture) -> None:
        self.cp, self.caplog = cp, caplog
        self.expected: set[str] = set()   # successful Creates minus successful Deletes
        self.examples = 0
        self.codes: dict[str, int] = {}

    async def send(self, method: str, request: Message) -> None:
        try:
            if method == "WatchWorkflows":
                call = self.cp.stub.WatchWorkflows(request)
                try:
                    await asyncio.wait_for(call.read(), STREAM_WAIT)
                except TimeoutError:
                    pass
                finally:
                    call.cancel()
                self._count(method, "OK")
                return
            response = await getattr(self.cp.stub, method)(request, timeout=120)
        except grpc.aio.AioRpcError as err:
            self._count(method, err.code().name)
            assert err.code() not in BROKEN, f"{method}: {err.code().name}: {err.details()}\nrequest: {request}"
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                assert field_violations(err), f"{method}: INVALID_ARGUMENT without field violations: " \
                                              f"{err.details()}\nrequest: {request}"
            return
        self._count(method, "OK")
        if method == "CreateWorkflow" and not request.validate_only:  # type: ignore[attr-defined]
            self.expected.add(response.name)
        elif method == "DeleteWorkflow":
            self.expected.discard(await self._deleted_name(request))

    def _count(self, method: str, code: str) -> None:
        key = f"{method} {code}"
        self.codes[key] = self.codes.get(key, 0) + 1

    async def _deleted_name(self, request: Message) -> str:
        name = str(request.name)  # type: ignore[attr-defined]
        return name if name.startswith("workflows/") else f"workflows/{name}"

    async def listed(self) -> set[str]:
        names: set[str] = set()
        req = svc.ListWorkflowsRequest(page_size=1000)
        while True:
            resp = await self.cp.stub.ListWorkflows(req)
            names.update(w.name for w in resp.workflows)
            if not resp.next_page_token:
                return names
            req.page_token = resp.next_page_token

    async def example(self, sequence: list[tuple[str, Message]]) -> None:
        self.examples += 1
        logged = len(self.caplog.records)
        for method, request in sequence:
            await self.send(method, request)
        listed: set[str] = set()

        async def consistent() -> bool:
            nonlocal listed
            listed = await self.listed()
            return listed == self.expected

        # Embedded, a delete is done when it returns; on Kubernetes the resource goes once its
        # workers drained (the finalizer).
        await eventually(consistent, lambda: f"List {sorted(listed)} == Creates - Deletes {sorted(self.expected)}",
                         timeout=120)
        errors = [FORMAT.format(r) for r in self.caplog.records[logged:] if r.levelno >= logging.ERROR]
        assert not errors, "\n".join(errors)

    def worker_log_errors(self) -> list[str]:
        return error_lines(self.cp.worker_logs())


def run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the test's loop from Hypothesis's thread, and wait for it."""
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


def field_violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    out: list[str] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend(v.field for v in bad.field_violations)
    return out


@pytest.mark.timeout(0)   # bounded by the number of examples (or SYNCPLANE_FUZZ_SECONDS)
async def test_random_requests_keep_the_invariants(cp: ApiPlane, backend: str, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    fuzz = Fuzz(cp, caplog)
    loop = asyncio.get_running_loop()
    examples = int(os.environ.get("SYNCPLANE_FUZZ_EXAMPLES", EXAMPLES[backend]))
    budget = float(os.environ.get("SYNCPLANE_FUZZ_SECONDS", "0"))

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(calls())
    def run(sequence: list[tuple[str, Message]]) -> None:
        run_on(loop, fuzz.example(sequence))

    started = time.monotonic()
    rounds = 0
    while True:   # with a time budget (make fuzz): fresh Hypothesis runs until it is spent
        rounds += 1
        await asyncio.to_thread(run)
        if not budget or time.monotonic() - started > budget:
            break
    report = ", ".join(f"{k}: {v}" for k, v in sorted(fuzz.codes.items()))
    print(f"\nfuzz [{backend}]: {fuzz.examples} examples in {rounds} run(s), "
          f"{sum(fuzz.codes.values())} requests in {time.monotonic() - started:.0f}s; {report}")
    assert not fuzz.worker_log_errors(), fuzz.worker_log_errors()
