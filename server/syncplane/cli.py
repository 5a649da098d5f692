"""The `syncplane` command line. Everything except `up` and `worker` talks to
the control plane over gRPC only."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import grpc
import yaml
from google.protobuf import field_mask_pb2, timestamp_pb2

from syncplane.client import CleartextTokenError, ClientConfig, describe_error, stub, violation_lines
from syncplane.errors import InvalidArgument, SyncplaneError
from syncplane.model.convert import from_resource, message_to_dict, to_resource
from syncplane.proto.enums import enum_short_name, phase_name
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.validation.names import workflow_name
from syncplane.worker.command import worker

if TYPE_CHECKING:
    from syncplane.runtime.embedded import Companion


def _client(ctx: click.Context) -> Any:
    return stub(ctx.obj)


def _emit(resource: Any, output: str) -> None:
    """Print a dict as JSON or YAML. Build it with `to_resource`/`message_to_dict`, never proto
    JSON, so every `-o json|yaml` has the same shapes: int64 as numbers, short enum names."""
    if output == "json":
        click.echo(json.dumps(resource, indent=2))
    else:
        click.echo(yaml.safe_dump(resource, sort_keys=False).rstrip())


def _age(wf: pb.Workflow) -> str:
    if not wf.HasField("create_time"):
        return "-"
    secs = int((datetime.now(UTC) - wf.create_time.ToDatetime(tzinfo=UTC)).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def degraded_mark(status: pb.WorkflowStatus) -> str:
    """The DEGRADED column: why the workflow is not keeping up (or in ERROR), else '-'."""
    if status.phase == pb.PHASE_ERROR:
        return status.last_error.reason or "ERROR"  # (describe shows the automatic restarts)
    return status.degradation.reason or "-"


def table_row(wf: pb.Workflow) -> list[str]:
    return [wf.name.split("/", 1)[-1], enum_short_name(pb.WorkflowType.DESCRIPTOR, wf.spec.type),
            enum_short_name(pb.DesiredState.DESCRIPTOR, wf.spec.desired_state), phase_name(wf.status.phase),
            degraded_mark(wf.status), str(wf.status.backlog), "yes" if wf.status.drift.detected else "no",
            str(wf.status.dead_letters), _age(wf)]


def format_table(rows: list[list[str]],
                 header: tuple[str, ...] = ("NAME", "TYPE", "DESIRED", "PHASE", "DEGRADED", "BACKLOG", "DRIFT",
                                            "DEADLETTERS", "AGE")) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


@click.group()
@click.option("--server", envvar="SYNCPLANE_ADDRESS", default="127.0.0.1:7443", show_default=True,
              help="Control-plane gRPC address.")
@click.option("--token", envvar="SYNCPLANE_TOKEN", default=None,
              help="Bearer token; prefer SYNCPLANE_TOKEN or --token-file (a flag shows in the process list).")
@click.option("--token-file", envvar="SYNCPLANE_TOKEN_FILE", type=click.Path(exists=True, path_type=Path),
              default=None, help="File holding the bearer token (or SYNCPLANE_TOKEN_FILE).")
@click.option("--ca-file", envvar="SYNCPLANE_CA_FILE", type=click.Path(path_type=Path), default=None,
              help="CA bundle; enables TLS.")
@click.option("--plaintext", envvar="SYNCPLANE_PLAINTEXT", is_flag=True, default=False,
              help="Send the token without TLS to a server that is not on loopback (it travels in clear text).")
@click.pass_context
def cli(ctx: click.Context, server: str, token: str | None, token_file: Path | None, ca_file: Path | None,
        plaintext: bool) -> None:
    """syncplane: keep Dynamics 365 and Adobe Campaign Standard in sync."""
    if token is not None and ctx.get_parameter_source("token") == click.core.ParameterSource.COMMANDLINE:
        click.echo("warning: --token shows in the process list; prefer SYNCPLANE_TOKEN or --token-file", err=True)
    if token_file is not None:
        from syncplane.private_files import ExposedFileError, check_private

        try:
            check_private(token_file, "token file")
        except ExposedFileError as exc:
            raise click.ClickException(str(exc)) from None
        token = token_file.read_text().strip()
    ctx.obj = ClientConfig(address=server, token=token, ca_file=ca_file, plaintext=plaintext)


REFLECTION = click.option("--reflection/--no-reflection", default=True, show_default=True,
                          help="Serve gRPC server reflection (generic clients such as grpcurl list the API).")


def _serving(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options `up` and `server` share: the console, the log level, reflection."""
    for option in reversed([
        click.option("--console/--no-console", "console", default=True, show_default=True,
                     help="Serve the web console (the Workflows page) next to gRPC."),
        click.option("--console-listen", default="127.0.0.1:7444", show_default=True,
                     help="The console's address; off loopback it needs TLS and a token, like gRPC."),
        click.option("--console-port-file", type=click.Path(path_type=Path),
                     help="Write the console's bound port here."),
        click.option("--log-level", default="INFO", show_default=True),
        REFLECTION,
    ]):
        command = option(command)
    return command


