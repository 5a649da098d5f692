"""How a state-store failure is classified: an outage (5xx, 429, a refused connection) that
outlasts the store's retries is transient (the engine retries the pass, Degraded); a refusal
(403 Forbidden, a missing namespace, a rejected object) is fatal with its message.

The API server is played by an HTTP server answering as kube-apiserver does (a `Status` body)."""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from syncplane.state.kube_checkpoints import CheckpointError, ConfigMapCheckpoints, Retry
from syncplane.worker.engine import state_store_fatal
from tests.backends import eventually


def _status(code: int, reason: str, kind: str = "configmaps") -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": f"{reason} (test)",
            "reason": reason, "details": {"name": "wf-checkpoints", "kind": kind}, "code": code}
    return web.Response(status=code, text=json.dumps(body), content_type="application/json")


# (answer of the API server, transient?, text the message must carry)
VARIANTS = [
    (lambda: _status(503, "ServiceUnavailable"), True, "HTTP 503"),
    (lambda: _status(500, "InternalError"), True, "HTTP 500"),
    (lambda: _status(429, "TooManyRequests"), True, "HTTP 429"),
    (lambda: _status(403, "Forbidden"), False, "needs get, create and patch on its workflow"),
    (lambda: _status(404, "NotFound", kind="namespaces"), False, "does not exist"),
    (lambda: _status(422, "Invalid"), False, "HTTP 422"),
]


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[str, list[Callable[..., Any]]]]:
    answers: list[Callable[..., Any]] = []

    async def handle(request: web.Request) -> web.Response:
        answer: Any = answers[0]
        if asyncio.iscoroutinefunction(answer):   # an answer that reads the request
            response: web.Response = await answer(request)
            return response
        return answer()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", answers
    await runner.cleanup()


@asynccontextmanager
async def _store(host: str) -> AsyncIterator[ConfigMapCheckpoints]:
    from kubernetes_asyncio import client

    async with client.ApiClient(client.Configuration(host=host)) as api:
        yield ConfigMapCheckpoints("ns", api_client=api, retry=Retry(attempts=2, base=0.001, cap=0.001))


@pytest.mark.parametrize(("answer", "transient", "text"), VARIANTS)
async def test_api_answers_are_classified(api_server, answer, transient, text):
    host, answers = api_server
    answers.append(answer)
    async with _store(host) as store:
        calls: list[Coroutine[Any, Any, object]] = [store.acommit("wf", "contact", "c")]
        if text != "does not exist":  # a read in a missing namespace is a missing ConfigMap: nothing committed
            calls.append(store.aload("wf", "contact"))
        for call in calls:
            with pytest.raises(CheckpointError) as exc:
                await call
            assert exc.value.transient is transient and text in str(exc.value)
            fatal = state_store_fatal(exc.value)
            if transient:
                assert fatal is None and exc.value.reason == "STATE_STORE_UNAVAILABLE"
            else:
                assert fatal is not None and fatal.reason == "STATE_STORE_REJECTED" and text in str(fatal)


async def test_a_refused_connection_is_transient():
    with socket.socket() as s:   # a port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with _store(f"http://127.0.0.1:{port}") as store:
        with pytest.raises(CheckpointError) as exc:
            await store.acommit("wf", "contact", "c")
        assert exc.value.transient and state_store_fatal(exc.value) is None
        assert "cannot commit the checkpoint of wf/contact" in str(exc.value)


# -- the heartbeat Lease: the same kinds of answers -----------------------------------------------

@pytest.mark.parametrize(("answer", "transient", "text"),
                         [v for v in VARIANTS if v[2] != "does not exist"])  # (a Lease write names no namespace kind)
