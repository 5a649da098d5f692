"""The console's HTTP application (aiohttp.web): thin handlers over syncplane.service.

Every page is server-rendered HTML that works without JavaScript; each also answers JSON
(``Accept: application/json``, or the /api/ twin), and console.js adds live updates from
``GET /events``, a server-sent event stream fed by the store's watch (each event's id is the
store revision, so the browser's automatic reconnect resumes from the last one it saw).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import yaml
from aiohttp import web
from google.protobuf import field_mask_pb2

from syncplane.api.server import BindError, ServerSecurity, check_bind
from syncplane.console import present, spec_form
from syncplane.console.auth import RESULT, SESSION_COOKIE, ConsoleAuth, Handler, refuse, wants_html
from syncplane.console.errors import error_body
from syncplane.console.history import Sample, SampleRing
from syncplane.errors import FieldViolation, InvalidArgument, OutOfRange, SyncplaneError
from syncplane.lifecycle.drift import drift_diff
from syncplane.model.convert import from_resource, spec_from_dict, spec_to_dict
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.service import WorkflowService
from syncplane.service.dead_letters import DeadLetterService
from syncplane.validation.names import workflow_name

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
KEEPALIVE = 15.0          # seconds between SSE comments, so proxies and browsers keep the stream open
DEAD_LETTER_PAGE = 20     # records per page on the workflow page

SERVICE: web.AppKey[WorkflowService] = web.AppKey("service", WorkflowService)
LETTERS: web.AppKey[DeadLetterService] = web.AppKey("letters", DeadLetterService)
AUTH: web.AppKey[ConsoleAuth] = web.AppKey("auth", ConsoleAuth)
HISTORY: web.AppKey[SampleRing] = web.AppKey("history", SampleRing)
TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("templates", jinja2.Environment)
STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams")


@dataclass(frozen=True)
class ConsoleConfig:
    """Where the console listens ("127.0.0.1:7444"; port 0 picks one) and its security,
    the API's own (a non-loopback address needs TLS and a token)."""

    address: str = "127.0.0.1:7444"
    security: ServerSecurity = field(default_factory=ServerSecurity)


def create_console(service: WorkflowService, dead_letters: DeadLetterService | None = None,
                   security: ServerSecurity | None = None, history: SampleRing | None = None) -> web.Application:
    security = security or ServerSecurity()
    shared = security.tls_key.read_bytes() if security.tls and security.tls_key else b""
    auth = ConsoleAuth(security.token, security.tls, security.callers, shared_secret=shared)
    app = web.Application(middlewares=[auth.middleware, _errors])
    app[SERVICE] = service
    app[LETTERS] = dead_letters or DeadLetterService(service.store, None)
    app[AUTH] = auth
    app[HISTORY] = history or SampleRing()
    app[TEMPLATES] = template_env()
    app[STREAMS] = set()
    app.cleanup_ctx.append(_follow_history)
    app.on_shutdown.append(_end_streams)
    r = app.router
    r.add_get("/", workflows_page)
    r.add_get("/api/workflows", workflows_json)
    r.add_get("/events", events)
    r.add_get("/login", login_page)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/new", new_page)
    r.add_post("/new", create)
    r.add_get("/workflows/{id}", workflow_page)
    r.add_get("/api/workflows/{id}", workflow_json)
    r.add_get("/workflows/{id}/edit", edit_page)
    r.add_post("/workflows/{id}/edit", save)
    r.add_post("/workflows/{id}/delete", delete)
    r.add_post("/workflows/{id}/replay", replay)
    r.add_get("/workflows/{id}/deadletters", dead_letters_json)
    r.add_post("/workflows/{id}/deadletters/retry", retry_dead_letters)
    for verb in ("start", "stop", "restart"):
        r.add_post(f"/workflows/{{id}}/{verb}", lifecycle)
    r.add_static("/static", HERE / "static", append_version=True)
    return app