def _server_security(tls_cert: Path | None, tls_key: Path | None, token_file: Path | None,
                     reflection: bool) -> Any:
    """The server's TLS, token and exposure settings; a TLS key or token file other users can
    read is refused (as ssh refuses a private key), naming the file and the fix."""
    from syncplane.api.server import ServerSecurity
    from syncplane.private_files import ExposedFileError, check_private

    try:
        if tls_key is not None:
            check_private(tls_key, "TLS key")
        if token_file is not None:
            check_private(token_file, "token file")
    except ExposedFileError as exc:
        raise click.ClickException(str(exc)) from None
    token = token_file.read_text().strip() if token_file else os.environ.get("SYNCPLANE_SERVER_TOKEN")
    return ServerSecurity(tls_cert=tls_cert, tls_key=tls_key, token=token or None, reflection=reflection)


@cli.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path(".syncplane"), show_default=True)
@click.option("--listen", default="127.0.0.1:7443", show_default=True)
@click.option("--tls-cert", type=click.Path(exists=True, path_type=Path))
@click.option("--tls-key", type=click.Path(exists=True, path_type=Path))
@click.option("--token-file", type=click.Path(exists=True, path_type=Path),
              help="File holding the bearer token clients must send (or SYNCPLANE_SERVER_TOKEN).")
@click.option("--defaults/--no-defaults", default=True, show_default=True,
              help="Create the three default workflows (stopped) if absent.")
@click.option("--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT", default=None)
@click.option("--metrics-listen", default=None,
              help="host:port to serve this process's /metrics on (Prometheus text); default: not served.")
@click.option("--port-file", type=click.Path(path_type=Path), help="Write the bound port here.")
@click.option("--stop-timeout", type=float, default=30.0, show_default=True)
@click.option("--crash-limit", type=int, default=5, show_default=True)
@click.option("--crash-window", type=float, default=120.0, show_default=True)
@click.option("--backoff-base", type=float, default=0.5, show_default=True)
@click.option("--orphan-timeout", type=float, default=30.0, show_default=True)
@click.option("--degraded-after", type=float, default=60.0, show_default=True,
              help="Seconds a transient failure or a stalled backlog lasts before the workflow is Degraded.")
@click.option("--restart-backoff", type=float, default=5.0, show_default=True,
              help="Seconds before the first automatic restart of an ERROR from outside the spec (doubling).")
@click.option("--restart-backoff-cap", type=float, default=300.0, show_default=True,
              help="The longest wait between automatic restarts, in seconds.")
@_serving
@click.option("--worker-memory-limit", type=int, default=2048, show_default=True,
              help="MiB: each worker process's data segment limit (RLIMIT_DATA).")
