"""One read of a Dynamics 365 contacts feed, in its own process (so its CPU time is its own), by
syncplane's source or by dlt's REST client: the two sides of benchmarks/bench_read.py.

- ``syncplane``: :class:`syncplane.connectors.dynamics.DynamicsSource` ``pages()``, as the ingress
  worker reads (change tracking, pages of 5,000, the next page fetched while this one is turned
  into records);
- ``dlt``: ``dlt.sources.helpers.rest_client.RESTClient`` with a ``JSONLinkPaginator`` on
  ``@odata.nextLink`` and the rows under ``value``; the same first URL and headers, so the same
  pages come back. dlt's client is synchronous (requests).

Prints one JSON line: ``{"records", "pages", "seconds", "cpu_s"}`` (seconds: wall time of the read,
token included, imports not; cpu_s: this process's user+system CPU over the same span).

Usage: ``python -m benchmarks.reader syncplane|dlt D365_URL D365_TOKEN_URL D365_SCOPE``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from syncplane_sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET

TABLE = "contacts"
COLUMNS = ("emailaddress1", "firstname", "lastname")
KEY = "contactid"
PAGE_SIZE = 5000


async def read_syncplane(d365_url: str, token_url: str, scope: str) -> tuple[int, int]:
    """Every contact of ``d365_url`` through syncplane's DynamicsSource: (records, pages)."""
    from syncplane.connectors.dynamics import DynamicsSource
    from syncplane.connectors.http import Credentials, OAuth2ClientCredentials

    tokens = OAuth2ClientCredentials(token_url, Credentials(SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, scope=scope))
    src = DynamicsSource(d365_url, tokens, key_column=KEY, page_size=PAGE_SIZE)
    records = pages = 0
    try:
        async for page in src.pages(TABLE, list(COLUMNS), None):
            records += len(page.records)
            pages += 1
    finally:
        await src.aclose()
        await tokens.aclose()
    return records, pages


def read_dlt(d365_url: str, token_url: str, scope: str) -> tuple[int, int]:
    """Every contact of ``d365_url`` through dlt's RESTClient (the same columns, page size and
    @odata.nextLink paging): (records, pages)."""
    import requests
    from dlt.sources.helpers.rest_client.auth import BearerTokenAuth
    from dlt.sources.helpers.rest_client.client import RESTClient
    from dlt.sources.helpers.rest_client.paginators import JSONLinkPaginator

    answer = requests.post(token_url, data={"client_id": SANDBOX_CLIENT_ID, "client_secret": SANDBOX_CLIENT_SECRET,
                                            "grant_type": "client_credentials", "scope": scope}, timeout=60)
    answer.raise_for_status()
    client = RESTClient(
        base_url=d365_url,
        headers={"OData-Version": "4.0", "OData-MaxVersion": "4.0", "Accept": "application/json",
                 "Prefer": f"odata.track-changes, odata.maxpagesize={PAGE_SIZE}"},
        auth=BearerTokenAuth(answer.json()["access_token"]),
        paginator=JSONLinkPaginator(next_url_path="'@odata.nextLink'"), data_selector="value")
    records = pages = 0
    for page in client.paginate(f"{TABLE}?$select={','.join((KEY, *COLUMNS))}"):
        records += len(page)
        pages += 1
    return records, pages


def main(argv: list[str]) -> None:
    """``argv``: ``syncplane|dlt D365_URL TOKEN_URL SCOPE``. Prints one JSON line: ``{"records", "pages",
    "seconds" (wall), "cpu_s" (this process)}``, the reader's imports outside the clock."""
    which, d365_url, token_url, scope = argv
    # Imported before the clock starts: a reader's import time is not its read's.
    if which == "syncplane":
        import syncplane.connectors.dynamics  # noqa: F401
    elif which == "dlt":
        import dlt.sources.helpers.rest_client  # noqa: F401
    t0, cpu0 = time.perf_counter(), time.process_time()
    if which == "syncplane":
        records, pages = asyncio.run(read_syncplane(d365_url, token_url, scope))
    elif which == "dlt":
        records, pages = read_dlt(d365_url, token_url, scope)
    else:
        raise SystemExit(f"error: unknown reader {which!r} (syncplane or dlt)")
    result: dict[str, Any] = {"records": records, "pages": pages, "seconds": time.perf_counter() - t0,
                              "cpu_s": time.process_time() - cpu0}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
