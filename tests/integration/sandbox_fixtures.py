"""Helpers for talking to the sandbox emulators over real HTTP in tests."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from syncplane_sandbox import SANDBOX_CLIENT_ID, SANDBOX_CLIENT_SECRET, Sandbox, SeedSpec, start_sandbox


@asynccontextmanager
async def running_sandbox(seed: SeedSpec | None = None) -> AsyncIterator[Sandbox]:
    """Both emulators on loopback, seeded with ``seed`` (None: empty), stopped on the way out."""
    sb = await start_sandbox(seed=seed)
    try:
        yield sb
    finally:
        await sb.stop()


def change_contacts(sb: Sandbox, deleted: int = 1) -> tuple[list[str], str]:
    """The edits a change-tracked read must report, made 2 s later on the sandbox's clock: the first
    contact renamed (``firstname`` "Renamed"), the second's ``lastname`` "Changed", a contact created
    ("New Person"), then the ``deleted`` contacts after the second deleted. Returns (the contact ids
    before the edits, in the table's order; the created contact's id)."""
    table = sb.d365.table("contacts")
    ids = list(table.rows)
    sb.clock.advance(2)
    table.upsert(ids[0], firstname="Renamed")
    table.upsert(ids[1], lastname="Changed")
    created = table.upsert(firstname="New", lastname="Person", emailaddress1="new.person@example.com")
    for rid in ids[2:2 + deleted]:
        table.delete(rid)
    return ids, created


async def d365_token(http: httpx.AsyncClient, sb: Sandbox, client_id: str = SANDBOX_CLIENT_ID,
                     secret: str = SANDBOX_CLIENT_SECRET) -> str:
    r = await http.post(sb.d365_token_url, data={"client_id": client_id, "client_secret": secret,
                                                 "grant_type": "client_credentials", "scope": sb.d365_scope})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


async def acs_token(http: httpx.AsyncClient, sb: Sandbox, client_id: str = SANDBOX_CLIENT_ID,
                    secret: str = SANDBOX_CLIENT_SECRET) -> str:
    r = await http.post(sb.acs_token_url, data={"client_id": client_id, "client_secret": secret,
                                                "grant_type": "client_credentials",
                                                "scope": "openid,AdobeID,campaign_sdk"})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


@dataclass
class Clients:
    sb: Sandbox
    http: httpx.AsyncClient
    d365_headers: dict[str, str]
    acs_headers: dict[str, str]

    async def d365(self, method: str, path: str, prefer: str | None = None, **kwargs: Any) -> httpx.Response:
        """A Web API call; ``path`` relative to the service root or an absolute URL (next/delta links)."""
        url = path if path.startswith("http") else self.sb.d365_url + path
        headers = dict(self.d365_headers)
        if prefer:
            headers["Prefer"] = prefer
        headers.update(kwargs.pop("headers", {}))
        return await self.http.request(method, url, headers=headers, **kwargs)

    async def acs(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = path if path.startswith("http") else self.sb.acs_url + path
        return await self.http.request(method, url, headers={**self.acs_headers, **kwargs.pop("headers", {})},
                                       **kwargs)

    async def read_all(self, path: str, prefer: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Follow ``@odata.nextLink`` unchanged; returns (rows of every page, page bodies)."""
        url: str | None = path
        rows: list[dict[str, Any]] = []
        pages: list[dict[str, Any]] = []
        while url:
            r = await self.d365("GET", url, prefer=prefer)
            assert r.status_code == 200, r.text
            body = r.json()
            pages.append(body)
            rows.extend(body["value"])
            url = body.get("@odata.nextLink")
        return rows, pages


async def open_clients(sb: Sandbox) -> AsyncIterator[Clients]:
    async with httpx.AsyncClient(timeout=30.0) as http:
        d365 = await d365_token(http, sb)
        acs = await acs_token(http, sb)
        yield Clients(sb, http, {"Authorization": f"Bearer {d365}", "OData-Version": "4.0",
                                 "Accept": "application/json"},
                      {"Authorization": f"Bearer {acs}", "X-Api-Key": SANDBOX_CLIENT_ID})


# ---------------------------------------------------------------------- $batch bodies


@dataclass
class Op:
    method: str
    url: str
    body: dict[str, Any] | None = None
    content_id: str | None = None
    headers: dict[str, str] | None = None


def build_batch(items: list[Op | list[Op]]) -> tuple[str, bytes]:
    """A Dataverse-style ``multipart/mixed`` batch (a list of ops = one change set)."""
    boundary = f"batch_{uuid.uuid4()}"
    out: list[str] = []

    def part(op: Op) -> str:
        head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
        if op.content_id:
            head += f"Content-ID: {op.content_id}\r\n"
        lines = f"{op.method} {op.url} HTTP/1.1\r\n"
        if op.body is not None:
            lines += "Content-Type: application/json; type=entry\r\n"
        for name, value in (op.headers or {}).items():
            lines += f"{name}: {value}\r\n"
        lines += "\r\n"
        if op.body is not None:
            lines += json.dumps(op.body) + "\r\n"
        return head + "\r\n" + lines

    for item in items:
        if isinstance(item, list):
            cs = f"changeset_{uuid.uuid4()}"
            out.append(f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n")
            for op in item:
                out.append(f"--{cs}\r\n{part(op)}")
            out.append(f"--{cs}--\r\n")
        else:
            out.append(f"--{boundary}\r\n{part(item)}")
    out.append(f"--{boundary}--\r\n")
    return f"multipart/mixed; boundary={boundary}", "".join(out).encode()