async def test_heartbeat_refusal_is_fatal_and_outage_is_retried(api_server, answer, transient, text):
    """A refused Lease ends the heartbeat with what to fix (the worker exits with it as its
    termination message); an outage is retried at the next beat."""
    from kubernetes_asyncio import client

    from syncplane.contract.report import WorkerReport
    from syncplane.worker.platform.kubernetes import HeartbeatRejected, LeaseHeartbeat

    host, answers = api_server
    seen: list[int] = []

    def counted() -> web.Response:
        seen.append(1)
        return answer()

    answers.append(counted)
    stop = asyncio.Event()
    beat = LeaseHeartbeat("ns", "wf-0", "wf", WorkerReport("wf", 0, 1), interval=0.01,
                          api_client=client.ApiClient(client.Configuration(host=host)))
    task = asyncio.ensure_future(beat.run(stop))
    try:
        if transient:
            async def three_beats() -> bool:
                return len(seen) >= 3

            await eventually(three_beats, "three beats", interval=0.01)
            assert not task.done()
        else:
            with pytest.raises(HeartbeatRejected) as exc:
                await asyncio.wait_for(task, 60)
            assert "leases.coordination.k8s.io" in str(exc.value) and "ns/wf-0" in str(exc.value)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await beat.close()



# (phase, ready, fatal): each change of a report's phase that the operator acts on
PHASE_CHANGES = [("RUNNING", True, None), ("FATAL", False, {"reason": "BAD_CREDENTIALS", "message": "m"})]


@pytest.mark.parametrize(("phase", "ready", "fatal"), PHASE_CHANGES)
async def test_heartbeat_sends_a_phase_change_at_once(api_server, phase, ready, fatal):
    """A worker that becomes ready (or fatal) renews its Lease at once, not at the next period (here
    an hour): the operator's STARTING -> RUNNING (or ERROR) waited up to a renew interval for it."""
    from kubernetes_asyncio import client

    from syncplane.contract.report import WorkerReport
    from syncplane.worker.platform.kubernetes import LeaseHeartbeat

    host, answers = api_server
    reports = _lease_reports(answers)
    report = WorkerReport("wf", 0, 1)
    stop = asyncio.Event()
    beat = LeaseHeartbeat("ns", "wf-0", "wf", report, interval=3600,
                          api_client=client.ApiClient(client.Configuration(host=host)))
    task = asyncio.ensure_future(beat.run(stop))
    try:
        async def beats(n: int) -> bool:
            return len(reports) >= n

        await eventually(lambda: beats(1), "the first beat")
        assert reports[0]["phase"] == "STARTING" and reports[0]["ready"] is False
        report.fatal = fatal
        report.set_phase(phase, ready=ready)

        async def sent() -> bool:
            return any(r["phase"] == phase and r["ready"] is ready and r["fatal"] == fatal for r in reports)

        await eventually(sent, lambda: f"a beat with phase {phase}: {reports}", timeout=30)
        assert not task.done()
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await beat.close(remove=False)


_tick = itertools.count(1)
# Each kind of change of a worker's report that the operator shows in the Workflow's status
REPORT_CHANGES: dict[str, Callable[[Any], None]] = {
    "backlog": lambda r: setattr(r, "backlog", r.backlog + 5),
    "last error": lambda r: setattr(r, "last_error", {"reason": "TRANSIENT", "message": "m",
                                                      "time": str(next(_tick))}),
    "held records": lambda r: setattr(r, "held", r.held + 1),
    "dead letters": lambda r: setattr(r, "dead_letters", r.dead_letters + 1),
    "failing link": lambda r: r.links.__setitem__("source", {"failing_since": float(next(_tick)),
                                                                "error": "e"}),
}


def _lease_reports(answers: list[Callable[..., Any]]) -> list[dict[str, Any]]:
    """Answer every Lease write with its body; the reports the writes carried, in order."""
    from syncplane.contract.names import REPORT_ANNOTATION

    reports: list[dict[str, Any]] = []

    async def lease(request: web.Request) -> web.Response:
        body = await request.json()
        reports.append(json.loads(body["metadata"]["annotations"][REPORT_ANNOTATION]))
        return web.json_response(body)

    answers.append(lease)
    return reports