def up(data_dir: Path, listen: str, tls_cert: Path | None, tls_key: Path | None, token_file: Path | None,
       defaults: bool, otlp_endpoint: str | None, metrics_listen: str | None, port_file: Path | None,
       stop_timeout: float,
       crash_limit: int, crash_window: float, backoff_base: float, orphan_timeout: float, degraded_after: float,
       restart_backoff: float, restart_backoff_cap: float, console: bool,
       console_listen: str, console_port_file: Path | None, log_level: str, reflection: bool,
       worker_memory_limit: int, companion: Companion | None = None) -> None:
    """Run the embedded control plane (SQLite + local worker processes) and its web console.

    ``companion``: something run beside it, never a command-line option (the sandbox package's
    ``syncplane-sandbox-up`` calls this with its emulators; the product never imports them).
    """
    from syncplane.api.server import InsecureBindError
    from syncplane.console import ConsoleConfig
    from syncplane.lifecycle import Policy
    from syncplane.runtime.embedded import EmbeddedConfig, serve
    from syncplane.runtime.supervisor import SupervisorConfig

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    security = _server_security(tls_cert, tls_key, token_file, reflection)
    config = EmbeddedConfig(
        data_dir=data_dir, address=listen, security=security,
        console=ConsoleConfig(console_listen, security) if console else None, console_port_file=console_port_file,
        supervisor=SupervisorConfig(stop_timeout=stop_timeout, crash_limit=crash_limit,
                                    crash_window=crash_window, backoff_base=backoff_base,
                                    orphan_timeout=orphan_timeout,
                                    policy=Policy(degraded_after=degraded_after, restart_backoff=restart_backoff,
                                                  restart_backoff_cap=restart_backoff_cap),
                                    worker_memory_limit=worker_memory_limit * 1024 ** 2),
        with_defaults=defaults, otlp_endpoint=otlp_endpoint, metrics_address=metrics_listen, port_file=port_file,
        companion=companion)
    try:
        asyncio.run(serve(config))
    except InsecureBindError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command()
@click.option("--backend", type=click.Choice(["embedded", "kubernetes"]), default="embedded", show_default=True)
@click.option("--namespace", envvar="POD_NAMESPACE", default="default", show_default=True,
              help="Kubernetes backend: where the Workflow resources live.")
@click.option("--listen", default="127.0.0.1:7443", show_default=True)
@click.option("--tls-cert", type=click.Path(exists=True, path_type=Path))
@click.option("--tls-key", type=click.Path(exists=True, path_type=Path))
@click.option("--token-file", type=click.Path(exists=True, path_type=Path))
@click.option("--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT", default=None)
@click.option("--metrics-listen", default=None,
              help="host:port to serve this process's /metrics on (Prometheus text); default: not served.")
@click.option("--port-file", type=click.Path(path_type=Path))
@_serving
@click.option("--auth", type=click.Choice(["kubernetes", "token"]), default="kubernetes", show_default=True,
              help="Kubernetes backend: callers send their own Kubernetes token (TokenReview + "
                   "SubjectAccessReview on workflows), or the shared --token-file token.")
@click.pass_context
def server(ctx: click.Context, backend: str, namespace: str, listen: str, tls_cert: Path | None,
           tls_key: Path | None, token_file: Path | None, otlp_endpoint: str | None, metrics_listen: str | None,
           port_file: Path | None, console: bool, console_listen: str, console_port_file: Path | None, log_level: str,
           reflection: bool, auth: str) -> None:
    """Run the gRPC API server; `--backend kubernetes` serves Workflow custom resources."""
    if backend == "embedded":
        ctx.invoke(up, listen=listen, tls_cert=tls_cert, tls_key=tls_key, token_file=token_file,
                   otlp_endpoint=otlp_endpoint, metrics_listen=metrics_listen, port_file=port_file, console=console,
                   console_listen=console_listen,
                   console_port_file=console_port_file, log_level=log_level, reflection=reflection)
        return
    from syncplane.api.server import InsecureBindError
    from syncplane.console import ConsoleConfig
    from syncplane.runtime.kubernetes import KubernetesServerConfig, serve_kubernetes

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    security = _server_security(tls_cert, tls_key, token_file, reflection)
    config = KubernetesServerConfig(namespace=namespace, address=listen, otlp_endpoint=otlp_endpoint,
                                    metrics_address=metrics_listen,
                                    security=security, port_file=port_file, auth=auth,
                                    console=ConsoleConfig(console_listen, security) if console else None,
                                    console_port_file=console_port_file)
    try:
        asyncio.run(serve_kubernetes(config))
    except InsecureBindError as exc:
        raise click.ClickException(str(exc)) from exc