def template_env() -> jinja2.Environment:
    """The pages' templates (autoescaped; an undefined name is an error, not an empty string)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["tojson_attr"] = lambda v: json.dumps(v, separators=(",", ":"))
    return env


async def start_console(app: web.Application, config: ConsoleConfig) -> tuple[web.AppRunner, int]:
    """Bind and serve; returns the runner (``await runner.cleanup()`` stops it) and the port.

    Raises:
        InsecureBindError: a non-loopback address without TLS and a token (as for gRPC).
    """
    check_bind(config.address, config.security)
    context = None
    if config.security.tls:
        assert config.security.tls_cert and config.security.tls_key
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(config.security.tls_cert, config.security.tls_key)
    host, _, port = config.address.rpartition(":")
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=context)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def serve_console(config: ConsoleConfig | None, service: WorkflowService, letters: DeadLetterService,
                        port_file: Path | None = None) -> tuple[web.AppRunner, str] | None:
    """Start the web console if configured: (its runner, its URL); writes its port to `port_file`.

    Raises:
        InsecureBindError: a non-loopback address without TLS and a token.
        BindError: the address cannot be bound (in use, or not an address of this host).
    """
    if config is None:
        return None
    try:
        runner, port = await start_console(create_console(service, letters, config.security), config)
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise BindError(f"cannot listen on {config.address} for the console: {why} "
                        "(another `syncplane up`?); choose another with --console-listen") from exc
    if port_file:   # written whole, then renamed: a reader never sees it empty
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)
    return runner, console_url(config, port)


def announce_console(url: str) -> None:
    """The URL a user opens: logged, and printed on stdout (`make run` shows it)."""
    log.info("web console: %s", url)
    print(f"syncplane console: {url}", flush=True)


def console_url(config: ConsoleConfig, port: int) -> str:
    host = config.address.rpartition(":")[0]
    return f"{'https' if config.security.tls else 'http'}://{host}:{port}/"


# --- errors ----------------------------------------------------------------------------------

@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Domain errors as JSON (for the page's script) or as the page with a message."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        if not isinstance(exc, SyncplaneError):
            log.exception("unexpected error in %s %s", request.method, request.path)
        status, body = error_body(exc)
        request[RESULT] = body["code"]
        if wants_html(request):
            return _render(request, "error.html", {"error": body}, status=status)
        return web.json_response(body, status=status)


# --- pages -----------------------------------------------------------------------------------

def _render(request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
    auth = request.app[AUTH]
    page = request.app[TEMPLATES].get_template(template).render(
        csrf=auth.csrf_token(request), signed_in=auth.sign_in, own_tokens=auth.own_tokens, phases=present.PHASES,
        **context)
    return web.Response(text=page, content_type="text/html", status=status)


def _id(request: web.Request) -> str:
    return request.match_info["id"]


async def _all_workflows(service: WorkflowService) -> list[pb.Workflow]:
    rows: list[pb.Workflow] = []
    token = ""
    while True:
        resp = await service.list(svc.ListWorkflowsRequest(page_size=1000, page_token=token))
        rows.extend(resp.workflows)
        token = resp.next_page_token
        if not token:
            return rows


async def workflows_page(request: web.Request) -> web.StreamResponse:
    if not wants_html(request):
        return await workflows_json(request)
    rows = [present.row(wf) for wf in await _all_workflows(request.app[SERVICE])]
    return _render(request, "workflows.html", {"rows": rows, "message": request.query.get("message", "")})


async def workflows_json(request: web.Request) -> web.Response:
    return web.json_response({"workflows": [present.row(wf) for wf in await _all_workflows(request.app[SERVICE])]})


async def _detail(request: web.Request) -> dict[str, Any]:
    service = request.app[SERVICE]
    wf = await service.get(_id(request))
    applied = await service.store.get_applied(wf.name)
    data = present.detail(wf, drift_diff(applied, wf.spec) if applied is not None and wf.status.drift.detected
                          else [])
    data["history"] = [[s.time, s.backlog, s.records_per_second] for s in request.app[HISTORY].samples(data["id"])]
    return data


async def workflow_page(request: web.Request) -> web.StreamResponse:
    if not wants_html(request):
        return await workflow_json(request)
    return _render(request, "workflow.html", {"wf": await _detail(request),
                                              "message": request.query.get("message", "")})


async def workflow_json(request: web.Request) -> web.Response:
    return web.json_response(await _detail(request))


# --- lifecycle -------------------------------------------------------------------------------

async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type == "application/json":
        return {k: str(v) for k, v in (await request.json()).items()}
    return {k: str(v) for k, v in (await request.post()).items()}


async def lifecycle(request: web.Request) -> web.StreamResponse:
    """POST /workflows/{id}/start|stop|restart with ``expected_phase`` (STOPPED, RUNNING, …) and/or
    ``etag``: the service refuses (FAILED_PRECONDITION / ABORTED) if either moved on, so a double
    click cannot flip twice."""
    verb = request.path.rsplit("/", 1)[-1]
    form = await _form(request)
    expected = form.get("expected_phase", "")
    args: dict[str, Any] = {"name": workflow_name(_id(request)), "etag": form.get("etag", ""),
                            "expected_phase": pb.Phase.Value(f"PHASE_{expected}") if expected in present.PHASES else 0}
    service = request.app[SERVICE]
    try:
        if verb == "start":
            wf = await service.start(svc.StartWorkflowRequest(**args))
        elif verb == "stop":
            wf = await service.stop(svc.StopWorkflowRequest(**args))
        else:
            wf = await service.restart(svc.RestartWorkflowRequest(**args))
    except SyncplaneError as exc:
        return _outcome(request, exc, form)
    return _outcome(request, None, form, {"row": present.row(wf)}, f"{verb} requested for {_id(request)}")


def _outcome(request: web.Request, exc: SyncplaneError | None, form: dict[str, str],
             body: dict[str, Any] | None = None, message: str = "") -> web.StreamResponse:
    """JSON for the script; for a plain form post, back to the page it came from with the message."""
    if exc is not None:
        status, body = error_body(exc)
        request[RESULT] = body["code"]
        message = body["message"]
    else:
        status = 200
    if wants_html(request):
        back = form.get("back", "/")
        back = back if back.startswith("/") and not back.startswith("//") else "/"
        raise web.HTTPSeeOther(f"{back.split('?')[0]}?{_query(message=message)}")
    return web.json_response({**(body or {}), "message": message}, status=status)


def _query(**params: str) -> str:
    from urllib.parse import urlencode
    return urlencode(params)


# --- live updates ----------------------------------------------------------------------------

async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``change`` events with ``{"type": "ADDED|MODIFIED|DELETED", "revision": n,
    "row": present.row(...)}``, id = revision. Resumes after ``Last-Event-ID`` (sent by the
    browser on reconnect) or ``?since=``; a revision the store no longer has gives a ``reset``
    event (the page reloads). ``?name=`` follows one workflow (the workflow page), and its events
    also carry ``"live": present.live(...)`` (conditions, last error, workers, counters, tables)."""
    service = request.app[SERVICE]
    since_text = request.headers.get("Last-Event-ID") or request.query.get("since", "0")
    since = int(since_text) if since_text.isdigit() else 0
    name = request.query.get("name", "")
    watch = service.watch(svc.WatchWorkflowsRequest(start_revision=since,
                                                    name=workflow_name(name) if name else ""))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1000)

    async def pump() -> None:
        try:
            async for change in watch:
                data = {"type": svc.ChangeType.Name(svc.ChangeType.ValueType(change.type)).removeprefix(
                    "CHANGE_TYPE_"), "revision": change.revision, "row": present.row(change.workflow)}
                if name:   # the workflow page: its conditions, counters, workers and tables too
                    data["live"] = present.live(change.workflow)
                await queue.put(f"id: {change.revision}\nevent: change\ndata: {json.dumps(data)}\n\n".encode())
        except OutOfRange:
            await queue.put(b"event: reset\ndata: {}\n\n")

    task = asyncio.create_task(pump())
    this = asyncio.current_task()
    assert this is not None
    request.app[STREAMS].add(this)
    try:
        while not task.done() or not queue.empty():
            try:
                chunk = await asyncio.wait_for(queue.get(), KEEPALIVE)
            except TimeoutError:
                chunk = b": keepalive\n\n"
            await response.write(chunk)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        request.app[STREAMS].discard(this)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return response


