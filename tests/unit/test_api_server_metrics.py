"""The test cluster's count of the API server's requests (tests/k8s/cluster.py ``requests_by_kind``) read
from /metrics text as kube-apiserver writes it (Prometheus text format 0.0.4; Go formats a float with the
shortest representation, so a small sum comes as ``5.2e-05``): a table of variants."""

from __future__ import annotations

import pytest

from tests.k8s.cluster import requests_by_kind

HEADER = """\
# HELP apiserver_request_total [STABLE] Counter of apiserver requests broken out for each verb, ...
# TYPE apiserver_request_total counter
"""
PATCH_STATUS = 'group="syncplane.io",resource="workflows",subresource="status",verb="PATCH",version="v1alpha1"'
HISTOGRAM = f"""\
# HELP apiserver_request_duration_seconds [STABLE] Response latency distribution in seconds ...
# TYPE apiserver_request_duration_seconds histogram
apiserver_request_duration_seconds_bucket{{{PATCH_STATUS},le="0.005"}} 2
apiserver_request_duration_seconds_bucket{{{PATCH_STATUS},le="+Inf"}} 3
apiserver_request_duration_seconds_sum{{{PATCH_STATUS}}} 5.2e-05
apiserver_request_duration_seconds_count{{{PATCH_STATUS}}} 3
apiserver_request_duration_seconds_sum{{group="",resource="events",subresource="",verb="POST",version="v1"}} 1.25
"""

CASES = [
    pytest.param(HEADER + 'apiserver_request_total{code="200",component="apiserver",dry_run="",group="syncplane.io",'
                 'resource="workflows",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 3\n',
                 "apiserver_request_total", {("PATCH", "workflows/status"): 3.0}, id="subresource joined"),
    pytest.param(HEADER + 'apiserver_request_total{code="201",resource="events",subresource="",verb="POST"} 2\n'
                 'apiserver_request_total{code="409",resource="events",subresource="",verb="POST"} 1\n',
                 "apiserver_request_total", {("POST", "events"): 3.0}, id="codes summed"),
    pytest.param(HEADER + 'apiserver_request_total{verb="LIST",subresource="",resource="pods",code="200"} 1e+06\n',
                 "apiserver_request_total", {("LIST", "pods"): 1e6}, id="labels in another order, exponent"),
    pytest.param(HEADER + 'apiserver_request_total{code="200",verb="GET"} 4\n', "apiserver_request_total",
                 {("GET", ""): 4.0}, id="no resource (a non-resource URL)"),
    pytest.param(HISTOGRAM, "apiserver_request_duration_seconds_sum",
                 {("PATCH", "workflows/status"): 5.2e-05, ("POST", "events"): 1.25},
                 id="the histogram's _sum samples, a small one in e- notation"),
    pytest.param(HISTOGRAM, "apiserver_request_total", {}, id="another metric's samples only"),
]


@pytest.mark.parametrize(("text", "metric", "expected"), CASES)
def test_requests_by_kind_reads_every_sample_of_the_metric(text: str, metric: str,
                                                           expected: dict[tuple[str, str], float]) -> None:
    assert requests_by_kind(text, metric) == pytest.approx(expected)


def test_a_kind_not_served_reads_zero() -> None:
    assert requests_by_kind(HEADER, "apiserver_request_total")[("PUT", "workflows/status")] == 0