@cli.command(name="operator")
@click.option("--namespace", "namespaces", multiple=True, help="Watch these namespaces (default: all).")
@click.option("--standalone", is_flag=True, help="No peering: for a single replica or tests.")
@click.option("--liveness", default="http://0.0.0.0:8081/healthz", show_default=True)
@click.option("--otlp-endpoint", envvar="OTEL_EXPORTER_OTLP_ENDPOINT", default=None)
@click.option("--metrics-listen", default=None,
              help="host:port to serve the operator's /metrics on (Prometheus text); default: not served.")
def operator_(namespaces: tuple[str, ...], standalone: bool, liveness: str, otlp_endpoint: str | None,
              metrics_listen: str | None) -> None:
    """Run the Kubernetes operator reconciling Workflow resources into worker Deployments."""
    import kopf

    import syncplane_operator.handlers as handlers  # (registers the handlers)
    from syncplane import telemetry
    from syncplane.startup import startup_line

    telemetry.setup_tracing("syncplane-operator", otlp_endpoint)
    telemetry.setup_metrics("syncplane-operator", otlp_endpoint)
    if metrics_listen:
        telemetry.serve_metrics(metrics_listen)

    kopf.configure(verbose=False)
    liveness = free_port_for(liveness)
    logging.getLogger("syncplane.operator").info(startup_line(
        "operator", listen=liveness, backend="kubernetes", namespaces=list(namespaces),
        metrics=metrics_listen or "off", resync=f"{handlers.resync_from_environment():g}s",
        leader_election="on" if os.environ.get("SYNCPLANE_LEADER_ELECTION_LEASE") else "off"))
    kopf.run(standalone=standalone, namespaces=list(namespaces), clusterwide=not namespaces,
             liveness_endpoint=liveness)