async def _end_streams(app: web.Application) -> None:
    """At shutdown, end the open event streams (they never end by themselves); the browsers
    reconnect to the next server and resume from their last revision."""
    streams: set[asyncio.Task[Any]] = app[STREAMS]
    for task in list(streams):
        task.cancel()


async def _follow_history(app: web.Application) -> AsyncIterator[None]:
    """Fill the sample ring from the watch for as long as the console runs."""
    async def follow() -> None:
        while True:
            try:
                async for change in app[SERVICE].watch(svc.WatchWorkflowsRequest()):
                    wid = present.workflow_id(change.workflow)
                    if change.type == svc.CHANGE_TYPE_DELETED:
                        app[HISTORY].forget(wid)
                        continue
                    s = change.workflow.status
                    app[HISTORY].add(wid, Sample(time.time(), s.backlog, round(s.counters.records_per_second, 1)))
            except asyncio.CancelledError:
                raise
            except Exception:   # a lost watch (API server restart, compaction): follow again
                log.warning("console history watch ended; following again", exc_info=True)
            await asyncio.sleep(1.0)

    task = asyncio.create_task(follow())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- login -----------------------------------------------------------------------------------

async def login_page(request: web.Request) -> web.StreamResponse:
    return _render(request, "login.html", {"next": request.query.get("next", "/"), "error": ""})


