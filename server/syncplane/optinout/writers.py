"""The two writes the opt-in/out sync needs, which the ingress sinks do not do:

* Campaign: PATCH an *existing* profile found by ``externalId`` — never create one (profiles
  are ingress's business), never touch a profile someone else created (``createdBy``);
* Dataverse: ``$batch`` of ``PATCH contacts(<id>)`` with ``If-Match: *`` — update only, so
  a profile whose contact is gone never resurrects it as an empty contact.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from syncplane.connectors.base import Rejected
from syncplane.connectors.dynamics import MAX_BATCH_REQUESTS, BatchPart, PartResponse, run_batches, send_batch
from syncplane.connectors.http import (
    Response,
    TokenProvider,
    Transport,
    error_text,
    error_text_of,
    raise_for_status,
)

PROFILE_PATH = "profileAndServices/profile"
_GUID_LEN = 36
PKEY_CACHE_SIZE = 200_000  # ~100 bytes each: ~20 MB at most
_ODATA = {"OData-Version": "4.0", "OData-MaxVersion": "4.0", "Accept": "application/json"}


@dataclass
class Outcome:
    written: list[str] = field(default_factory=list)    # acknowledged (or already held the value)
    rejected: list[Rejected] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)      # no such record on that side: nothing to do
    requests: int = 0                                    # write requests sent (PATCHes, $batch parts)

    def merge(self, other: Outcome) -> None:
        self.written += other.written
        self.rejected += other.rejected
        self.absent += other.absent
        self.requests += other.requests


@dataclass(frozen=True)
class CampaignWrite:
    key: str                               # externalId
    values: Mapping[str, bool]             # the opt-out fields to set
    row: Mapping[str, Any] | None = None   # the profile as read from the feed (PKey, createdBy), if read
    expected: Mapping[str, bool | None] = field(default_factory=dict)  # what the plan assumed is there


class CampaignOptOutWriter:
    def __init__(self, base_url: str, tokens: TokenProvider, api_key: str, owner: str | None,
                 transport: Transport, cache_size: int = PKEY_CACHE_SIZE) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.tokens, self.api_key, self.owner, self.transport = tokens, api_key, owner, transport
        # externalId → (PKey, created by someone else?): memory only, bounded; never persisted.
        self._cache: OrderedDict[str, tuple[str, bool]] = OrderedDict()
        self.cache_size = cache_size

    def remember(self, key: str, row: Mapping[str, Any]) -> None:
        """A profile seen in the feed: its PKey and author, so a later write needs no lookup."""
        pkey = row.get("PKey")
        if not pkey:
            return
        self._cache[key] = (str(pkey), self._foreign(row))
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _call(self, method: str, url: str, body: dict[str, Any] | None = None) -> Response:
        headers = {"X-Api-Key": self.api_key, "Accept": "application/json"}
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = json.dumps(body, separators=(",", ":")).encode()
        return await self.transport.request(method, url, headers=headers, content=content, auth=self.tokens)

    async def lookup(self, key: str) -> dict[str, Any] | None:
        response = await self._call("GET", f"{self.base_url}{PROFILE_PATH}/byExternalId?"
                                           f"{urlencode({'externalId_parameter': key})}")
        raise_for_status(response, "profile lookup by externalId")
        content = response.json().get("content") or []
        return dict(content[0]) if content else None

    async def write(self, items: Sequence[CampaignWrite]) -> Outcome:
        out = Outcome()
        for result in await asyncio.gather(*(self._one(i) for i in items)):
            out.merge(result)
        return out

    def _foreign(self, row: Mapping[str, Any]) -> bool:
        creator = row.get("createdBy")
        name = creator.get("name") if isinstance(creator, dict) else None
        return self.owner is not None and name != self.owner

    async def _one(self, item: CampaignWrite) -> Outcome:
        out = Outcome()
        values = dict(item.values)
        row = item.row
        if (row is None or not row.get("PKey")) and item.key in self._cache:
            pkey, foreign = self._cache[item.key]
            row = {"PKey": pkey, "createdBy": {"name": None if foreign else self.owner}}
        if row is None or not row.get("PKey"):
            row = await self.lookup(item.key)
            if row is None:
                out.absent.append(item.key)
                return out
            self.remember(item.key, row)
            # Read just now: drop a field that changed since the plan was made (the next pass
            # reads that change and decides), and one that already holds the value.
            for f in list(values):
                current = row.get(f)
                if current == values[f] or (item.expected.get(f) is not None and current != item.expected[f]):
                    del values[f]
        if self._foreign(row):
            out.rejected.append(Rejected(item.key, 409, "the profile was not created by the integration: "
                                                        "left untouched"))
            return out
        if not values:
            out.written.append(item.key)
            return out
        out.requests += 1
        response = await self._call("PATCH", f"{self.base_url}{PROFILE_PATH}/{quote(str(row['PKey']), safe='@')}",
                                    values)
        if 200 <= response.status_code < 300:
            out.written.append(item.key)
        elif response.status_code == 404:  # deleted since: forget it, the next change looks it up again
            self._cache.pop(item.key, None)
            out.absent.append(item.key)
        elif response.status_code in (401, 403):
            raise_for_status(response, "Campaign profile update")
        else:
            out.rejected.append(Rejected(item.key, response.status_code, error_text(response)))
        return out


def _is_guid(key: str) -> bool:
    if len(key) != _GUID_LEN:
        return False
    try:
        uuid.UUID(key)
    except ValueError:
        return False
    return True


class DynamicsOptOutWriter:
    def __init__(self, base_url: str, tokens: TokenProvider, transport: Transport, *, entity_set: str = "contacts",
                 batch_size: int = MAX_BATCH_REQUESTS) -> None:
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.tokens, self.transport, self.entity_set = tokens, transport, entity_set
        self.batch_size = max(1, min(MAX_BATCH_REQUESTS, batch_size))

    async def read(self, key: str, fields: Sequence[str]) -> dict[str, Any] | None:
        """One contact's current ``fields``; None when there is no such contact."""
        if not _is_guid(key):
            return None
        response = await self.transport.request(
            "GET", f"{self.base_url}{self.entity_set}({key.lower()})?$select={','.join(fields)}", headers=_ODATA,
            auth=self.tokens)
        if response.status_code == 404:
            return None
        raise_for_status(response, f"read of one of {self.entity_set}")
        body = response.json()
        return dict(body) if isinstance(body, dict) else None

    async def write(self, items: Sequence[tuple[str, Mapping[str, bool]]]) -> Outcome:
        """Update-only ``PATCH`` parts (``If-Match: *``: a contact that is gone is not created
        again); a partial ``$batch`` answer counts part by part (see ``run_batches``)."""
        out = Outcome()
        pending: list[tuple[str, dict[str, bool]]] = []
        for key, values in items:
            if _is_guid(key):
                pending.append((key.lower(), dict(values)))
            else:
                out.absent.append(key)  # not a contactid: no contact can match it
        what = f"$batch to {self.entity_set}"

        async def send(chunk: Sequence[tuple[str, dict[str, bool]]]) -> Sequence[PartResponse | None]:
            out.requests += len(chunk)
            return await send_batch(self.transport, self.tokens, self.base_url, [
                BatchPart("PATCH", f"{self.base_url}{self.entity_set}({key})",
                          json.dumps(values, separators=(",", ":")).encode(), (("If-Match", "*"),))
                for key, values in chunk], what)

        for (key, _), part in await run_batches(pending, self.batch_size, send, self.transport, what):
            if 200 <= part.status < 300:
                out.written.append(key)
            elif part.status == 404:
                out.absent.append(key)
            else:
                try:
                    message = error_text_of_part(part.body)
                except ValueError:
                    message = ""
                out.rejected.append(Rejected(key, part.status, message or f"HTTP {part.status}"))
        return out


def error_text_of_part(body: bytes) -> str:
    return error_text_of(json.loads(body or b"{}")) or body.decode("utf-8", "replace")[:500]
