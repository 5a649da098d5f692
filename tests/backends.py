"""The gRPC suite on both backends: the `backend` parameter and the `cp` / `authed_cp` fixtures.

A test that uses `cp` (a connected `WorkflowService` client and the control plane behind it)
is parametrized over `backend` in BACKENDS = ("embedded", "kubernetes"). Which of them a test
gets is keyed by the tier directory of the module that collects it, so each tier runs what
its infrastructure provides and none is ever skipped:

    tests/integration/…  ->  [embedded]     (`make test-integration` = pytest tests/integration)
    tests/k8s/…          ->  [kubernetes]   (`make test-k8s` = pytest tests/k8s)
    anywhere else        ->  a collection error (the fixtures of each backend live in its tier)

The shared tests are written once, in tests/integration (e.g. test_api_errors.py); the k8s
tier collects the same functions by re-exporting them from a module of its own
(tests/k8s/test_grpc_kubernetes.py), where they get the kubernetes parameter. So
`test_create_errors[embedded]` runs in the integration tier and `test_create_errors[kubernetes]`
in the k8s tier, through the same fixture.

- embedded: SQLite on disk, the local supervisor, workers as processes (tests.embedded_plane).
- kubernetes: the real test cluster, the Workflow CRD, the operator under KopfRunner, the same
  server over custom resources, and a fake kubelet running the worker pods' containers as local
  processes (tests.k8s.control_plane).

A test inherently tied to one backend (the process table, SQLite, the supervisor) says so with
`@pytest.mark.backends("embedded")` and a line in its docstring; if no backend it allows runs in
the tier that collects it, collection fails (never an empty parametrization, which is a skip).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest

from syncplane.api.server import ServerSecurity
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from tests.factories import create_workflow

BACKENDS = ("embedded", "kubernetes")
TIER_BACKENDS = {"integration": ("embedded",), "k8s": ("kubernetes",)}


class ApiPlane(Protocol):
    """What a backend-independent test may use."""

    stub: svc_grpc.WorkflowServiceStub
    channel: grpc.aio.Channel
    port: int

    async def create(self, name: str, kind: str = "ingress", **overrides: object) -> pb.Workflow: ...

    async def worker_count(self, workflow_id: str) -> int:
        """Workers that exist now: processes embedded, live (not deleting) pods on Kubernetes."""
        ...

    async def worker_reports(self, workflow_id: str) -> list[dict[str, Any]]:
        """The workers' own reports (the /status JSON embedded, the heartbeat Leases' on Kubernetes)."""
        ...

    def worker_logs(self) -> list[Path]:
        """Every worker's log file so far, those of stopped workers included: the supervisor's
        `<wf>.<i>.log*` and `.out` files embedded, each container's log on Kubernetes."""
        ...


@dataclass
class ConnectedPlane:
    """What every backend's control plane fixture holds: a client connected to its gRPC server on
    ``port`` (loopback). Each tier's fixture extends it with what it runs on (tests.embedded_plane,
    tests.k8s.control_plane)."""

    stub: svc_grpc.WorkflowServiceStub
    channel: grpc.aio.Channel
    port: int

    async def create(self, name: str, kind: str = "ingress", **overrides: object) -> pb.Workflow:
        return await create_workflow(self.stub, name, kind, **overrides)


def error_lines(logs: list[Path]) -> list[str]:
    """`<file>: <line>` for each ERROR or traceback line in these log files (normal use logs none:
    issue 14, fault 6)."""
    return [f"{log.name}: {line}" for log in logs if log.is_file()
            for line in log.read_text(errors="replace").splitlines() if " ERROR " in line or "Traceback" in line]


async def revision(stub: svc_grpc.WorkflowServiceStub, name: str) -> int:
    """The watch revision now (of an existing workflow), to follow what happens next on either
    backend: a store revision embedded, a resourceVersion on Kubernetes (never the etag)."""
    call = stub.WatchWorkflows(svc.WatchWorkflowsRequest(name=name))
    try:
        first = await call.read()
    finally:
        call.cancel()
    assert isinstance(first, svc.WatchWorkflowsResponse), first
    return int(first.revision)


async def eventually(check: Callable[[], Awaitable[bool]], what: str | Callable[[], str], timeout: float = 60.0,
                     interval: float = 0.1) -> None:
    """Poll an asynchronous condition until it holds; fail at the deadline, saying what (a callable
    ``what`` is asked then, so the message can show the state at the deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(interval)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends(*names): the backends a test supports (default: all)")


def backends_for(module_file: str, allowed: tuple[str, ...]) -> list[str]:
    return [b for b in TIER_BACKENDS.get(Path(module_file).parent.name, ()) if b in allowed]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    allowed = tuple(marker.args) if marker else BACKENDS
    unknown = set(allowed) - set(BACKENDS)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown backends {sorted(unknown)}")
    assert metafunc.module.__file__ is not None
    params = backends_for(metafunc.module.__file__, allowed)
    if not params:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: supports {list(allowed)}, none of which runs in "
                                f"the tier of {metafunc.module.__file__}")
    metafunc.parametrize("backend", params, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _plane(backend: str, request: pytest.FixtureRequest, tmp_path: Path,
                 security: ServerSecurity | None) -> AsyncIterator[ApiPlane]:
    if backend == "embedded":
        from tests.embedded_plane import serve

        async for plane in serve(tmp_path, security):
            yield plane
        return
    from tests.k8s.control_plane import serve_kubernetes

    cluster = request.getfixturevalue("k8s_cluster")
    request.getfixturevalue("workflow_crd")
    request.getfixturevalue("operator")
    namespace = request.getfixturevalue("namespace")
    monkeypatch = request.getfixturevalue("monkeypatch")
    async for kube in serve_kubernetes(cluster, namespace, tmp_path, monkeypatch, security):
        yield kube


@pytest.fixture
async def cp(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ApiPlane]:
    async for plane in _plane(backend, request, tmp_path, None):
        yield plane


@pytest.fixture
async def authed_cp(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ApiPlane]:
    async for plane in _plane(backend, request, tmp_path, ServerSecurity(token="s3cret-token")):
        yield plane