async def login(request: web.Request) -> web.StreamResponse:
    auth = request.app[AUTH]
    form = await request.post()
    target = str(form.get("next", "/"))
    target = target if target.startswith("/") and not target.startswith("//") else "/"
    if not auth.sign_in:
        raise web.HTTPSeeOther(target)
    offered = str(form.get("token", ""))
    if not await auth.check_token(offered):
        error = "The API server does not accept that token." if auth.own_tokens else "That token is not the server's."
        return _render(request, "login.html", {"next": target, "error": error}, status=401)
    response = web.HTTPSeeOther(target)
    auth.set_session(response, offered)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


# --- edit, create, delete --------------------------------------------------------------------

TEMPLATES_DIR = HERE.parent / "defaults"


ENUMS = {"kinds": spec_form.enum_names(pb.ConnectorKind), "combinators": spec_form.enum_names(pb.FilterCombinator),
         "operators": spec_form.enum_names(pb.FilterOperator),
         "directions": spec_form.enum_names(pb.OptInOutDirection)}


def _edit(request: web.Request, wf: dict[str, Any], spec: pb.WorkflowSpec, *, create: bool = False,
          running: bool = False, spec_yaml: str | None = None, errors: list[dict[str, str]] | None = None,
          conflict: bool = False, mode: str = "form", status: int = 200) -> web.Response:
    return _render(request, "edit.html", {
        "wf": wf, "spec": spec_form.spec_view(spec), "enums": ENUMS, "create": create, "running": running,
        "spec_yaml": spec_yaml if spec_yaml is not None else _spec_yaml(spec), "errors": errors or [],
        "conflict": conflict, "mode": mode}, status=status)


def _spec_yaml(spec: pb.WorkflowSpec) -> str:
    data = spec_to_dict(spec)
    for key in ("desiredState", "restartNonce"):
        data.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False)