@pytest.mark.parametrize("change", REPORT_CHANGES.values(), ids=REPORT_CHANGES)
async def test_heartbeat_writes_each_changed_report_and_no_unchanged_one_before_the_renew_period(api_server, change):
    """A report that changed is written at the next interval (here 0.01 s); the same report is written
    again only when the Lease is due for renewal (here an hour): each write costs the API server, etcd
    and a reconcile of the Workflow (50 workers writing the same report every 2 s: 25 writes a second)."""
    from kubernetes_asyncio import client

    from syncplane.contract.report import WorkerReport
    from syncplane.worker.platform.kubernetes import LeaseHeartbeat

    host, answers = api_server
    reports = _lease_reports(answers)
    report = WorkerReport("wf", 0, 1)
    stop = asyncio.Event()
    beat = LeaseHeartbeat("ns", "wf-0", "wf", report, interval=0.01, renew=3600,
                          api_client=client.ApiClient(client.Configuration(host=host)))
    task = asyncio.ensure_future(beat.run(stop))
    try:
        await eventually(lambda: _at_least(reports, 1), "the first beat")
        for _ in range(3):
            change(report)
            expected = report.to_json()
            expected.pop("records_per_second")

            async def carried(expected: dict[str, Any] = expected) -> bool:
                return any({k: v for k, v in r.items() if k != "records_per_second"} == expected for r in reports)

            await eventually(carried, lambda: f"a beat with the change: {reports}")
        assert all(a != b for a, b in itertools.pairwise(reports)), reports
        assert not task.done()
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await beat.close(remove=False)


async def _at_least(reports: list[dict[str, Any]], n: int) -> bool:
    return len(reports) >= n


async def test_heartbeat_renews_an_unchanged_report_at_the_renew_period(api_server):
    """Liveness: a report that never changes is still written every renew period (here 0.02 s)."""
    from kubernetes_asyncio import client

    from syncplane.contract.report import WorkerReport
    from syncplane.worker.platform.kubernetes import LeaseHeartbeat

    host, answers = api_server
    reports = _lease_reports(answers)
    stop = asyncio.Event()
    beat = LeaseHeartbeat("ns", "wf-0", "wf", WorkerReport("wf", 0, 1), interval=0.01, renew=0.02,
                          api_client=client.ApiClient(client.Configuration(host=host)))
    task = asyncio.ensure_future(beat.run(stop))
    try:
        await eventually(lambda: _at_least(reports, 3), lambda: f"three renewals: {reports}")
        assert not task.done()
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await beat.close(remove=False)


# -- held records keep no credential, in either store --------------------------------------------

SECRET_PAYLOAD = {"id": "e1", "email": "a@example.com", "api_key": "s3cr3t-value", "password": "hunter2-value"}


async def test_held_records_in_configmaps_keep_no_credential(api_server):
    """The ConfigMap a held record is written to (here: the body the API server receives) carries
    credential-named fields redacted, as dead letters do; the re-sent record leaves them out."""
    from kubernetes_asyncio import client

    from syncplane.state.kube_records import ConfigMapRecords

    host, answers = api_server
    bodies: list[str] = []

    async def capture(request: web.Request) -> web.Response:
        text = await request.text()
        if request.method == "GET":
            return _status(404, "NotFound")
        bodies.append(text)
        return web.Response(status=201, text=text or "{}", content_type="application/json")

    answers.append(capture)
    async with client.ApiClient(client.Configuration(host=host)) as api:
        await ConfigMapRecords("ns", api_client=api).ahold("wf", "event", "e1", SECRET_PAYLOAD, 404, "no contact")
    assert bodies and not any("s3cr3t-value" in b or "hunter2-value" in b for b in bodies)
    assert any("a@example.com" in b for b in bodies)


def test_held_records_in_sqlite_keep_no_credential(tmp_path):
    from syncplane.state.sqlite import SqliteWorkerState
    from syncplane.worker.pipeline import held_record

    path = tmp_path / "worker-state.db"
    held = SqliteWorkerState(path)
    try:
        held.hold("wf", "event", "e1", SECRET_PAYLOAD, 404, "no contact")
        [h] = held.all("wf", "event")
    finally:
        held.close()
    raw = path.read_bytes() + (path.with_name(path.name + "-wal").read_bytes()
                               if path.with_name(path.name + "-wal").exists() else b"")
    assert b"s3cr3t-value" not in raw and b"hunter2-value" not in raw
    assert held_record(h.key, h.payload).values == {"id": "e1", "email": "a@example.com"}
