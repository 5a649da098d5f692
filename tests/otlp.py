"""An OTLP/gRPC receiver run by a test (issue 17): built on the `opentelemetry-proto` package's
collector service stubs, it keeps every span, every metric name by service, and every exported
attribute value (resource, span, data point), for the secret scan. Used by the embedded test
(tests/integration/test_otlp.py) and the Kubernetes one (tests/k8s/test_otlp_kubernetes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as msvc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as msvc_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsvc_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def export_env(endpoint: str) -> dict[str, str]:
    """The environment that makes a syncplane process export to ``endpoint`` quickly (metrics every
    0.5 s, spans batched for 0.2 s)."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_METRIC_EXPORT_INTERVAL": "500", "OTEL_BSP_SCHEDULE_DELAY": "200"}


def _value(v: common_pb2.AnyValue) -> str:
    kind = v.WhichOneof("value")
    if kind in ("array_value", "kvlist_value"):
        return str(v)
    return str(getattr(v, kind)) if kind else ""


def _attrs(kvs: Any) -> dict[str, str]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclass
class Span:
    service: str
    span: trace_pb2.Span

    @property
    def attributes(self) -> dict[str, str]:
        return _attrs(self.span.attributes)


@dataclass
class Received:
    spans: list[Span] = field(default_factory=list)
    metrics: dict[str, set[str]] = field(default_factory=dict)  # service.name → metric names
    attribute_values: list[tuple[str, str]] = field(default_factory=list)  # every exported (key, value)

    def keep(self, resource: Any) -> str:
        attributes = _attrs(resource.attributes)
        self.attribute_values.extend(attributes.items())
        return attributes.get("service.name", "")


class Traces(tsvc_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    async def Export(self, request: tsvc.ExportTraceServiceRequest, context: Any) -> tsvc.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            service = self.received.keep(rs.resource)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    self.received.spans.append(Span(service, span))
                    self.received.attribute_values.extend(_attrs(span.attributes).items())
                    self.received.attribute_values.append(("span.name", span.name))
        return tsvc.ExportTraceServiceResponse()


class Metrics(msvc_grpc.MetricsServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    async def Export(self, request: msvc.ExportMetricsServiceRequest,
                     context: Any) -> msvc.ExportMetricsServiceResponse:
        for rm in request.resource_metrics:
            service = self.received.keep(rm.resource)
            names = self.received.metrics.setdefault(service, set())
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    names.add(metric.name)
                    data = getattr(metric, metric.WhichOneof("data") or "gauge")
                    for point in data.data_points:
                        self.received.attribute_values.extend(_attrs(point.attributes).items())
        return msvc.ExportMetricsServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, Received]]:
    received = Received()
    server = grpc.aio.server()
    tsvc_grpc.add_TraceServiceServicer_to_server(Traces(received), server)
    msvc_grpc.add_MetricsServiceServicer_to_server(Metrics(received), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}", received
    finally:
        await server.stop(0)


def by_id(spans: list[Span]) -> dict[bytes, Span]:
    return {s.span.span_id: s for s in spans}


def ancestors(span: Span, index: dict[bytes, Span]) -> list[Span]:
    out = []
    while span.span.parent_span_id and span.span.parent_span_id in index:
        span = index[span.span.parent_span_id]
        out.append(span)
    return out



def assert_no_secret(received: Received, secrets: set[str]) -> None:
    """No exported attribute holds one of ``secrets``, a bearer header, an access token or a query string."""
    for key, value in received.attribute_values:
        assert "Bearer" not in value and "access_token" not in value, key
        assert not any(s in value for s in secrets), key
        assert "?" not in value, (key, value)  # no query string (filters, keys)