async def edit_page(request: web.Request) -> web.StreamResponse:
    wf = await request.app[SERVICE].get(_id(request))
    return _edit(request, present.row(wf), wf.spec, running=wf.status.phase != pb.PHASE_STOPPED)


async def _submitted_spec(request: web.Request) -> tuple[dict[str, str], pb.WorkflowSpec | SyncplaneError]:
    """The form's fields and the spec it carries: from the YAML tab's text (``mode=yaml``; JSON is
    YAML too) or from the path-named inputs."""
    post = await request.post()
    form = {k: str(v) for k, v in post.items()}
    try:
        if form.get("mode") == "yaml":
            return form, _parse_spec(form.get("spec", ""))
        return form, spec_form.spec_from_form((k, str(v)) for k, v in post.items())
    except SyncplaneError as exc:
        return form, exc


def _parse_spec(text: str) -> pb.WorkflowSpec:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InvalidArgument([FieldViolation("spec", f"is not valid YAML: {exc}")]) from exc
    if not isinstance(data, dict):
        raise InvalidArgument([FieldViolation("spec", "must be a mapping")])
    return spec_from_dict(data)


def _violations(body: dict[str, Any]) -> list[dict[str, str]]:
    return body["fieldViolations"] or [{"field": "", "description": body["message"]}]


async def save(request: web.Request) -> web.StreamResponse:
    """UpdateWorkflow with the page's etag and a whole-spec mask; violations come back with
    their field paths (the page puts each next to its field); an etag mismatch (ABORTED)
    says someone else changed the workflow and offers a reload."""
    service = request.app[SERVICE]
    form, parsed = await _submitted_spec(request)
    wf = pb.Workflow(name=workflow_name(_id(request)), etag=form.get("etag", ""))
    try:
        if isinstance(parsed, SyncplaneError):
            raise parsed
        wf.spec.CopyFrom(parsed)
        updated = await service.update(svc.UpdateWorkflowRequest(
            workflow=wf, update_mask=field_mask_pb2.FieldMask(paths=["spec"])))
    except SyncplaneError as exc:
        status, body = error_body(exc)
        if not wants_html(request):
            return web.json_response(body, status=status)
        current = await service.get(_id(request))
        return _edit(request, {**present.row(current), "etag": form.get("etag", "")},
                     wf.spec if not isinstance(parsed, SyncplaneError) else current.spec,
                     running=current.status.phase != pb.PHASE_STOPPED, spec_yaml=form.get("spec"),
                     errors=_violations(body), conflict=body["code"] == "ABORTED",
                     mode=form.get("mode", "form"), status=status)
    running = updated.status.phase != pb.PHASE_STOPPED
    message = "Saved." + (" The change applies at the next start." if running else "")
    if wants_html(request):
        raise web.HTTPSeeOther(f"/workflows/{_id(request)}?{_query(message=message)}")
    return web.json_response({"row": present.row(updated), "message": message})


def _template(kind: str) -> pb.Workflow:
    """The default workflow of that type (server/syncplane/defaults) as a starting point."""
    for path in sorted(TEMPLATES_DIR.glob("*.yaml")):
        _, wf = from_resource(yaml.safe_load(path.read_text()))
        if present.row(wf)["type"] == kind:
            return wf
    return pb.Workflow()


async def new_page(request: web.Request) -> web.StreamResponse:
    kind = request.query.get("type", "INGRESS")
    return _edit(request, {"id": "", "etag": "", "type": kind}, _template(kind).spec, create=True)


