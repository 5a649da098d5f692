"""Issue 17 item 4: a worker's /metrics, made by the OpenTelemetry SDK and its Prometheus exporter,
parsed by prometheus-client's own parser; names follow the OpenTelemetry semantic conventions where one
exists and are syncplane-prefixed elsewhere; no label holds a query, a key or a secret."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from syncplane.runtime.processes import read_port
from syncplane.validation.spec import max_concurrency
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.backends import eventually
from tests.embedded_plane import CRASH_TOLERANT, ControlPlane
from tests.integration.ingress_env import converge, ingress_spec, prepare, profiles_match
from tests.integration.test_ingress import start

pytestmark = pytest.mark.supervisor(CRASH_TOLERANT)

#: The semantic-convention metrics a worker exports (Prometheus names of the OTel instruments).
SEMCONV = {"http_client_request_duration_seconds"}
#: Families the Prometheus exporter adds about the process (resource and scope).
EXPORTER = {"target_info", "otel_scope_info"}
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


def families(text: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Metric], name: str, suffix: str = "") -> float:
    return sum(s.value for s in fams[name].samples if s.name == name + suffix)


@pytest.mark.timeout(300)
async def test_worker_metrics_parse_and_follow_the_conventions(plane: ControlPlane) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=300, seed=3))
    try:
        prepare(sb, plane.data_dir)
        # A few throttled answers: the 429s and retries are counted by vendor.
        sb.faults.acs.queue(429, 2, 1)
        await start(plane, "metered", ingress_spec(sb, batch_size=100))
        await converge(lambda: profiles_match(sb), 120, "the first load of 300 contacts")
        port = read_port(plane.supervisor.groups["metered"].procs[0], plane.supervisor.state_dir)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async def settled() -> bool:
                fams = families((await http.get("/metrics")).text)
                return "syncplane_records_written" in fams and (
                    value(fams, "syncplane_records_written", "_total") >= 300)

            await eventually(settled, "the worker's counters to show the 300 records written")
            response = await http.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        fams = families(response.text)

        # Names: syncplane-prefixed, or a semantic convention's, or the exporter's own.
        for name in fams:
            assert name.startswith("syncplane_") or name in SEMCONV | EXPORTER, name
        wanted = {"syncplane_records_read": "counter", "syncplane_records_written": "counter",
                  "syncplane_records_filtered": "counter", "syncplane_records_dead_lettered": "counter",
                  "syncplane_backlog": "gauge", "syncplane_throughput_per_second": "gauge",
                  "syncplane_http_client_retries": "counter", "syncplane_http_client_throttled": "counter",
                  "syncplane_concurrency_limit": "gauge", "syncplane_concurrency_max": "gauge",
                  "http_client_request_duration_seconds": "histogram"}
        for name, kind in wanted.items():
            assert name in fams, f"{name} missing from {sorted(fams)}"
            assert fams[name].type == kind, (name, fams[name].type)

        # The record counters add up, per workflow and worker.
        read = [s for s in fams["syncplane_records_read"].samples if s.name.endswith("_total")]
        assert [s.labels for s in read] == [{"workflow": "metered", "worker": "0"}]
        assert read[0].value >= 300
        assert value(fams, "syncplane_backlog") == 0

        # Concurrency per link: the AIMD limit now (the 429s above cut the destination's), never above the
        # maximum, which is the spec's (its default here).
        limits = {s.labels["link"]: s.value for s in fams["syncplane_concurrency_limit"].samples}
        maxima = {s.labels["link"]: s.value for s in fams["syncplane_concurrency_max"].samples}
        spec = ingress_spec(sb, batch_size=100)
        assert maxima == {"source": max_concurrency(spec.source), "destination": max_concurrency(spec.destination)}
        for link, limit in limits.items():
            assert 1 <= limit <= maxima[link], (link, limit, maxima)
        assert set(limits) == set(maxima)
        assert {s.labels["workflow"] for s in fams["syncplane_concurrency_limit"].samples} == {"metered"}

        # Vendor requests: semantic-convention attributes, by vendor and endpoint template.
        http_samples = [s for s in fams["http_client_request_duration_seconds"].samples if s.name.endswith("_count")]
        keys = {(s.labels["vendor"], s.labels["url_template"], s.labels["http_request_method"],
                 s.labels.get("http_response_status_code")) for s in http_samples}
        assert ("dynamics365", "/api/data/v9.2/contacts", "GET", "200") in keys, keys
        assert any(v == "campaign" and t.startswith("/{organization}/campaign/") for v, t, _, _ in keys), keys
        assert any(v == "campaign" and code == "429" for v, _, _, code in keys), keys
        for s in http_samples:
            assert s.labels["server_address"] == "127.0.0.1" and s.labels["workflow"] == "metered"
            assert s.labels["server_port"].isdigit()
        throttled = fams["syncplane_http_client_throttled"].samples
        assert sum(s.value for s in throttled if s.labels["vendor"] == "campaign" and s.name.endswith("_total")) >= 2
        retried = fams["syncplane_http_client_retries"].samples
        assert any(s.labels["reason"] == "throttled" and s.labels["vendor"] == "campaign" for s in retried)

        # Labels: Prometheus-safe names; values without queries, key values or secrets.
        secrets = [v for data in sb.secrets().values() for k, v in data.items()
                   if isinstance(v, str) and "secret" in k.lower() and v]
        assert secrets
        for fam in fams.values():
            for s in fam.samples:
                for label, val in s.labels.items():
                    assert LABEL.match(label), label
                    assert "?" not in val and "=" not in val, (fam.name, label, val)
                    assert not any(secret in val for secret in secrets), (fam.name, label)
    finally:
        await sb.stop()
