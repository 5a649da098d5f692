"""Issue 18, the lean per-request path: what the connectors' transport works out once instead of
for every request, and that each cache decides exactly as the uncached code.

- The audience check (a bearer token goes only where its credentials allow, issue 13) is decided
  per URL directory: for any sequence of URLs, warm cache or cold, it answers as the full parse
  (a Hypothesis property over URLs built to hit its edges), and a URL outside the audience is
  refused right after an allowed one of the same directory (a table of variants).
- A credentials object works its audience out once; new credentials (a rotated secret, another
  organisation) are a new object with their own audience and decisions.
- The telemetry of a request (metric attributes, span name, labels) is kept per endpoint
  template, so records' URLs (a PKey each) share one entry.
- Spans cost nothing while no tracer provider is set, and are made as before once one is (a
  process of its own: OpenTelemetry's provider is set once per process).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.connectors.http import (
    Credentials,
    _audience_allows,
    _directory_allowed,
    _endpoint,
    _endpoint_of,
    audience_allows,
    request_attributes,
)
from syncplane.metrics import WORKFLOW

# ------------------------------------------------------------------ the audience, cached per directory
ORIGINS = ["https://mc.adobe.io", "https://MC.adobe.io.", "https://mc.adobe.io:443", "http://mc.adobe.io",
           "https://mc.adobe.io:8443", "http://127.0.0.1:7480", "http://127.0.0.1:7481", "https://evil.example",
           "https://u@mc.adobe.io", "https://mc.adobe.io@evil.example", "https://[::1]:7480", "HTTPS://mc.adobe.io",
           "//mc.adobe.io", "file://", ""]
SEGMENTS = ["acme", "acmecorp", "other", "campaign", "profileAndServices", "profile", "@Jx2k9-pkey", "byExternalId",
            "api", "data", "v9.2", "contacts(1f2e)", ".", "..", "%2e", "%2E%2e", ".%2e", "...", "", "a b", "a\tb",
            ".\t.", "a\\b", "%zz", "%2F", "x:y", "x@y", "~", "$batch", "acme#frag", "q?x=/../"]
AUDIENCES = [
    Credentials("c", "s", scope="openid,AdobeID", organization="acme").audience,
    Credentials("c", "s", scope="http://127.0.0.1:7480/.default").audience,
    Credentials("c", "s", scope="http://127.0.0.1:7480/.default", organization="acme",
                api_host="http://127.0.0.1:7481").audience,
    ("https://mc.adobe.io:443/acme/campaign/",),          # a prefix ending inside a URL's last segment
    ("https://mc.adobe.io:443//",), ("not a url",), (),
]
# Most URLs start inside an audience, so that a directory is allowed (cached) before a sibling is asked.
BASES = ["https://mc.adobe.io/acme", "https://mc.adobe.io/acme/campaign", "http://127.0.0.1:7480",
         "http://127.0.0.1:7481/acme"]
urls = st.builds(lambda origin, segs, tail: origin + "".join("/" + s for s in segs) + tail,
                 st.one_of(st.sampled_from(BASES), st.sampled_from(ORIGINS)),
                 st.lists(st.sampled_from(SEGMENTS), max_size=5),
                 st.sampled_from(["", "", "", "/", "?$select=a", "?q=/../x", "#/..", "?a#b"]))


@settings(max_examples=300)
@given(audience=st.sampled_from(AUDIENCES), sequence=st.lists(urls, min_size=1, max_size=20))
def test_the_cached_audience_check_decides_as_the_full_parse(audience: tuple[str, ...], sequence: list[str]) -> None:
    for url in sequence:   # in order: earlier URLs fill the per-directory cache that later ones hit
        directory = url.partition("?")[0].partition("#")[0].rpartition("/")[0]
        for candidate in (url, *(f"{directory}/{last}" for last in SEGMENTS)):  # and its siblings, each kind
            assert audience_allows(audience, candidate) is _audience_allows(audience, candidate), candidate


ACME = Credentials("c", "s", organization="acme").audience
PROFILE = "https://mc.adobe.io/acme/campaign/profileAndServices/profile"


@pytest.mark.parametrize("refused", [
    f"{PROFILE}/..",                                            # a dot segment last
    f"{PROFILE}/%2e%2E",                                        # encoded
    f"{PROFILE}/.%2e",
    f"{PROFILE}/.\t.",                                          # a character a parser may drop
    f"{PROFILE}/..#fragment",
    "https://mc.adobe.io/other/campaign/profileAndServices/profile/x",   # another organisation
    "https://mc.adobe.io/acmecorp/campaign/profileAndServices/profile/x",
    "https://mc.adobe.io:8443/acme/campaign/profileAndServices/profile/x",  # another port
    "http://mc.adobe.io/acme/campaign/profileAndServices/profile/x",    # cleartext
    "https://u@mc.adobe.io/acme/campaign/profileAndServices/profile/x",  # user info
    "https://mc.adobe.io@evil.example/acme/campaign/profileAndServices/profile/x",
    "https://evil.example/acme/campaign/profileAndServices/profile/x",
])
def test_a_url_outside_the_audience_is_refused_after_an_allowed_one(refused: str) -> None:
    assert audience_allows(ACME, f"{PROFILE}/@Jx2k9-pkey")
    assert audience_allows(ACME, f"{PROFILE}/byExternalId?externalId_parameter=k")
    assert not audience_allows(ACME, refused)
    assert audience_allows(ACME, f"{PROFILE}/@another-pkey")   # and the directory is still allowed


def test_records_of_one_directory_share_one_cache_entry() -> None:
    _directory_allowed.cache_clear()
    for i in range(500):
        assert audience_allows(ACME, f"{PROFILE}/@pkey{i}")
    assert _directory_allowed.cache_info().currsize == 1
    assert _directory_allowed.cache_info().maxsize == 256      # bounded: per directory, not per record URL


def test_credentials_work_their_audience_out_once_and_new_credentials_have_their_own() -> None:
    old = Credentials("c", "s", organization="acme")
    assert old.audience is old.audience
    assert audience_allows(old.audience, f"{PROFILE}/x")
    rotated = Credentials("c", "s2", organization="other")       # the secret file changed: a new object
    assert rotated.audience == ("https://mc.adobe.io:443/other/",)
    assert not audience_allows(rotated.audience, f"{PROFILE}/x")
    assert audience_allows(old.audience, f"{PROFILE}/x")        # the old object's answer is unchanged


# ------------------------------------------------------------------ the telemetry of an endpoint
def test_the_telemetry_of_record_urls_is_kept_once_per_endpoint_template() -> None:
    _endpoint_of.cache_clear()
    token = WORKFLOW.set("wf")
    try:
        endpoints = {id(_endpoint("PATCH", f"{PROFILE}/{quote('@pk' + str(i), safe='@')}?x={i}"))
                     for i in range(300)}
        first = _endpoint("PATCH", f"{PROFILE}/@pk1")
    finally:
        WORKFLOW.reset(token)
    assert len(endpoints) == 1 and _endpoint_of.cache_info().currsize == 1
    assert first.span_name == "PATCH /{organization}/campaign/profileAndServices/profile/{PKey}"
    assert first.labels == {"vendor": "campaign", "server.address": "mc.adobe.io", "workflow": "wf"}
    ok, refused = first.answered(200), first.answered(404)
    assert ok["http.response.status_code"] == 200 and "error.type" not in ok
    assert refused["http.response.status_code"] == 404 and refused["error.type"] == "404"
    assert first.answered(200) is ok                              # one dict per status, shared
    assert "http.response.status_code" not in first.attributes   # the request's own stay untouched


def test_another_workflow_or_method_is_another_endpoint() -> None:
    token = WORKFLOW.set("a")
    try:
        a = request_attributes("POST", PROFILE)
    finally:
        WORKFLOW.reset(token)
    token = WORKFLOW.set("b")
    try:
        b = request_attributes("POST", PROFILE)
        get = request_attributes("GET", PROFILE)
    finally:
        WORKFLOW.reset(token)
    assert (a["workflow"], b["workflow"], get["http.request.method"]) == ("a", "b", "GET")
    b["workflow"] = "changed"                                     # a copy: the cached one is unchanged
    assert request_attributes("POST", PROFILE).get("workflow") != "changed"


# ------------------------------------------------------------------ spans only when a provider is set
SPANS_SCRIPT = textwrap.dedent("""
    import asyncio, json
    from aiohttp import web
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from syncplane import telemetry
    from syncplane.connectors.http import Transport

    async def main():
        app = web.Application()
        app.router.add_get("/things/{id}", lambda r: web.json_response({}))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/things/1234567"
        transport = Transport()
        off = [telemetry.tracing() for _ in range(300)]
        await transport.request("GET", url)
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)   # not through setup_tracing: noticed within 256 calls
        calls = 1
        while not telemetry.tracing():
            calls += 1
        await transport.request("GET", url)
        await transport.aclose()
        await runner.cleanup()
        spans = [{"name": s.name, "kind": s.kind.name, "attributes": dict(s.attributes)}
                 for s in exporter.get_finished_spans()]
        print(json.dumps({"off": any(off), "calls": calls, "spans": spans}))

    asyncio.run(main())
""")


def test_spans_only_once_a_tracer_provider_is_set() -> None:
    out = subprocess.run([sys.executable, "-c", SPANS_SCRIPT], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["off"] is False and 1 <= result["calls"] <= 256
    [span] = result["spans"]   # the request sent while tracing was off left none
    assert span["name"] == "GET /things/{id}" and span["kind"] == "CLIENT"
    assert span["attributes"]["http.response.status_code"] == 200 and span["attributes"]["attempt"] == 1


def test_setup_tracing_turns_spans_on_at_once() -> None:
    script = ("from syncplane import telemetry\n"
              "assert not telemetry.tracing()\n"
              "telemetry.setup_tracing('t')\n"
              "assert telemetry.tracing()\n")
    subprocess.run([sys.executable, "-c", script], timeout=60, check=True)