async def create(request: web.Request) -> web.StreamResponse:
    """CreateWorkflow (stopped) from the form or the YAML tab."""
    form, parsed = await _submitted_spec(request)
    wid = form.get("workflow_id", "")
    wf = pb.Workflow()
    try:
        if isinstance(parsed, SyncplaneError):
            raise parsed
        wf.spec.CopyFrom(parsed)
        wf.spec.desired_state = pb.DESIRED_STATE_STOPPED
        created = await request.app[SERVICE].create(svc.CreateWorkflowRequest(workflow_id=wid, workflow=wf))
    except SyncplaneError as exc:
        status, body = error_body(exc)
        if not wants_html(request):
            return web.json_response(body, status=status)
        return _edit(request, {"id": wid, "etag": "", "type": form.get("type", "")}, wf.spec, create=True,
                     spec_yaml=form.get("spec"), errors=_violations(body), mode=form.get("mode", "form"),
                     status=status)
    if wants_html(request):
        raise web.HTTPSeeOther(f"/workflows/{present.workflow_id(created)}?{_query(message='Created (stopped).')}")
    return web.json_response({"row": present.row(created)})


async def delete(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    try:
        await request.app[SERVICE].delete(svc.DeleteWorkflowRequest(
            name=workflow_name(_id(request)), etag=form.get("etag", ""), force=form.get("force") in ("on", "true")))
    except SyncplaneError as exc:
        return _outcome(request, exc, {**form, "back": f"/workflows/{_id(request)}"})
    return _outcome(request, None, {"back": "/"}, {"deleted": _id(request)}, f"deleted {_id(request)}")


async def replay(request: web.Request) -> web.StreamResponse:
    """Re-read one source table at the next start (UpdateWorkflow of spec.ingress.replay, as the
    CLI's `replay`); the service refuses at 2,000,000 records of backlog or table size."""
    form = await _form(request)
    wf = pb.Workflow(name=workflow_name(_id(request)))
    wf.spec.ingress.replay.source_table = form.get("table", "")
    wf.spec.ingress.replay.request_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    try:
        await request.app[SERVICE].update(svc.UpdateWorkflowRequest(
            workflow=wf, update_mask=field_mask_pb2.FieldMask(paths=["spec.ingress.replay"])))
    except SyncplaneError as exc:
        return _outcome(request, exc, {**form, "back": f"/workflows/{_id(request)}"})
    return _outcome(request, None, {**form, "back": f"/workflows/{_id(request)}"}, {},
                    f"table {form.get('table', '')} will be read again at the next start (restart to apply now)")


# --- dead letters ----------------------------------------------------------------------------

async def dead_letters_json(request: web.Request) -> web.Response:
    resp = await request.app[LETTERS].list(svc.ListDeadLettersRequest(
        parent=workflow_name(_id(request)), page_size=DEAD_LETTER_PAGE,
        page_token=request.query.get("page_token", "")))
    return web.json_response({
        "total": resp.total_size, "nextPageToken": resp.next_page_token,
        "deadLetters": [{"stream": d.stream, "key": d.key, "error": d.error, "httpStatus": d.http_status,
                         "attempts": d.attempts, "firstSeen": present.iso(d.first_seen_time),
                         "lastSeen": present.iso(d.last_seen_time), "retryPending": d.retry_pending}
                        for d in resp.dead_letters]})


async def retry_dead_letters(request: web.Request) -> web.StreamResponse:
    """Mark the selected keys (form field ``keys``, repeated; none = all) for retry."""
    if request.content_type == "application/json":
        keys = [str(k) for k in (await request.json()).get("keys", [])]
    else:
        keys = [str(k) for k in (await request.post()).getall("keys", [])]
    try:
        resp = await request.app[LETTERS].retry(svc.RetryDeadLettersRequest(parent=workflow_name(_id(request)),
                                                                           keys=keys))
    except SyncplaneError as exc:
        return _outcome(request, exc, {"back": f"/workflows/{_id(request)}"})
    return _outcome(request, None, {"back": f"/workflows/{_id(request)}"}, {"marked": resp.marked_count},
                    f"{resp.marked_count} dead letters marked for retry at the workers' next pass")


__all__ = ["ConsoleConfig", "announce_console", "console_url", "create_console", "refuse", "serve_console",
           "start_console"]
