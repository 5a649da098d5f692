"""The metric instruments of every syncplane process, in one place (worker, server, operator).

Names follow the OpenTelemetry semantic conventions where one exists (``http.client.request.duration``
with ``http.request.method``, ``server.address``, ``server.port``, ``http.response.status_code``,
``error.type``, ``url.template``; ``rpc.server.call.duration``) and are ``syncplane.``-prefixed elsewhere.
The Prometheus exposition turns dots into underscores and adds the unit and ``_total`` suffixes
(``syncplane.records.read`` → ``syncplane_records_read_total``).

Labels: ``workflow`` and ``worker`` (its index) on a worker's series, ``link`` (``source``,
``destination``) on its concurrency; ``vendor`` (``dynamics365``,
``campaign``, ``entra_id``, ``adobe_ims``, ``other``) on vendor requests. Never a URL's query, a
key value or a secret: the endpoint is a template (``/api/data/v9.2/contacts({key})``).

Cost: the record counters are observed from the worker's :class:`~syncplane.contract.report.WorkerReport`
when a reader collects (a scrape, an OTLP export), so the per-record path pays nothing; the HTTP
instruments record once per request (a batch of up to 1,000 records), never per record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from syncplane.contract.report import WorkerReport

#: The workflow the code runs for (a worker sets it; tasks inherit it): the ``workflow`` label of
#: its vendor requests. Empty outside a worker (the server's verify, the operator).
WORKFLOW: ContextVar[str] = ContextVar("syncplane_workflow", default="")

_meter = metrics.get_meter("syncplane")

#: Seconds; the semantic conventions' advice for HTTP durations.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

# -- vendor requests (connectors.http, in every process) --------------------------------------------
http_client_duration = _meter.create_histogram(
    "http.client.request.duration", unit="s", description="Duration of HTTP client requests (each attempt).",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
http_client_retries = _meter.create_counter(
    "syncplane.http.client.retries", unit="{retry}",
    description="Vendor requests sent again, by reason: throttled (429, or 5xx with Retry-After), "
                "server_error (5xx), connection (refused, dropped, timed out).")
http_client_throttled = _meter.create_counter(
    "syncplane.http.client.throttled", unit="{response}",
    description="HTTP 429 (Too Many Requests) answers from a vendor.")

# -- the API server ---------------------------------------------------------------------------------
rpc_server_duration = _meter.create_histogram(
    "rpc.server.call.duration", unit="s", description="Duration of gRPC calls served.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS)

# -- the operator -----------------------------------------------------------------------------------
reconcile_duration = _meter.create_histogram(
    "syncplane.operator.reconcile.duration", unit="s", description="Duration of a Workflow's reconcile, by outcome.",
    explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
reconciles = _meter.create_counter(
    "syncplane.operator.reconciles", unit="{reconcile}", description="Reconciles of Workflows, by outcome.")


def workflow_attributes(workflow: str | None = None) -> dict[str, str]:
    """``{"workflow": ...}`` for the current :data:`WORKFLOW` (or ``workflow``); empty outside a workflow."""
    name = workflow if workflow is not None else WORKFLOW.get()
    return {"workflow": name} if name else {}


# -- a worker's records, observed from its report -----------------------------------------------------
#: Counter name (after ``syncplane.records.``) → the Counters field it observes, and its description.
RECORD_COUNTERS: dict[str, tuple[str, str]] = {
    "read": ("read", "Records read from the source."),
    "written": ("written", "Records acknowledged by the destination (upserts)."),
    "deleted": ("deleted", "Deletes acknowledged by the destination."),
    "filtered": ("filtered", "Records read that needed no write (filter, event type off, nothing changed)."),
    "dead_lettered": ("dead_lettered", "Records sent to the dead-letter store."),
    "held": ("held", "Records held until what they point at exists."),
    "failed": ("failed", "Records read by a pass that failed before writing them (read again next pass)."),
    "resent": ("resent", "Held records and dead letters re-sent and acknowledged."),
}


def observe_worker(report: WorkerReport) -> None:
    """Register the observable instruments of a worker process, read from ``report`` at each
    collection (labels ``workflow`` and ``worker``). Call once per process."""

    def labels() -> dict[str, str]:
        return {"workflow": report.workflow, "worker": str(report.index)}

    def counter(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return lambda _: [Observation(getattr(report.counters, field), labels())]

    def value(get: Callable[[], float]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        return lambda _: [Observation(get(), labels())]

    for name, (field, description) in RECORD_COUNTERS.items():
        _meter.create_observable_counter(f"syncplane.records.{name}", [counter(field)], unit="{record}",
                                         description=description)
    _meter.create_observable_gauge("syncplane.backlog", [value(lambda: report.backlog)], unit="{record}",
                                   description="Records read and not yet written (queued and in flight).")
    _meter.create_observable_gauge("syncplane.throughput", [value(report.rate.per_second)], unit="{record}/s",
                                   description="Records written per second over the last 10 seconds.")
    _meter.create_observable_gauge("syncplane.worker.ready", [value(lambda: int(report.ready))],
                                   description="1 when the worker is connected and syncing.")
    _meter.create_observable_gauge("syncplane.worker.generation", [value(lambda: report.generation)],
                                   description="The workflow generation this worker runs.")
    _meter.create_observable_gauge("syncplane.held_records", [value(lambda: report.held)], unit="{record}",
                                   description="Records waiting for what they point at (e.g. a contact).")
    _meter.create_observable_gauge(
        "syncplane.dead_letters", [lambda _: [Observation(report.dead_letters, labels())]
                                   if report.dead_letters >= 0 else []],
        unit="{record}", description="Records of this workflow waiting in the dead-letter store.")
    _meter.create_observable_gauge("syncplane.records.stale", [value(lambda: sum(report.stale.values()))],
                                   unit="{record}", description="Records the source no longer has, left at the "
                                                                "destination (deletes off).")
    _meter.create_observable_counter("syncplane.records.stale_deleted", [value(lambda: report.stale_deleted)],
                                     unit="{record}", description="Records the source no longer had, deleted "
                                                                  "after a full read.")
    _meter.create_observable_counter("syncplane.values.truncated", [value(lambda: report.truncated)],
                                     unit="{value}", description="Values cut to the destination's field length.")
    def concurrency(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            # A link is a connectors.http.LinkHealth in the worker, or its fields as a dict.
            for link, health in list(report.links.items()):
                fields = health if isinstance(health, Mapping) else vars(health)
                if int(fields.get("max_concurrency") or 0) > 0:
                    yield Observation(int(fields.get(field) or 0), {**labels(), "link": link})
        return observe

    _meter.create_observable_gauge(
        "syncplane.concurrency.limit", [concurrency("concurrency")], unit="{request}",
        description="Requests in flight allowed now on a link (source, destination): the adaptive (AIMD) "
                    "limit, at most syncplane.concurrency.max.")
    _meter.create_observable_gauge(
        "syncplane.concurrency.max", [concurrency("max_concurrency")], unit="{request}",
        description="The most requests in flight on a link: the spec's maxConcurrency (or its default).")
    _meter.create_observable_counter("syncplane.resyncs", [value(lambda: report.resyncs)], unit="{resync}",
                                     description="Full reads forced by an expired delta token.")
