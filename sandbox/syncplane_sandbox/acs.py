"""The Adobe Campaign Standard REST API emulator (HTTP side).

Endpoints (``{base}`` = ``http://host:port/{ORG}/campaign/``):

* ``POST /ims/token/v3`` — client credentials → bearer token (``expires_in`` in seconds).
* Every API call needs ``Authorization: Bearer <token>`` (else 401 ``401013``) and
  ``X-Api-Key: <client id>`` (missing → 403 ``403000``, not the token's client → 403 ``403003``).
* ``{base}profileAndServices/profile`` (alias ``profileAndServicesExt/profile``),
  ``{base}customResources/<name>`` and the read-only ``{base}events`` feed:

  - ``GET`` list: ``_lineCount`` (default 25, max 10,000), ``next.href`` paging with an opaque
    ``_lineStart``; a resource holding more than 100,000 records only pages with
    ``_forcePagination=true`` (without it the first page comes back with no ``next``).
  - ``GET …/by<Key>?<key>_parameter=v`` (``byExternalId``, ``byCrmId``, ``byEventId``) →
    ``{"content": [0 or 1 record]}``.
  - ``GET …/byLastModified?lastModified_parameter=<ts>``: records with ``lastModified >= ts``
    ascending (inclusive: the last record seen comes back once; dedupe by key). The events
    feed also takes ``GET {base}events?lastModified_parameter=<ts>``.
  - ``GET …/_count``; ``POST`` → 201 + record with its generated ``PKey``;
    ``GET|PATCH|DELETE …/<PKey>`` (200; 404 when absent).
* ``GET {base}<section>/resourceType/<name>``: field schema (names, types, lengths).

Errors are ``{"code": status, "error_code": "...", "message": "...", "field": "..."}``; a
second record with the same unique key → 409 ``SBX-409-DUPLICATE-KEY``; too long → 400
``SBX-400-TOO-LONG`` (truncating is the client's job).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from syncplane_sandbox.acs_state import (
    DEFAULT_LINE_COUNT,
    INVALID_VALUE,
    MAX_LINE_COUNT,
    NOT_FOUND,
    POISON,
    AcsError,
    AcsField,
    AcsFilter,
    AcsResource,
    AcsState,
    parse_acs_time,
)
from syncplane_sandbox.common import (
    EmulatorApp,
    EmulatorParts,
    Json,
    SchemaOps,
    apply_schema_change,
    b64url_decode,
    b64url_encode,
    bearer_of,
    json_response,
)

TOKEN_PATH = "/ims/token/v3"


class AcsEmulator(EmulatorApp):
    server_name = "acs"

    def __init__(self, state: AcsState, parts: EmulatorParts) -> None:
        super().__init__(parts)
        self.state = state
        self.event_generator: Callable[[int, random.Random], int] | None = None
        r = self.app.router
        r.add_post(TOKEN_PATH, self._token)
        r.add_route("*", "/{org}/campaign/{tail:.*}", self._api)
        r.add_post("/_sandbox/events/generate", self._ctl_generate_events)
        self.control_schema("resources", self._ctl_resources, self._ctl_schema)
        r.add_post("/_sandbox/resources/{name}/records", self._ctl_create)
        r.add_patch("/_sandbox/resources/{name}/records/{pkey}", self._ctl_update)
        r.add_delete("/_sandbox/resources/{name}/records/{pkey}", self._ctl_delete)
        self.control_poison(state, "resource")
        r.add_put("/_sandbox/force-pagination-threshold", self._ctl_threshold)
        r.add_put("/_sandbox/link-delete", self._ctl_link_delete)

    # -------------------------------------------------------------- EmulatorApp hooks
    def is_auth_path(self, path: str) -> bool:
        return path == TOKEN_PATH

    async def identify(self, request: web.Request) -> str | None:
        if request.path == TOKEN_PATH:
            if request.method != "POST":
                return None
            value = (await request.post()).get("client_id")
            return value if isinstance(value, str) else None
        token = bearer_of(request)
        issued = self.tokens.lookup(token) if token else None
        return issued.client_id if issued else request.headers.get("X-Api-Key")

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        return json_response({"code": status, "error_code": code, "message": message}, status=status, headers=headers)

    def info(self) -> dict[str, Json]:
        return {"org": self.state.org, "resources": {n: len(r) for n, r in self.state.resources.items()}}

    # -------------------------------------------------------------- IMS
    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if form.get("grant_type") != "client_credentials":
            return json_response({"error": "unsupported_grant_type", "error_description": "grant_type must be "
                                  "client_credentials"}, status=400)
        if not isinstance(client_id, str) or not self.tokens.known_client(client_id):
            return json_response({"error": "invalid_client", "error_description": "invalid client_id parameter"},
                                 status=401)
        if not isinstance(secret, str) or not self.tokens.check_secret(client_id, secret):
            return json_response({"error": "invalid_client", "error_description": "invalid client_secret parameter"},
                                 status=401)
        token = self.tokens.issue(client_id)
        return json_response({"access_token": token.value, "token_type": "bearer",
                              "expires_in": int(self.tokens.lifetime)})

    # -------------------------------------------------------------- API
    def _base(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}/{self.state.org}/campaign/"

    async def _api(self, request: web.Request) -> web.Response:
        api_key = request.headers.get("X-Api-Key")
        if not api_key:
            return self.error(403, "403000", "Api Key is required")
        token = bearer_of(request)
        client = self.tokens.validate(token) if token else None
        if client is None:
            return self.error(401, "401013", "Oauth token is not valid")
        if api_key != client:
            return self.error(403, "403003", "Api Key is invalid")
        if request.match_info["org"] != self.state.org:
            return self.error(404, NOT_FOUND, f"Unknown organization '{request.match_info['org']}'.")
        try:
            return await self._route(request, client)
        except AcsError as exc:
            return json_response(exc.body(), status=exc.status)

    async def _route(self, request: web.Request, client: str) -> web.Response:
        segments = [s for s in request.match_info["tail"].split("/") if s]
        base = self._base(request)
        if len(segments) == 3 and segments[1] == "resourceType":
            res = self.state.resources.get(segments[2])
            if res is None or request.method != "GET":
                raise AcsError(404, NOT_FOUND, f"Unknown resource type '{segments[2]}'.")
            return json_response(self.resource_type(res, base))
        res, rest = self._resource(segments)
        m = request.method
        if not rest:
            if m == "GET":
                alias = res.filters["byLastModified"] if "lastModified_parameter" in request.query else None
                return self._list(request, res, base, alias)
            if m == "POST":
                return await self._create(request, res, base, client)
            raise AcsError(405, INVALID_VALUE, f"{m} is not allowed on a collection.")
        if len(rest) != 1:
            raise AcsError(404, NOT_FOUND, "Unknown path.")
        item = rest[0]
        if item == "_count":
            return json_response({"count": len(res)})
        if item in res.filters:
            if m != "GET":
                raise AcsError(405, INVALID_VALUE, "Filters are read-only.")
            return self._list(request, res, base, res.filters[item])
        if item.startswith("by"):
            raise AcsError(404, NOT_FOUND, f"Unknown filter '{item}' on resource '{res.name}'.")
        if m == "GET":
            if item not in res.rows:
                raise AcsError(404, NOT_FOUND, f"No {res.name} with PKey '{item}'.")
            return json_response(res.output(item, base))
        if m == "PATCH":
            return await self._update(request, res, base, item)
        if m == "DELETE":
            self._writable(res)
            self._poison(res, [item, (res.rows.get(item) or {}).get(res.key_field or "")])
            if not res.delete(item):
                raise AcsError(404, NOT_FOUND, f"No {res.name} with PKey '{item}'.")
            return web.Response(status=200)
        raise AcsError(405, INVALID_VALUE, f"{m} is not allowed on a record.")

    def _resource(self, segments: list[str]) -> tuple[AcsResource, list[str]]:
        if len(segments) >= 2 and segments[0] in ("profileAndServices", "profileAndServicesExt"):
            if segments[1] == "profile":
                return self.state.profiles, segments[2:]
        elif len(segments) >= 2 and segments[0] == "customResources":
            res = self.state.resources.get(segments[1])
            if res is not None and res.section == "customResources":
                return res, segments[2:]
        elif segments and segments[0] == "events":
            return self.state.events, segments[1:]
        raise AcsError(404, NOT_FOUND, f"Unknown resource '{'/'.join(segments)}'.")

    @staticmethod
    def resource_type(res: AcsResource, base: str) -> dict[str, Any]:
        content: dict[str, Any] = {"PKey": {"type": "string", "readOnly": True, "label": "Primary key"}}
        for name, f in res.fields.items():
            desc: dict[str, Any] = {"type": f.type, "label": name, "readOnly": f.read_only or not res.writable}
            if f.max_length is not None:
                desc["length"] = f.max_length
            if f.target is not None:
                desc["target"] = f.target
            if name == res.key_field:
                desc["unique"] = True
            content[name] = desc
        for name in ("created", "lastModified"):
            content[name] = {"type": "datetime", "readOnly": True, "label": name}
        content["createdBy"] = {"type": "link", "readOnly": True, "label": "Created by"}
        return {"name": res.name, "label": res.label, "href": f"{base}{res.section}/resourceType/{res.name}",
                "key": res.key_field, "content": content,
                "filters": {n: {"parameter": f.parameter, "field": f.field,
                                "operator": ">=" if f.kind == "since" else "="} for n, f in res.filters.items()}}

    def _list(self, request: web.Request, res: AcsResource, base: str, filt: AcsFilter | None) -> web.Response:
        q = request.query
        try:
            line_count = int(q.get("_lineCount", DEFAULT_LINE_COUNT))
        except ValueError:
            raise AcsError(400, INVALID_VALUE, "_lineCount must be an integer.") from None
        if not 0 < line_count <= MAX_LINE_COUNT:
            raise AcsError(400, INVALID_VALUE, f"_lineCount must be between 1 and {MAX_LINE_COUNT}.")
        force = q.get("_forcePagination", "").lower() == "true"
        cursor: dict[str, Any] = {}
        if "_lineStart" in q:
            try:
                cursor = b64url_decode(q["_lineStart"])
                if not isinstance(cursor, dict):
                    raise ValueError
            except ValueError:
                raise AcsError(400, INVALID_VALUE, "Invalid _lineStart.") from None
        collection = res.collection_path
        path = collection
        if filt is not None and request.path.rstrip("/").endswith("/" + filt.name):
            path += "/" + filt.name
        params: list[tuple[str, str]] = []
        count: int | None = None
        more = False
        next_cursor: dict[str, Any] = {}
        if filt is not None and filt.kind == "eq":
            if filt.parameter not in q:
                raise AcsError(400, INVALID_VALUE, f"Missing parameter '{filt.parameter}'.")
            pk = res.find(q[filt.parameter])
            pkeys = [pk] if pk is not None else []
            count = len(pkeys)
        elif filt is not None:
            raw = q.get(filt.parameter)
            if raw is None:
                raise AcsError(400, INVALID_VALUE, f"Missing parameter '{filt.parameter}'.")
            try:
                since = parse_acs_time(raw)
            except ValueError:
                raise AcsError(400, INVALID_VALUE, f"Invalid timestamp '{raw}' for '{filt.parameter}'.") from None
            pkeys, position, more = res.modified_since(since, cursor.get("p"), line_count)
            params.append((filt.parameter, raw))
            next_cursor = {"p": position}
        else:
            pkeys, last, more = res.page(int(cursor.get("s", 0)), line_count)
            count = len(res)
            next_cursor = {"s": last}
        body: dict[str, Any] = {"content": [res.output(pk, base) for pk in pkeys]}
        if count is not None:
            body["count"] = {"href": f"{base}{collection}/_count", "value": count}
        paginate = force or len(res) <= self.state.force_pagination_threshold
        body["serverSidePagination"] = paginate
        if more and paginate:
            params.append(("_lineCount", str(line_count)))
            if force:
                params.append(("_forcePagination", "true"))
            params.append(("_lineStart", b64url_encode(next_cursor)))
            body["next"] = {"href": f"{base}{path}?{urlencode(params)}"}
        return json_response(body)

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            raise AcsError(400, INVALID_VALUE, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise AcsError(400, INVALID_VALUE, "The request body must be a JSON object.")
        return body

    @staticmethod
    def _writable(res: AcsResource) -> None:
        if not res.writable:
            raise AcsError(405, INVALID_VALUE, f"Resource '{res.name}' is read-only.")

    def _poison(self, res: AcsResource, candidates: list[Any]) -> None:
        hit = self.state.is_poisoned(res.name, candidates)
        if hit is not None:
            raise AcsError(400, POISON, f"Sandbox poison record: {res.name} '{hit}' is rejected.")

    async def _create(self, request: web.Request, res: AcsResource, base: str, client: str) -> web.Response:
        self._writable(res)
        values = res.validate(await self._json_body(request))
        self._poison(res, [values.get(res.key_field or "")])
        pkey = res.create(values, created_by=client)
        return json_response(res.output(pkey, base), status=201)

    async def _update(self, request: web.Request, res: AcsResource, base: str, pkey: str) -> web.Response:
        self._writable(res)
        if pkey not in res.rows:
            raise AcsError(404, NOT_FOUND, f"No {res.name} with PKey '{pkey}'.")
        values = res.validate(await self._json_body(request), pkey)
        key = res.key_field or ""
        self._poison(res, [pkey, res.rows[pkey].get(key), values.get(key)])
        res.update(pkey, values)
        return json_response(res.output(pkey, base))

    # -------------------------------------------------------------- control routes
    async def _ctl_generate_events(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.event_generator is None:
            raise ValueError("event generation is not wired")
        rng = random.Random(body.get("seed"))
        return json_response({"generated": self.event_generator(int(body["count"]), rng),
                              "total": len(self.state.events)})

    async def _ctl_resources(self, request: web.Request) -> web.Response:
        base = self._base(request)
        return json_response({n: self.resource_type(r, base) | {"records": len(r)}
                              for n, r in self.state.resources.items()})

    async def _ctl_schema(self, request: web.Request) -> web.Response:
        """A schema change of one resource: :func:`~syncplane_sandbox.common.apply_schema_change` by ``"field"``."""
        res = self.state.resource(request.match_info["name"])
        apply_schema_change(await request.json(), "field", SchemaOps(
            res.rename_field, res.retype_field, res.drop_field,
            lambda name, type, max_length: res.add_field(AcsField(name, type, max_length))))
        return json_response(self.resource_type(res, self._base(request)))

    async def _ctl_create(self, request: web.Request) -> web.Response:
        res = self.state.resource(request.match_info["name"])
        body = await request.json()
        created_by = body.pop("createdBy", None) or "marketing-user"
        try:
            pkey = res.create(res.validate(body), created_by)
        except AcsError as exc:
            return json_response(exc.body(), status=exc.status)
        return json_response(res.output(pkey, self._base(request)), status=201)

    async def _ctl_update(self, request: web.Request) -> web.Response:
        res = self.state.resource(request.match_info["name"])
        pkey = request.match_info["pkey"]
        try:
            res.set(pkey, **(await request.json()))
        except AcsError as exc:
            return json_response(exc.body(), status=exc.status)
        return json_response(res.output(pkey, self._base(request)))

    async def _ctl_delete(self, request: web.Request) -> web.Response:
        res = self.state.resource(request.match_info["name"])
        return web.Response(status=204 if res.delete(request.match_info["pkey"]) else 404)

    async def _ctl_link_delete(self, request: web.Request) -> web.Response:
        """``{"behaviour": "keep" | "cascade"}``: what a delete does to the records linking to it."""
        try:
            self.state.set_link_delete(str((await request.json())["behaviour"]))
        except (ValueError, KeyError, TypeError) as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response({"behaviour": self.state.link_delete})

    async def _ctl_threshold(self, request: web.Request) -> web.Response:
        self.state.force_pagination_threshold = int((await request.json())["rows"])
        return json_response({"rows": self.state.force_pagination_threshold})
