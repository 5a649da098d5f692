"""Item 1 of issue 13: a bearer token is only ever sent to an origin its credentials allow.

A hostile endpoint records every request it receives; no token (nor API key) may ever arrive
there, whether the spec names it or a service's returned link (``@odata.nextLink``,
``@odata.deltaLink``, Campaign's ``next.href``) points at it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web

from syncplane.connectors.base import ConnectorError
from syncplane.connectors.campaign import CampaignSource
from syncplane.connectors.dynamics import DynamicsSource
from syncplane.connectors.http import Credentials, OAuth2ClientCredentials, audience_allows
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane_sandbox import SeedSpec, start_sandbox
from tests.embedded_plane import FAST as INTEGRATION_FAST
from tests.embedded_plane import ControlPlane, serve
from tests.integration.conftest import watch_until
from tests.integration.ingress_env import ingress_spec, prepare
from tests.integration.test_ingress import start
from tests.security.hostile import HostileEndpoint

pytestmark = pytest.mark.security

ORG = "acme"


# ------------------------------------------------------------------ the rule, as a table
AUDIENCE = ("http://127.0.0.1:7480/", "https://mc.adobe.io:443/acme/")


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://127.0.0.1:7480/api/data/v9.2/contacts?$select=x", True),
    ("https://mc.adobe.io/acme/campaign/profileAndServices/profile", True),
    ("https://MC.adobe.io./acme/campaign/", True),                        # case and trailing dot of a host
    ("http://127.0.0.2:7480/api/data/v9.2/contacts", False),              # another host
    ("http://127.0.0.1:7481/api/data/v9.2/contacts", False),              # another port
    ("https://127.0.0.1:7480/api/data/v9.2/contacts", False),             # another scheme
    ("http://mc.adobe.io/acme/campaign/", False),                         # cleartext to the right host
    ("https://mc.adobe.io/other/campaign/", False),                       # another organisation
    ("https://mc.adobe.io/acmecorp/campaign/", False),                    # a longer organisation name
    ("https://mc.adobe.io/acme/../other/campaign/", False),               # dot segments
    ("https://mc.adobe.io/acme/%2e%2e/other/campaign/", False),           # encoded dot segments
    ("http://127.0.0.1:7480@127.0.0.2:7480/api/", False),                 # user info
    ("//127.0.0.1:7480/api/", False),                                     # not absolute
    ("https://mc.adobe.io:x/acme/campaign/", False),                      # a malformed port (refused, not raised)
    ("https://mc.adobe.io@[::1/acme/campaign/", False),                   # a malformed host
    ("file:///etc/passwd", False),
    ("", False),
])
def test_audience_allows_only_its_origins(url: str, allowed: bool) -> None:
    assert audience_allows(AUDIENCE, url) is allowed


def test_credentials_name_their_audience() -> None:
    assert Credentials("c", "s", scope="https://org.crm.dynamics.com/.default").audience == \
        ("https://org.crm.dynamics.com:443/",)
    assert Credentials("c", "s", scope="openid,AdobeID,campaign_sdk", organization="acme").audience == \
        ("https://mc.adobe.io:443/acme/",)
    assert Credentials("c", "s").audience == ()  # declares nothing: a token can go nowhere


# ------------------------------------------------------------------ returned links
@pytest.fixture
async def hostile() -> AsyncIterator[HostileEndpoint]:
    endpoint = await HostileEndpoint.start("127.0.0.2")
    yield endpoint
    await endpoint.stop()


def _service(link: Callable[[HostileEndpoint], str], hostile: HostileEndpoint, campaign: bool):
    """A vendor service whose first page links to ``link(hostile)``; it issues tokens at /token."""
    async def handle(request: web.Request) -> web.Response:
        if request.path == "/token":
            return web.json_response({"access_token": "tok-4711", "expires_in": 3600})
        target = link(hostile)
        if campaign:
            return web.json_response({"content": [], "next": {"href": target}})
        return web.json_response({"value": [], "@odata.nextLink": target})
    return handle


def _source(service: HostileEndpoint, campaign: bool) -> tuple[OAuth2ClientCredentials,
                                                                DynamicsSource | CampaignSource]:
    """Tokens from ``service``'s /token and a reader of it (Campaign's or Dataverse's), its audience ``service``."""
    creds = (Credentials("client", "secret", organization=ORG, api_host=service.origin) if campaign
             else Credentials("client", "secret", scope=f"{service.origin}/.default"))
    tokens = OAuth2ClientCredentials(f"{service.origin}/token", creds)
    src: DynamicsSource | CampaignSource = (
        CampaignSource(f"{service.origin}/{ORG}/campaign/", tokens, "client") if campaign
        else DynamicsSource(f"{service.origin}/api/data/v9.2/", tokens, key_column="contactid"))
    return tokens, src