def free_port_for(url: str) -> str:
    """``url`` with port 0 (any free port) replaced by a free port of its host. kopf's health endpoint reads
    a port of 0 as none and binds 80 (an operator then fails to start wherever port 80 is taken, and two
    operators with ``:0`` on one machine collide). Found by binding port 0 once, then released: another
    process could take it in between, as with any port given on the command line."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if parts.port != 0 or not parts.hostname:
        return url
    with socket.socket(socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET) as sock:
        sock.bind((parts.hostname, 0))
        port = sock.getsockname()[1]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{host}:{port}"))


cli.add_command(worker)


@cli.command("verify-job", hidden=True)
@click.option("--workflow", required=True)
@click.option("--namespace", envvar="POD_NAMESPACE", required=True)
@click.option("--workflow-uid", default="", help="The Workflow's uid, owner of what the Job creates.")
@click.option("--spec-file", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--secrets-dir", type=click.Path(path_type=Path), required=True,
              help="The referenced Secrets, a directory each (mounted as the workers' are).")
@click.option("--request", "request_json", required=True, help="The request: JSON {id, samples, repair}.")
@click.option("--running", is_flag=True, help="The workers run: what they have not written yet is in flight.")
def verify_job(workflow: str, namespace: str, workflow_uid: str, spec_file: Path, secrets_dir: Path,
               request_json: str, running: bool) -> None:
    """Run one `syncplane verify` on Kubernetes (the operator's verify Job) and write its outcome."""
    from syncplane.verify.kube import VerifyRequest, run_job
    from syncplane.worker.main import configure_logging

    request = VerifyRequest.parse(request_json)
    if request is None:
        raise click.ClickException("--request is not a verify request (JSON {id, samples, repair})")
    configure_logging(None)
    sys.exit(asyncio.run(run_job(workflow, namespace, workflow_uid, spec_file, secrets_dir, request, running)))


def _documents(path: str) -> list[Any]:
    """Every non-empty YAML document of the file (or stdin), all parsed before any is applied, within
    the bounds of syncplane.model.documents (size, depth, aliases: no alias bomb hangs the CLI).

    Raises:
        OSError: the file cannot be read.
        click.ClickException: it is not YAML, or exceeds a bound (the message says which).
    """
    from syncplane.model.documents import MAX_BYTES, DocumentError, load_documents

    where = "stdin" if path == "-" else path
    if path == "-":
        text = sys.stdin.buffer.read(MAX_BYTES + 1)
    else:
        with open(path, "rb") as f:
            text = f.read(MAX_BYTES + 1)
    try:
        return list(load_documents(text))
    except DocumentError as exc:
        raise click.ClickException(f"{where}: {exc}") from None


@cli.command()
@click.option("-f", "--filename", required=True, help="YAML file with one or more Workflows ('-' for stdin).")
@click.pass_context
def apply(ctx: click.Context, filename: str) -> None:
    """Create or update workflows from YAML (the lifecycle is not changed on update)."""
    client = _client(ctx)
    for doc in _documents(filename):
        workflow_id, wf = from_resource(doc)
        try:
            client.CreateWorkflow(svc.CreateWorkflowRequest(workflow_id=workflow_id, workflow=wf))
            click.echo(f"workflow/{workflow_id} created")
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            wf.name = workflow_name(workflow_id)
            client.UpdateWorkflow(svc.UpdateWorkflowRequest(
                workflow=wf, update_mask=field_mask_pb2.FieldMask(paths=["labels", "spec"])))
            click.echo(f"workflow/{workflow_id} configured")


@cli.command()
@click.argument("name")
@click.option("-o", "--output", type=click.Choice(["yaml", "json", "table"]), default="table")
@click.pass_context
def get(ctx: click.Context, name: str, output: str) -> None:
    """Show one workflow."""
    wf = _client(ctx).GetWorkflow(svc.GetWorkflowRequest(name=workflow_name(name)))
    if output == "table":
        click.echo(format_table([table_row(wf)]))
    else:
        _emit(to_resource(wf), output)


def _every_page(call: Callable[[Any], Any], req: Any, items: str) -> list[Any]:
    """Every item of a List call (AIP-158): ``call(req)`` page after page, following ``next_page_token``
    (written into ``req``), each page's repeated field ``items`` in order."""
    found: list[Any] = []
    while True:
        resp = call(req)
        found.extend(getattr(resp, items))
        if not resp.next_page_token:
            return found
        req.page_token = resp.next_page_token


@cli.command(name="list")
@click.option("-o", "--output", type=click.Choice(["yaml", "json", "table"]), default="table")
@click.option("--type", "types", multiple=True, type=click.Choice(["INGRESS", "EGRESS", "OPT_IN_OUT"]))
@click.option("--phase", "phases", multiple=True,
              type=click.Choice(["STOPPED", "STARTING", "RUNNING", "STOPPING", "ERROR"]))
@click.pass_context
def list_(ctx: click.Context, output: str, types: tuple[str, ...], phases: tuple[str, ...]) -> None:
    """List workflows: NAME TYPE DESIRED PHASE DEGRADED BACKLOG DRIFT DEADLETTERS AGE."""
    client = _client(ctx)
    req = svc.ListWorkflowsRequest(page_size=500, types=[pb.WorkflowType.Value(f"WORKFLOW_TYPE_{t}") for t in types],
                                   phases=[pb.Phase.Value(f"PHASE_{p}") for p in phases])
    workflows: list[pb.Workflow] = _every_page(client.ListWorkflows, req, "workflows")
    if output == "table":
        click.echo(format_table([table_row(wf) for wf in workflows]))
    else:
        _emit({"apiVersion": "v1", "kind": "List", "items": [to_resource(wf) for wf in workflows]}, output)


def _when(ts: timestamp_pb2.Timestamp) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def describe_text(wf: pb.Workflow) -> str:
    s = wf.status
    c = s.counters
    since = s.phase_time.ToDatetime(tzinfo=UTC).isoformat() if s.HasField("phase_time") else "-"
    degraded = (f"{s.degradation.reason} since {_when(s.degradation.time)}: {s.degradation.message}"
                if s.degradation.reason else "no")
    restarts = "-"
    if s.HasField("auto_restart"):
        restarts = f"{s.auto_restart.count} made" + (
            f", next at {_when(s.auto_restart.next_restart_time)}" if s.auto_restart.HasField("next_restart_time")
            else "")
    lines = [
        f"Name:         {wf.name.split('/', 1)[-1]}",
        f"Type:         {enum_short_name(pb.WorkflowType.DESCRIPTOR, wf.spec.type)}",
        f"Desired:      {enum_short_name(pb.DesiredState.DESCRIPTOR, wf.spec.desired_state)}",
        f"Phase:        {phase_name(s.phase)} (since {since})",
        f"Generation:   {wf.generation} (observed {s.observed_generation}, applied {s.applied_generation})",
        f"Workers:      {s.ready_workers}/{s.desired_workers} ready",
        f"Backlog:      {s.backlog}",
        # Each record read is in exactly one of these (the workers' accounting).
        f"Records:      read {c.read} = written {c.written} + deleted {c.deleted} + filtered {c.filtered} "
        f"+ dead-lettered {c.dead_lettered} + held {c.held} + failed (read again) {c.failed} + backlog {s.backlog}",
        f"Re-sent:      {c.resent} (held records and dead letters written later)",
        f"Rate:         {c.records_per_second:.1f} records/s",
        f"Concurrency:  {_concurrency(s)}",
        f"Degraded:     {degraded}",
        f"Last error:   {f'{s.last_error.reason}: {s.last_error.message}' if s.last_error.reason else '-'}",
        f"Restarts:     {restarts} (automatic, for errors outside the spec)",
        f"Tables:       {', '.join(_table(t) for t in s.tables) or '-'}",
        f"Dead letters: {s.dead_letters}" + (" (syncplane deadletters list|retry)" if s.dead_letters else ""),
        f"Last verify:  {_last_verify(s.last_verify) if s.HasField('last_verify') else '-'}",
    ]
    if s.drift.detected:
        lines.append("Drift:        restart required; edited since the last start:")
        lines.extend(f"  ~ {path}" for path in s.drift.changed_fields)
    else:
        lines.append("Drift:        none")
    lines.append("Conditions:")
    lines.append(f"  {'TYPE':<10} {'STATUS':<7} {'REASON':<22} MESSAGE")
    lines.extend(f"  {c.type:<10} {c.status:<7} {c.reason:<22} {c.message}" for c in s.conditions)
    return "\n".join(lines)


def _concurrency(s: pb.WorkflowStatus) -> str:
    """``source 16/16, destination 8/52 requests in flight`` (allowed now / at most), or ``-``."""
    sides = [f"{side} {c.limit}/{c.max}" for side, c in (("source", s.source_concurrency),
                                                       ("destination", s.destination_concurrency)) if c.max]
    return f"{', '.join(sides)} requests in flight (now/at most, adaptive)" if sides else "-"


def _table(t: pb.TableRows) -> str:
    """``contact 2000 rows``, with ``(3 stale: not at the source, deletes off)`` when some are."""
    return f"{t.source_table} {t.rows} rows" + (f" ({t.stale} stale: not at the source, deletes off)"
                                                 if t.stale else "")


def _last_verify(v: pb.VerifyResult) -> str:
    c = v.counts
    return (f"{_when(v.verify_time)}: {c.compared} compared, {c.missing} missing, {c.extra} extra, "
            f"{c.different} different ({c.in_flight} in flight)")


@cli.command()
@click.argument("name")
@click.pass_context
def describe(ctx: click.Context, name: str) -> None:
    """Show a workflow's phase, drift diff, last error and conditions."""
    click.echo(describe_text(_client(ctx).GetWorkflow(svc.GetWorkflowRequest(name=workflow_name(name)))))


_PHASES = ["STOPPED", "STARTING", "RUNNING", "STOPPING", "ERROR"]
_LIFECYCLE = (
    ("start", "StartWorkflow", svc.StartWorkflowRequest, "Start a workflow: STOPPED/ERROR -> STARTING -> RUNNING."),
    ("stop", "StopWorkflow", svc.StopWorkflowRequest, "Stop a workflow: drain in-flight batches, then STOPPED."),
    ("restart", "RestartWorkflow", svc.RestartWorkflowRequest,
     "Stop then start, applying the latest spec (clears drift)."),
)


def _lifecycle_command(verb: str, method: str, request_type: Any, doc: str) -> None:
    @cli.command(name=verb, help=doc)
    @click.argument("name")
    @click.option("--expect-phase", type=click.Choice(_PHASES), help="Refuse unless the workflow is in this phase.")
    @click.option("--etag", default="", help="Refuse unless the etag still matches.")
    @click.pass_context
    def command(ctx: click.Context, name: str, expect_phase: str | None, etag: str) -> None:
        phase = pb.Phase.Value(f"PHASE_{expect_phase}") if expect_phase else pb.PHASE_UNSPECIFIED
        request = request_type(name=workflow_name(name), etag=etag, expected_phase=phase)
        wf = getattr(_client(ctx), method)(request)
        click.echo(f"workflow/{name} {verb} requested (phase {phase_name(wf.status.phase)})")


for _verb, _method, _request, _doc in _LIFECYCLE:
    _lifecycle_command(_verb, _method, _request, _doc)


@cli.command()
@click.argument("name")
@click.option("--table", required=True, help="The source table to read again, e.g. contact.")
@click.pass_context
def replay(ctx: click.Context, name: str, table: str) -> None:
    """Re-sync one whole table at the next start (refused at 2,000,000 records or more)."""
    wf = pb.Workflow(name=workflow_name(name))
    wf.spec.ingress.replay.source_table = table
    wf.spec.ingress.replay.request_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    _client(ctx).UpdateWorkflow(svc.UpdateWorkflowRequest(
        workflow=wf, update_mask=field_mask_pb2.FieldMask(paths=["spec.ingress.replay"])))
    click.echo(f"workflow/{name} will replay table {table} at its next start (restart to apply now)")


@cli.group()
def deadletters() -> None:
    """Records the destination rejected: list them, send them again."""


@deadletters.command(name="list")
@click.argument("name")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table")
@click.pass_context
def deadletters_list(ctx: click.Context, name: str, output: str) -> None:
    """List a workflow's dead letters: key, HTTP status, reason, attempts, times (and payload with -o)."""
    client = _client(ctx)
    req = svc.ListDeadLettersRequest(parent=workflow_name(name), page_size=1000)
    letters: list[svc.DeadLetter] = _every_page(client.ListDeadLetters, req, "dead_letters")
    if output != "table":
        _emit({"items": [message_to_dict(d) for d in letters]}, output)
        return
    if not letters:
        click.echo(f"workflow/{name} has no dead letters")
        return
    rows = [[d.stream, d.key, str(d.http_status), str(d.attempts), _when(d.first_seen_time), _when(d.last_seen_time),
             "pending" if d.retry_pending else "-", d.error.replace("\n", " ")] for d in letters]
    click.echo(format_table(rows, ("STREAM", "KEY", "STATUS", "ATTEMPTS", "FIRST SEEN", "LAST SEEN", "RETRY",
                                   "ERROR")))


@deadletters.command(name="retry")
@click.argument("name")
@click.option("--key", "keys", multiple=True, help="Only this record key (repeatable); default: all.")
@click.pass_context
def deadletters_retry(ctx: click.Context, name: str, keys: tuple[str, ...]) -> None:
    """Send dead letters again: the workers re-send them at their next pass; the accepted ones go away."""
    resp = _client(ctx).RetryDeadLetters(svc.RetryDeadLettersRequest(parent=workflow_name(name), keys=list(keys)))
    click.echo(f"workflow/{name}: {resp.marked_count} dead letter(s) marked for retry "
               "(sent again at the workers' next pass)")


def verify_text(name: str, resp: svc.VerifyWorkflowResponse) -> str:
    """The text report of a VerifyWorkflow answer: a line of totals, a row per stream, sample keys."""
    c, r = resp.result.counts, resp.result
    verdict = "in sync" if not (c.missing or c.extra or c.different) else "DIFFERENCES"
    lines = [f"workflow/{name}: {verdict}: {c.compared} compared, {c.missing} missing, {c.extra} extra, "
             f"{c.different} different ({c.in_flight} in flight), {c.foreign} foreign, {c.held} held; "
             f"{r.requests} requests"]
    rows = [[s.stream, f"{s.source} -> {s.destination}", str(s.counts.compared), str(s.counts.missing),
             str(s.counts.extra), str(s.counts.different), str(s.counts.in_flight), str(s.counts.foreign),
             str(s.counts.held), str(s.queued) if r.repair_requested else "-"] for s in resp.streams]
    lines.append(format_table(rows, ("STREAM", "SIDES", "COMPARED", "MISSING", "EXTRA", "DIFFERENT", "IN FLIGHT",
                                     "FOREIGN", "HELD", "QUEUED")))
    for s in resp.streams:
        for kind, keys in (("missing", s.missing_keys), ("extra", s.extra_keys), ("different", s.different_keys),
                           ("in flight", s.in_flight_keys)):
            if keys:
                lines.append(f"{s.stream} {kind}: {', '.join(keys)}")
    if r.repair_requested:
        lines.append(f"queued {sum(s.queued for s in resp.streams)} record(s) for the workers' next pass")
    return "\n".join(lines)


@cli.command()
@click.argument("name")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table")
@click.option("--samples", type=click.IntRange(0, 1000), default=10, show_default=True,
              help="Sample keys shown per kind of difference and stream.")
@click.option("--repair", is_flag=True, help="Queue the differences for the workers' next pass.")
@click.pass_context
def verify(ctx: click.Context, name: str, output: str, samples: int, repair: bool) -> None:
    """Compare source and destination, read-only: missing, extra and different records."""
    resp = _client(ctx).VerifyWorkflow(svc.VerifyWorkflowRequest(name=workflow_name(name), sample_size=samples,
                                                                  repair=repair), timeout=3600)
    if output == "table":
        click.echo(verify_text(name, resp))
    else:
        _emit(message_to_dict(resp), output)


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even while workers run.")
@click.pass_context
def delete(ctx: click.Context, name: str, force: bool) -> None:
    """Delete a workflow (refused while it runs, unless --force)."""
    _client(ctx).DeleteWorkflow(svc.DeleteWorkflowRequest(name=workflow_name(name), force=force))
    click.echo(f"workflow/{name} deleted")


@cli.command()
@click.argument("name", required=False)
@click.option("--from-revision", type=int, default=0, help="Resume after this revision.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def watch(ctx: click.Context, name: str | None, from_revision: int, output: str) -> None:
    """Stream workflow changes as they happen."""
    req = svc.WatchWorkflowsRequest(start_revision=from_revision, name=workflow_name(name) if name else "")
    if output == "table":
        click.echo(watch_line(WATCH_HEADER))
    for event in _client(ctx).WatchWorkflows(req):
        kind = enum_short_name(svc.ChangeType.DESCRIPTOR, event.type)
        if output == "json":
            click.echo(json.dumps({"type": kind, "revision": event.revision,
                                   "object": to_resource(event.workflow)}))
        else:
            click.echo(watch_line([str(event.revision), kind, *table_row(event.workflow)[:8]]))


# Columns of `watch`: fixed widths, since rows arrive one by one (a name longer than its column
# pushes the rest of its row right).
WATCH_HEADER = ["REVISION", "CHANGE", "NAME", "TYPE", "DESIRED", "PHASE", "DEGRADED", "BACKLOG", "DRIFT",
                "DEADLETTERS"]
_WATCH_WIDTHS = [8, 8, 24, 10, 7, 8, 23, 7, 5, 11]


def watch_line(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, _WATCH_WIDTHS, strict=True)).rstrip()


def error_text(exc: BaseException) -> str:
    """What the CLI prints for a failure, after `error: `: one line (plus one line per field
    violation). Never a traceback: an unexpected exception is named by its type and message."""
    if isinstance(exc, grpc.RpcError):
        return describe_error(exc)
    if isinstance(exc, CleartextTokenError):
        return str(exc)
    if isinstance(exc, InvalidArgument):
        return "\n".join(violation_lines([(v.field, v.description) for v in exc.violations]))
    if isinstance(exc, SyncplaneError):
        return exc.message
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror or exc}" if exc.filename else " ".join(str(exc).split())
    if isinstance(exc, RuntimeError) and type(exc).__module__.startswith("syncplane"):
        return str(exc)   # our own start-up refusals (BindError, InsecureBindError) say what to do
    if isinstance(exc, yaml.YAMLError):
        return "not valid YAML: " + " ".join(str(exc).split())
    return f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())}"

