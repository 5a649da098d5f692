"""Issue 17 item 4: the labels of vendor-request metrics are low-cardinality templates. A key value,
a PKey, a query (which may carry a filter value or a key) or a tenant id never becomes a label."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncplane.connectors.http import endpoint_of, request_attributes
from syncplane.metrics import WORKFLOW

D365 = "https://org.crm.dynamics.com"
ACS = "https://mc.adobe.io"


@pytest.mark.parametrize(("url", "vendor", "template"), [
    (f"{D365}/api/data/v9.2/contacts?$select=firstname&$filter=statecode eq 0", "dynamics365",
     "/api/data/v9.2/contacts"),
    (f"{D365}/api/data/v9.2/contacts(1f2e3d4c-0000-4000-8000-000000000001)", "dynamics365",
     "/api/data/v9.2/contacts({key})"),
    (f"{D365}/api/data/v9.2/contacts(emailaddress1='a%40b.c')", "dynamics365", "/api/data/v9.2/contacts({key})"),
    (f"{D365}/api/data/v9.2/$batch", "dynamics365", "/api/data/v9.2/$batch"),
    (f"{D365}/api/data/v9.2/EntityDefinitions(LogicalName='contact')/Attributes?$select=LogicalName",
     "dynamics365", "/api/data/v9.2/EntityDefinitions({key})/Attributes"),
    (f"{ACS}/MyOrg_1/campaign/profileAndServices/profile/@Jx2k9aBc-long-pkey_value", "campaign",
     "/{organization}/campaign/profileAndServices/profile/{PKey}"),
    (f"{ACS}/myorg/campaign/profileAndServices/profile/byEmail?email=jane%40example.com", "campaign",
     "/{organization}/campaign/profileAndServices/profile/byEmail"),
    (f"{ACS}/myorg/campaign/profileAndServicesExt/resourceType/cusLoyaltyCard", "campaign",
     "/{organization}/campaign/profileAndServicesExt/resourceType/cusLoyaltyCard"),
    ("https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/token", "entra_id",
     "/{tenant}/oauth2/v2.0/token"),
    ("https://ims-na1.adobelogin.com/ims/token/v3", "adobe_ims", "/ims/token/v3"),
    ("http://127.0.0.1:9/somewhere/12345678", "other", "/somewhere/{id}"),
])
def test_endpoint_templates(url: str, vendor: str, template: str) -> None:
    assert endpoint_of(url) == (vendor, template)


ids = st.one_of(st.uuids().map(str), st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=8,
                                             max_size=40).map(lambda s: "@" + s))


@given(key=ids, query=st.text(min_size=1, max_size=30))
def test_no_key_or_query_in_any_label(key: str, query: str) -> None:
    for url, template in (
            (f"{D365}/api/data/v9.2/contacts({key})?$filter={quote(query, safe='')}", "/api/data/v9.2/contacts({key})"),
            (f"{ACS}/org/campaign/profileAndServices/profile/{quote(key, safe='@')}?q={quote(query, safe='')}",
             "/{organization}/campaign/profileAndServices/" + ("profile/{PKey}" if key.startswith("@")
                                                               else "profile/{id}"))):
        token = WORKFLOW.set("wf")
        try:
            attributes = request_attributes("PATCH", url)
        finally:
            WORKFLOW.reset(token)
        assert attributes["workflow"] == "wf" and attributes["server.port"] == 443
        assert attributes["url.template"] == template
        for value in attributes.values():
            assert key not in str(value) and "?" not in str(value)


def test_a_guid_segment_is_an_id() -> None:
    guid = str(uuid.uuid4())
    assert endpoint_of(f"{D365}/api/data/v9.2/contacts/{guid}")[1] == "/api/data/v9.2/contacts/{id}"