LINKS: dict[str, Callable[[HostileEndpoint], str]] = {
    "another host": lambda h: f"{h.origin}/api/data/v9.2/contacts?$skiptoken=1",
    "user info": lambda h: f"http://127.0.0.1:1@{h.host}:{h.port}/api/data/v9.2/contacts",
}


@pytest.mark.parametrize("variant", sorted(LINKS))
@pytest.mark.parametrize("kind", ["dataverse nextLink", "campaign next.href"])
async def test_a_returned_link_to_another_origin_is_an_error_not_a_request(
        hostile: HostileEndpoint, variant: str, kind: str) -> None:
    campaign = kind.startswith("campaign")
    service = await HostileEndpoint.start("127.0.0.1", _service(LINKS[variant], hostile, campaign))
    try:
        tokens, src = _source(service, campaign)
        with pytest.raises(ConnectorError) as caught:
            async for _ in src.pages("profile" if campaign else "contacts", ["contactid"], None):
                pass
        await src.aclose()
        await tokens.aclose()
        assert caught.value.reason == "UNTRUSTED_ORIGIN"
        assert "tok-4711" not in str(caught.value) and "secret" not in str(caught.value)
        assert any(r.headers.get("Authorization") for r in service.received)  # the first page was authorised
        assert hostile.received == []
    finally:
        await service.stop()


@pytest.mark.parametrize("kind", ["dataverse deltaLink", "campaign next.href"])
async def test_a_link_resumed_from_a_cursor_goes_nowhere_else(hostile: HostileEndpoint, kind: str) -> None:
    """A stored cursor (a delta link, a Campaign page) naming another origin is never asked, with or without
    a token: it is discarded before any request and the read starts over at the configured endpoint (brief
    s7-bugs 2: it used to fail every read)."""
    campaign = kind.startswith("campaign")

    async def handle(request: web.Request) -> web.Response:
        if request.path == "/token":
            return web.json_response({"access_token": "tok-4711", "expires_in": 3600})
        if campaign:
            return web.json_response({"content": []})
        return web.json_response({"value": [], "@odata.deltaLink": f"{service.origin}{request.path}?$deltatoken=2"})

    service = await HostileEndpoint.start("127.0.0.1", handle)
    try:
        tokens, src = _source(service, campaign)
        cursor = (f'{{"since": "2026-11-30 10:00:00.000Z", "seen": [], "page": "{hostile.origin}/{ORG}/campaign/p"}}'
                  if campaign else f"delta {hostile.origin}/api/data/v9.2/contacts?$deltatoken=1")
        pages = [page async for page in src.pages("profile" if campaign else "contacts", ["contactid"], cursor)]
        await src.aclose()
        await tokens.aclose()
        assert pages and (campaign or pages[0].resynced)
        asked = [r.path for r in service.received if r.path != "/token"]
        assert asked and all(("byLastModified" if campaign else "/contacts") in path for path in asked), asked
        assert hostile.received == []
    finally:
        await service.stop()


# ------------------------------------------------------------------ spec endpoints, end to end
FAST = replace(INTEGRATION_FAST, stop_timeout=10.0)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    async for p in serve(tmp_path, config=FAST):
        yield p


@pytest.mark.parametrize("field", ["source", "destination"])
async def test_a_spec_endpoint_outside_the_secrets_origin_is_refused_at_start(
        plane: ControlPlane, hostile: HostileEndpoint, field: str) -> None:
    sb = await start_sandbox(seed=SeedSpec(contacts=5, seed=3))
    try:
        prepare(sb, plane.data_dir)
        spec = ingress_spec(sb)
        if field == "source":
            spec.source.endpoint = f"{hostile.origin}/api/data/v9.2/"
        else:
            spec.destination.endpoint = f"{hostile.origin}/{sb.options.org}/campaign/"
        rev = plane.store.revision()
        await start(plane, "harvest", spec)
        wf, _ = await watch_until(plane.stub, "harvest", lambda w: w.status.phase == pb.PHASE_ERROR, rev, timeout=60)
        error = wf.status.last_error
        assert error.reason == "ENDPOINT_NOT_ALLOWED"
        assert f"spec.{field}.endpoint" in error.message
        assert sb.client_secret not in str(wf)
        assert hostile.received == []
    finally:
        await sb.stop()
