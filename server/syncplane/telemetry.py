"""OpenTelemetry setup for every syncplane process (server, worker, operator).

Traces go over OTLP when an endpoint is configured, and nowhere otherwise (the SDK provider
still creates spans for context). Metrics are always readable in the Prometheus text format
(:func:`prometheus_exposition`, served at ``/metrics``) and are pushed over OTLP as well when an
endpoint is configured. The endpoint is the argument, else the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` environment variable; the export interval of metrics is the SDK's
``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds, default 60000).

Why the OpenTelemetry metrics SDK and its Prometheus exporter rather than ``prometheus-client``
alone: one set of instruments (:mod:`syncplane.metrics`) then reaches both a Prometheus scrape and an
OTLP collector, with OpenTelemetry semantic-convention names (``http.client.request.duration``
becomes ``http_client_request_duration_seconds`` in the exposition); the exporter renders the
text with ``prometheus-client`` itself, so nothing here writes exposition text by hand.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)
_configured = False
_metrics_lock = threading.Lock()
_meter_provider: MeterProvider | None = None
_registry: Any = None  # prometheus_client.CollectorRegistry of this process's metrics


def otlp_endpoint(endpoint: str | None = None) -> str | None:
    """The OTLP/gRPC endpoint to export to: ``endpoint``, else ``OTEL_EXPORTER_OTLP_ENDPOINT``; None: none."""
    return endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def _resource(service_name: str, attributes: dict[str, str] | None = None) -> Resource:
    return Resource.create({"service.name": service_name, **(attributes or {})})


def setup_tracing(service_name: str, endpoint: str | None = None,
                  attributes: dict[str, str] | None = None) -> TracerProvider:
    """The process's tracer provider (made once), exporting over OTLP when there is an endpoint."""
    global _configured, _tracing
    provider = trace.get_tracer_provider()
    if _configured and isinstance(provider, TracerProvider):
        return provider
    provider = TracerProvider(resource=_resource(service_name, attributes))
    endpoint = otlp_endpoint(endpoint)
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info("exporting traces over OTLP to %s", endpoint)
    trace.set_tracer_provider(provider)
    _configured = _tracing = True  # spans are recorded from the next request on
    return provider


def setup_metrics(service_name: str, endpoint: str | None = None,
                  attributes: dict[str, str] | None = None) -> MeterProvider:
    """The process's meter provider (made once): a Prometheus reader for ``/metrics``, plus a periodic
    OTLP exporter when there is an endpoint (see :func:`otlp_endpoint`)."""
    global _meter_provider, _registry
    with _metrics_lock:
        if _meter_provider is not None:
            return _meter_provider
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        _registry = CollectorRegistry()
        readers: list[MetricReader] = [PrometheusMetricReader(registry=_registry, scope_info_enabled=False)]
        endpoint = otlp_endpoint(endpoint)
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint)))
            log.info("exporting metrics over OTLP to %s", endpoint)
        # No exemplars: nothing reads them, and they cost a third of a histogram's record().
        _meter_provider = MeterProvider(resource=_resource(service_name, attributes), metric_readers=readers,
                                        exemplar_filter=AlwaysOffExemplarFilter())
        metrics.set_meter_provider(_meter_provider)
        return _meter_provider


def prometheus_exposition() -> tuple[bytes, str]:
    """This process's metrics in the Prometheus text format, and its content type.

    Raises:
        RuntimeError: before :func:`setup_metrics`.
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if _registry is None:
        raise RuntimeError("setup_metrics() has not run in this process")
    return generate_latest(_registry), CONTENT_TYPE_LATEST


def serve_metrics(address: str) -> int:
    """Serve ``/metrics`` on ``host:port`` (port 0: any free one) from a background thread
    (``prometheus_client``'s own server), for processes without an HTTP server of their own
    (the API server, the operator). Returns the port.

    Raises:
        RuntimeError: before :func:`setup_metrics`.
        OSError: when the address cannot be bound.
    """
    from prometheus_client import start_http_server

    if _registry is None:
        raise RuntimeError("setup_metrics() has not run in this process")
    host, _, port = address.rpartition(":")
    server, _thread = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=_registry)
    bound = int(server.server_address[1])
    log.info("serving /metrics on %s:%d", host or "0.0.0.0", bound)
    return bound


_tracing = False
_unchecked = 0  # calls of tracing() left before it asks OpenTelemetry again


def tracing() -> bool:
    """Whether spans go anywhere: a tracer provider is set. Until one is, OpenTelemetry's API hands
    out a no-op tracer, whose spans record nothing and still cost the attributes and context built
    around them: code on a per-request path asks this first and skips that work.

    True as soon as :func:`setup_tracing` has run (every syncplane process sets its provider there)
    and from then on (a provider is set at most once per process). A provider set another way (an
    application embedding the connectors, a test, ``OTEL_PYTHON_TRACER_PROVIDER``) is noticed within
    256 calls: asking OpenTelemetry costs an environment lookup (``trace.get_tracer_provider()``,
    about 2.5 µs against 0.14 µs for this call), too much for every request. A flag that only
    :func:`setup_tracing` sets would be simpler and never notice such a provider (test:
    tests/unit/test_request_path_caches.py sets one directly)."""
    global _tracing, _unchecked
    if _tracing:
        return True
    _unchecked -= 1
    if _unchecked < 0:
        _unchecked = 255
        _tracing = not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
    return _tracing


def current_trace_parent() -> str:
    """The W3C ``traceparent`` of the current span; empty when there is none (not traced)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent", "")


def span_context_of(trace_parent: str) -> trace.SpanContext | None:
    """The remote span context a ``traceparent`` names; None when it is empty or malformed."""
    if not trace_parent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": trace_parent})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def shutdown() -> None:
    """Flush what the OTLP exporters hold (spans, the last metrics): at a process's orderly exit."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
    if _meter_provider is not None:
        _meter_provider.shutdown()
