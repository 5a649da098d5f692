"""The Dynamics 365 / Dataverse Web API emulator (HTTP side): the routes.

The OData query parsing (``Prefer``, literals, keys, ``$filter``) is ``odata_query.py``, the
``$batch`` format ``odata_batch.py``, the tables and their rules ``d365_state.py``; the control
routes (``/_sandbox/...``) shared with the Campaign emulator are ``common.py``'s.

Endpoints (``{root}`` = ``http://host:port/api/data/v9.2/``):

* ``POST /{tenant}/oauth2/v2.0/token`` — client credentials → bearer token.
* ``GET {root}``, ``GET {root}$metadata`` (minimal CSDL), ``GET {root}WhoAmI``.
* ``GET {root}EntityDefinitions[(LogicalName='x')[/Attributes|/Keys]]`` (``$expand=Attributes,Keys``).
* ``GET {root}{set}``: ``Prefer: odata.maxpagesize=N`` (≤ 5000), ``$select``, ``$filter``
  (``col eq|ne|gt|ge|lt|le literal`` joined by ``and``), ``$top``, ``$count``; opaque
  ``$skiptoken`` next links; ``$skip`` → 400; ``$orderby``/``$expand`` → 501 (not emulated).
* ``Prefer: odata.track-changes`` → ``@odata.deltaLink`` on the last page; ``GET`` of it → changes,
  then ``$deletedEntity`` entries. Forbidden options with it → 400 ``QUERY_NOT_SUPPORTED_CODE``;
  expired token → 400 ``DELTA_TOKEN_EXPIRED_CODE``.
* ``GET|PATCH|DELETE {root}{set}(<guid>)`` and ``{set}(altkey='v')``; ``POST {root}{set}``.
* ``POST {root}$batch`` (multipart/mixed, change sets, ``odata.continue-on-error``).

Batch semantics: without ``Prefer: odata.continue-on-error`` processing stops at the
first failed request (or failed change set) and the batch answers ``400``; with it every
item runs and the batch answers ``200`` with ``Preference-Applied``. A failed change set
is rolled back and represented by the failing request's response alone.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from aiohttp import web

from syncplane_sandbox.common import (
    EmulatorApp,
    EmulatorParts,
    Json,
    RequestLog,
    RequestRecord,
    SchemaOps,
    apply_schema_change,
    b64url_decode,
    b64url_encode,
    bearer_of,
    dumps,
    json_response,
)
from syncplane_sandbox.d365_state import (
    BATCH_TOO_LARGE_CODE,
    CHANGE_TRACKING_DISABLED_CODE,
    DUPLICATE_CODE,
    EDM_TYPES,
    ETAG_MISMATCH_CODE,
    INVALID_TOKEN_CODE,
    INVALID_VALUE_CODE,
    NOT_FOUND_CODE,
    NOT_IMPLEMENTED_CODE,
    POISON_CODE,
    QUERY_NOT_SUPPORTED_CODE,
    UNKNOWN_PROPERTY_CODE,
    Column,
    D365State,
    ODataError,
    Table,
)
from syncplane_sandbox.odata_batch import (
    MAX_BATCH_REQUESTS,
    BatchFormatError,
    BatchRequest,
    ChangeSet,
    PartResponse,
    count_requests,
    parse_batch,
    write_batch_response,
)
from syncplane_sandbox.odata_query import (
    GUID,
    annotation_filter,
    compile_filter,
    parse_key,
    parse_prefer,
    split_segment,
)
from syncplane_sandbox.variants import ProtocolVariants

API_PREFIX = "/api/data/v9.2/"
MAX_PAGE_SIZE = 5000
ODATA_HEADERS = {"OData-Version": "4.0"}
JSON_TYPE = "application/json; odata.metadata=minimal"
_KNOWN_OPTIONS = {"$select", "$filter", "$orderby", "$top", "$expand", "$count", "$skip", "$skiptoken",
                  "$deltatoken", "$apply", "$search", "$format"}
_TRACK_FORBIDDEN = ("$filter", "$orderby", "$expand", "$top")


@dataclass
class ORequest:
    method: str
    target: str  # raw (percent-encoded) path and query relative to the service root
    headers: dict[str, str]  # lower-cased names
    body: bytes
    root: str  # absolute service root, ends with "/"
    client: str
    in_batch: bool = False


@dataclass
class OResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def odata_error_body(code: str, message: str) -> bytes:
    return dumps({"error": {"code": code, "message": message}})


def _error(exc: ODataError) -> OResponse:
    return OResponse(exc.status, {**ODATA_HEADERS, "Content-Type": JSON_TYPE, **exc.headers},
                     odata_error_body(exc.code, exc.message))


def _json(data: Json, status: int = 200, headers: dict[str, str] | None = None) -> OResponse:
    return OResponse(status, {**ODATA_HEADERS, "Content-Type": JSON_TYPE, **(headers or {})}, dumps(data))


# ---------------------------------------------------------------------- the emulator


class D365Emulator(EmulatorApp):
    server_name = "d365"

    def __init__(self, state: D365State, parts: EmulatorParts, tenant: str) -> None:
        super().__init__(parts)
        self.state = state
        self.tenant = tenant
        self.seeder: Callable[[dict[str, Any]], dict[str, int]] | None = None
        #: Documented variants switched on demand (``/_sandbox/variants``): see variants.py.
        self.variants = ProtocolVariants()
        #: One record per request inside a ``$batch`` (the outer POST is in the request log).
        self.batch_parts = RequestLog(parts.log._records.maxlen or 200_000)
        r = self.app.router
        r.add_post("/{tenant}/oauth2/v2.0/token", self._token)
        r.add_route("*", API_PREFIX + "{tail:.*}", self._api)
        r.add_route("*", API_PREFIX.rstrip("/"), self._api)
        r.add_post("/_sandbox/delta-tokens/expire", self._ctl_expire_delta)
        self.control_schema("tables", self._ctl_tables, self._ctl_schema)
        r.add_put("/_sandbox/tables/{name}/change-tracking", self._ctl_change_tracking)
        r.add_put("/_sandbox/tables/{name}/rows/{id}", self._ctl_put_row)
        r.add_delete("/_sandbox/tables/{name}/rows/{id}", self._ctl_delete_row)
        self.control_poison(state, "table")
        r.add_post("/_sandbox/seed", self._ctl_seed)
        self.control_switches("/_sandbox/variants", self.variants)
        r.add_put("/_sandbox/variants/paging", self._ctl_paging)
        r.add_put("/_sandbox/variants/batch", self._ctl_batch_variant)

    # -------------------------------------------------------------- EmulatorApp hooks
    def is_auth_path(self, path: str) -> bool:
        return path.endswith("/oauth2/v2.0/token")

    async def identify(self, request: web.Request) -> str | None:
        if self.is_auth_path(request.path):
            if request.method == "POST":
                form = await request.post()
                value = form.get("client_id")
                return value if isinstance(value, str) else None
            return None
        token = bearer_of(request)
        issued = self.tokens.lookup(token) if token else None
        return issued.client_id if issued else None

    def error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(status=status, body=odata_error_body(code, message),
                            headers={**ODATA_HEADERS, "Content-Type": JSON_TYPE, **(headers or {})})

    def info(self) -> dict[str, Json]:
        return {"tables": {s: len(t) for s, t in self.state.tables_by_set.items()}, "version": self.state.version}

    # -------------------------------------------------------------- OAuth2
    async def _token(self, request: web.Request) -> web.Response:
        def oauth_error(status: int, error: str, aadsts: int, description: str) -> web.Response:
            return json_response({"error": error, "error_description": f"AADSTS{aadsts}: {description}",
                                  "error_codes": [aadsts]}, status=status)

        if request.match_info["tenant"] != self.tenant:
            return oauth_error(400, "invalid_request", 90002, f"Tenant '{request.match_info['tenant']}' not found.")
        form = await request.post()
        grant = form.get("grant_type")
        client_id, secret, scope = form.get("client_id"), form.get("client_secret"), form.get("scope")
        if grant != "client_credentials":
            return oauth_error(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if not isinstance(client_id, str) or not self.tokens.known_client(client_id):
            return oauth_error(401, "invalid_client", 700016, "Application not found in the directory.")
        if not isinstance(secret, str) or not self.tokens.check_secret(client_id, secret):
            return oauth_error(401, "invalid_client", 7000215, "Invalid client secret provided.")
        if not isinstance(scope, str) or not scope.endswith("/.default"):
            return oauth_error(400, "invalid_scope", 70011, "The provided value for the input parameter 'scope' "
                               "is not valid; use '<resource>/.default'.")
        token = self.tokens.issue(client_id)
        lifetime = int(self.tokens.lifetime)
        return json_response({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                              "access_token": token.value})

    # -------------------------------------------------------------- HTTP entry
    async def _api(self, request: web.Request) -> web.Response:
        token = bearer_of(request)
        client = self.tokens.validate(token) if token else None
        if client is None:
            host = f"{request.scheme}://{request.host}"
            return web.Response(status=401, headers={
                "WWW-Authenticate": f'Bearer error="invalid_token", authorization_uri="{host}/{self.tenant}'
                                    f'/oauth2/authorize", resource_id="{host}/"', **ODATA_HEADERS})
        version = request.headers.get("OData-Version")
        if version is not None and version.strip() not in ("4.0", "4.01"):
            return self.error(400, INVALID_VALUE_CODE, f"OData-Version '{version}' is not supported; use 4.0.")
        raw_path = request.rel_url.raw_path
        target = raw_path[len(API_PREFIX):] if raw_path.startswith(API_PREFIX) else ""
        if request.rel_url.raw_query_string:
            target += "?" + request.rel_url.raw_query_string
        req = ORequest(request.method, target, {k.lower(): v for k, v in request.headers.items()},
                       await request.read(), f"{request.scheme}://{request.host}{API_PREFIX}", client)
        resp = self.dispatch(req)
        return web.Response(status=resp.status, headers=resp.headers, body=resp.body or None)

    def dispatch(self, req: ORequest) -> OResponse:
        """Serve one Web API request (synchronously: a change set is never interleaved)."""
        try:
            return self._dispatch(req)
        except ODataError as exc:
            return _error(exc)

    def _dispatch(self, req: ORequest) -> OResponse:
        raw_path, _, raw_query = req.target.partition("?")
        path = unquote(raw_path)
        query: dict[str, str] = {}
        for name, value in parse_qsl(raw_query, keep_blank_values=True):
            if name.startswith("$") and name not in _KNOWN_OPTIONS:
                raise ODataError(400, QUERY_NOT_SUPPORTED_CODE, f"The query parameter {name} is not supported")
            query[name] = value
        m = req.method
        if path in ("", "/"):
            return self._service_document(req)
        if path == "$metadata":
            return self._metadata()
        if path == "$batch":
            if m != "POST" or req.in_batch:
                raise ODataError(405 if m != "POST" else 400, INVALID_VALUE_CODE, "$batch must be POSTed, not nested.")
            return self._batch(req)
        if path in ("WhoAmI", "WhoAmI()"):
            return self._whoami(req)
        name, key, rest = split_segment(path)
        if name == "EntityDefinitions":
            return self._entity_definitions(req, key, rest, query)
        table = self.state.tables_by_set.get(name)
        if table is None:
            raise ODataError(404, UNKNOWN_PROPERTY_CODE, f"Resource not found for the segment '{name}'.")
        if rest:
            raise ODataError(501, NOT_IMPLEMENTED_CODE, "Property and navigation paths are not emulated.")
        if key is None:
            if m == "GET":
                return self._collection(req, table, query)
            if m == "POST":
                return self._create(req, table)
            raise ODataError(405, INVALID_VALUE_CODE, f"{m} is not allowed on an entity set.")
        if m == "GET":
            return self._get_one(req, table, key, query)
        if m == "PATCH":
            return self._upsert(req, table, key)
        if m == "DELETE":
            return self._delete(req, table, key)
        raise ODataError(405, INVALID_VALUE_CODE, f"{m} is not allowed on an entity.")

    # -------------------------------------------------------------- metadata
    def _service_document(self, req: ORequest) -> OResponse:
        return _json({"@odata.context": f"{req.root}$metadata", "value": [
            {"name": s, "kind": "EntitySet", "url": s} for s in self.state.tables_by_set]})

    def _whoami(self, req: ORequest) -> OResponse:
        user = uuid.uuid5(uuid.NAMESPACE_URL, f"sandbox-user:{req.client}")
        return _json({"@odata.context": f"{req.root}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
                      "BusinessUnitId": str(uuid.uuid5(uuid.NAMESPACE_URL, "sandbox-bu")),
                      "UserId": str(user), "OrganizationId": self.state.organization_id})

    def _metadata(self) -> OResponse:
        parts = ['<?xml version="1.0" encoding="utf-8"?><edmx:Edmx Version="4.0" '
                 'xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices>'
                 '<Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" '
                 'xmlns="http://docs.oasis-open.org/odata/ns/edm">']
        for t in self.state.tables_by_set.values():
            parts.append(f'<EntityType Name="{t.logical_name}"><Key><PropertyRef Name="{t.primary_key}"/></Key>')
            for c in t.columns.values():
                extra = f' MaxLength="{c.max_length}"' if c.max_length else ""
                parts.append(f'<Property Name="{c.output_name}" Type="{EDM_TYPES[c.type]}"{extra}/>')
            parts.append("</EntityType>")
        parts.append('<EntityContainer Name="System">')
        for t in self.state.tables_by_set.values():
            parts.append(f'<EntitySet Name="{t.entity_set}" EntityType="Microsoft.Dynamics.CRM.{t.logical_name}"/>')
        parts.append("</EntityContainer></Schema></edmx:DataServices></edmx:Edmx>")
        return OResponse(200, {**ODATA_HEADERS, "Content-Type": "application/xml"}, "".join(parts).encode())

    @staticmethod
    def attribute_metadata(table: Table, col: Column) -> dict[str, Any]:
        kind = {"String": "String", "Memo": "Memo", "EntityName": "EntityName", "Boolean": "Boolean",
                "Integer": "Integer", "BigInt": "BigInt", "State": "State", "Status": "Status", "Picklist": "Picklist",
                "Decimal": "Decimal", "Double": "Double", "Money": "Money", "DateTime": "DateTime",
                "Uniqueidentifier": "UniqueIdentifier", "Lookup": "Lookup", "Customer": "Lookup",
                "Owner": "Lookup"}[col.type]
        meta: dict[str, Any] = {
            "@odata.type": f"#Microsoft.Dynamics.CRM.{kind}AttributeMetadata",
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{table.logical_name}.{col.name}.{col.type}")),
            "LogicalName": col.name, "SchemaName": col.name, "EntityLogicalName": table.logical_name,
            "AttributeType": col.type, "AttributeTypeName": {"Value": f"{kind}Type"},
            "IsPrimaryId": col.name == table.primary_key, "IsValidForCreate": not col.read_only,
            "IsValidForUpdate": not col.read_only and col.name != table.primary_key,
        }
        if col.max_length is not None:
            meta["MaxLength"] = col.max_length
        if col.lookup:
            meta["Targets"] = [table.state.tables_by_set[t].logical_name for t in col.targets]
        if col.type == "DateTime":  # DateTimeAttributeMetadata
            meta["DateTimeBehavior"] = {"Value": col.behavior}
            meta["Format"] = "DateOnly" if col.date_only else "DateAndTime"
        return meta

    def entity_metadata(self, table: Table, attributes: bool, keys: bool) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"entity.{table.logical_name}")),
            "LogicalName": table.logical_name, "SchemaName": table.logical_name,
            "EntitySetName": table.entity_set, "PrimaryIdAttribute": table.primary_key,
            "ChangeTrackingEnabled": table.change_tracking, "IsCustomEntity": table.logical_name.startswith("new_"),
        }
        if attributes:
            meta["Attributes"] = [self.attribute_metadata(table, c) for c in table.columns.values()]
        if keys:
            meta["Keys"] = self._keys(table)
        return meta

    @staticmethod
    def _keys(table: Table) -> list[dict[str, Any]]:
        return [{"LogicalName": "_".join(k) + "_key", "KeyAttributes": list(k), "EntityKeyIndexStatus": "Active"}
                for k in table.alternate_keys]

    def _entity_definitions(self, req: ORequest, key: str | None, rest: str, query: dict[str, str]) -> OResponse:
        if req.method != "GET":
            raise ODataError(405, INVALID_VALUE_CODE, "Metadata is read-only in the sandbox.")
        expand = {e.strip().split("(")[0] for e in query.get("$expand", "").split(",") if e.strip()}
        select = [s.strip() for s in query.get("$select", "").split(",") if s.strip()]

        def shape(obj: dict[str, Any]) -> dict[str, Any]:
            if not select:
                return obj
            return {k: v for k, v in obj.items() if k in select or k in expand or k.startswith("@") or
                    k == "MetadataId"}

        if key is None:
            items = [self.entity_metadata(t, "Attributes" in expand, "Keys" in expand)
                     for t in self.state.tables_by_set.values()]
            if "$filter" in query:
                check = compile_filter(query["$filter"], lambda n: n)
                items = [i for i in items if check(i)]
            return _json({"@odata.context": f"{req.root}$metadata#EntityDefinitions",
                          "value": [shape(i) for i in items]})
        pairs = parse_key(key)
        logical = next((v for n, v in pairs if n == "LogicalName"), None)
        table = self.state.tables_by_logical.get(logical) if isinstance(logical, str) else None
        if table is None:
            raise ODataError(404, NOT_FOUND_CODE, f"Could not find an entity with key value '{key}'.")
        ctx = f"{req.root}$metadata#EntityDefinitions('{table.logical_name}')"
        cast = None
        if rest.startswith("Attributes/Microsoft.Dynamics.CRM."):
            # A cast to a derived metadata type, e.g. DateTimeAttributeMetadata: only those
            # attributes, and $select may name that type's own properties (DateTimeBehavior).
            rest, cast = "Attributes", rest.split("/", 1)[1]
        if rest == "Attributes":
            attrs = [self.attribute_metadata(table, c) for c in table.columns.values()]
            if cast is not None:
                attrs = [a for a in attrs if a["@odata.type"] == f"#{cast}"]
            if "$filter" in query:
                check = compile_filter(query["$filter"], lambda n: n)
                attrs = [a for a in attrs if check(a)]
            return _json({"@odata.context": ctx + "/Attributes", "value": [shape(a) for a in attrs]})
        if rest == "Keys":
            return _json({"@odata.context": ctx + "/Keys", "value": self._keys(table)})
        if rest:
            raise ODataError(501, NOT_IMPLEMENTED_CODE, f"Metadata path '{rest}' is not emulated.")
        return _json({"@odata.context": ctx, **shape(self.entity_metadata(table, "Attributes" in expand,
                                                                         "Keys" in expand))})

    # -------------------------------------------------------------- reads
    @staticmethod
    def _select(table: Table, query: dict[str, str]) -> list[str] | None:
        raw = query.get("$select")
        if raw is None or not raw.strip():
            return None
        by_output = {c.output_name: c.name for c in table.columns.values()}
        names = []
        for item in raw.split(","):
            item = item.strip()
            name = by_output.get(item) or (item if item in table.columns and not table.columns[item].lookup
                                           else None)
            if name is None:
                raise ODataError(400, UNKNOWN_PROPERTY_CODE, f"Could not find a property named '{item}' on type "
                                 f"'Microsoft.Dynamics.CRM.{table.logical_name}'.")
            names.append(name)
        return names

    def _context(self, req: ORequest, table: Table, select: list[str] | None, suffix: str = "") -> str:
        cols = "(" + ",".join(table.columns[s].output_name for s in select) + ")" if select else ""
        return f"{req.root}$metadata#{table.entity_set}{cols}{suffix}"

    @staticmethod
    def _link(req: ORequest, table: Table, params: list[tuple[str, str]]) -> str:
        encoded = "&".join(k + "=" + quote(v, safe=",'()" if k in ("$select", "$filter") else "") for k, v in params)
        return f"{req.root}{table.entity_set}?{encoded}"

    def _collection(self, req: ORequest, table: Table, query: dict[str, str]) -> OResponse:
        prefer = parse_prefer(req.headers.get("prefer"))
        if "$skip" in query:
            raise ODataError(400, QUERY_NOT_SUPPORTED_CODE, "The query parameter $skip is not supported")
        delta_token = query.get("$deltatoken")
        skip_token = query.get("$skiptoken")
        cursor: dict[str, Any] = {}
        if skip_token is not None:
            try:
                cursor = b64url_decode(skip_token)
                if not isinstance(cursor, dict) or cursor.get("k") != ("d" if delta_token is not None else "p"):
                    raise ValueError
            except ValueError:
                raise ODataError(400, INVALID_TOKEN_CODE, "Invalid $skiptoken.") from None
        track = "odata.track-changes" in prefer or delta_token is not None or bool(cursor.get("t"))
        if track:
            for option in _TRACK_FORBIDDEN:
                if option in query:
                    raise ODataError(400, QUERY_NOT_SUPPORTED_CODE, f"The query parameter {option} is not supported "
                                     "when change tracking (Prefer: odata.track-changes) is requested.")
            if not table.change_tracking:
                raise ODataError(400, CHANGE_TRACKING_DISABLED_CODE, f"Change tracking is not enabled for the "
                                 f"'{table.logical_name}' entity.")
        for option in ("$orderby", "$expand", "$apply", "$search"):
            if option in query:
                raise ODataError(501, NOT_IMPLEMENTED_CODE, f"The sandbox does not emulate {option}.")
        select = self._select(table, query)
        requested = prefer.get("odata.maxpagesize")
        page_size = int(cursor.get("n", MAX_PAGE_SIZE))
        applied = []
        if requested is not None:
            try:
                page_size = int(requested)
            except ValueError:
                raise ODataError(400, INVALID_VALUE_CODE, "odata.maxpagesize must be an integer.") from None
            if page_size <= 0:
                raise ODataError(400, INVALID_VALUE_CODE, "odata.maxpagesize must be positive.")
            page_size = min(page_size, MAX_PAGE_SIZE)
            applied.append(f"odata.maxpagesize={page_size}")
        if track:
            applied.append("odata.track-changes")
        annotations = annotation_filter(prefer)
        if annotations is not None:
            applied.append(f'odata.include-annotations="{prefer["odata.include-annotations"]}"')
        headers = {"Preference-Applied": ",".join(applied)} if applied else {}
        keep: list[tuple[str, str]] = [(k, query[k]) for k in ("$select", "$filter") if k in query]
        if delta_token is not None:
            return self._delta_page(req, table, select, delta_token, cursor, page_size, keep, headers)

        predicate = None
        if "$filter" in query:
            by_output = {c.output_name: c.name for c in table.columns.values()}

            def resolve(name: str) -> str:
                if name in by_output:
                    return by_output[name]
                raise ODataError(400, UNKNOWN_PROPERTY_CODE, f"Could not find a property named '{name}' on type "
                                 f"'Microsoft.Dynamics.CRM.{table.logical_name}'.")

            predicate = compile_filter(query["$filter"], resolve)
        remaining: int | None = cursor.get("r")
        if "$top" in query and not cursor:
            try:
                remaining = int(query["$top"])
            except ValueError:
                raise ODataError(400, INVALID_VALUE_CODE, "$top must be an integer.") from None
        upto = int(cursor.get("w", self.state.version))
        limit = page_size if remaining is None else min(page_size, remaining)
        ids, last, more = table.page(int(cursor.get("a", 0)), limit, predicate)
        if remaining is not None:
            remaining -= len(ids)
            more = more and remaining > 0
        body: dict[str, Any] = {"@odata.context": self._context(req, table, select)}
        if query.get("$count", "").lower() == "true":
            body["@odata.count"] = (len(table) if predicate is None else
                                    sum(1 for row in table.rows.values() if predicate(row)))
        body["value"] = [table.output(rid, select, annotations) for rid in ids]
        if more:
            token = b64url_encode({"k": "p", "a": last, "w": upto, "t": track, "n": page_size, "r": remaining})
            body["@odata.nextLink"] = self._link(req, table, [*keep, ("$skiptoken", token)])
        elif track:
            body["@odata.deltaLink"] = self._link(req, table, [*keep, ("$deltatoken",
                                                                        self.state.make_delta_token(upto))])
        if track:
            body = self.variants.paging.apply(body, req.root + req.target, self._link(req, table, keep))
        return _json(body, headers=headers)

    def _delta_page(self, req: ORequest, table: Table, select: list[str] | None, delta_token: str,
                    cursor: dict[str, Any], page_size: int, keep: list[tuple[str, str]],
                    headers: dict[str, str]) -> OResponse:
        since = self.state.parse_delta_token(delta_token)
        upto = int(cursor.get("w", self.state.version))
        offset = int(cursor.get("o", 0))
        changes = self.state.delta(table, since, upto)
        page = changes[offset:offset + page_size]
        deleted_ctx = f"{req.root}$metadata#{table.entity_set}/$deletedEntity"
        value: list[dict[str, Any]] = []
        for rid, deleted in page:
            if deleted or rid not in table.rows:
                value.append({"@odata.context": deleted_ctx, "id": rid, "reason": "deleted"})
            else:
                value.append(table.output(rid, select, annotation_filter(parse_prefer(req.headers.get("prefer")))))
        body: dict[str, Any] = {"@odata.context": self._context(req, table, select, "/$delta"), "value": value}
        if offset + page_size < len(changes):
            token = b64url_encode({"k": "d", "o": offset + page_size, "w": upto, "n": page_size})
            body["@odata.nextLink"] = self._link(req, table, [*keep, ("$deltatoken", delta_token),
                                                              ("$skiptoken", token)])
        else:
            body["@odata.deltaLink"] = self._link(req, table, [*keep, ("$deltatoken",
                                                                        self.state.make_delta_token(upto))])
        body = self.variants.paging.apply(body, req.root + req.target,
                                          self._link(req, table, [*keep, ("$deltatoken", delta_token)]))
        if "odata.track-changes" not in headers.get("Preference-Applied", ""):
            headers = {"Preference-Applied": ",".join(filter(None, [headers.get("Preference-Applied"),
                                                                     "odata.track-changes"]))}
        return _json(body, headers=headers)

    def _resolve(self, table: Table, key: str) -> tuple[str | None, dict[str, Any]]:
        """(row id or None, alternate-key values given in the URL — empty for a primary key)."""
        pairs = parse_key(key)
        if len(pairs) == 1 and (pairs[0][0] is None or pairs[0][0] == table.primary_key):
            value = pairs[0][1]
            if not isinstance(value, str) or not GUID.match(value):
                raise ODataError(400, INVALID_VALUE_CODE, f"Invalid key '{key}' for '{table.entity_set}'.")
            return value.lower(), {}
        if any(name is None for name, _ in pairs):
            raise ODataError(400, INVALID_VALUE_CODE, f"Invalid key '{key}' for '{table.entity_set}'.")
        key_values = {str(name): value for name, value in pairs}
        for name, value in key_values.items():
            table.coerce(name, value)
        return table.find_by_key(key_values), key_values

    def _not_found(self, table: Table, key: str, rid: str | None) -> ODataError:
        if rid is not None:
            return ODataError(404, NOT_FOUND_CODE, f"{table.logical_name} With Id = {rid} Does Not Exist")
        return ODataError(404, NOT_FOUND_CODE, f"A record with the specified key values does not exist in "
                          f"{table.logical_name} entity ({key}).")

    def _get_one(self, req: ORequest, table: Table, key: str, query: dict[str, str]) -> OResponse:
        rid, _ = self._resolve(table, key)
        if rid is None or rid not in table.rows:
            raise self._not_found(table, key, rid)
        select = self._select(table, query)
        body = {"@odata.context": self._context(req, table, select, "/$entity"),
                **table.output(rid, select, annotation_filter(parse_prefer(req.headers.get("prefer"))))}
        return _json(body, headers={"ETag": table.etag(rid)})

    # -------------------------------------------------------------- writes
    @staticmethod
    def _body(req: ORequest) -> dict[str, Any]:
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            raise ODataError(400, INVALID_VALUE_CODE, "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise ODataError(400, INVALID_VALUE_CODE, "The request body must be a JSON object.")
        return body

    def _check_poison(self, table: Table, candidates: list[Any]) -> None:
        hit = self.state.is_poisoned(table, candidates)
        if hit is not None:
            raise ODataError(400, POISON_CODE, f"Sandbox poison record: a plug-in rejected the write of "
                             f"{table.logical_name} '{hit}'.")

    def _written(self, req: ORequest, table: Table, rid: str, created: bool) -> OResponse:
        location = f"{req.root}{table.entity_set}({rid})"
        headers = {"OData-EntityId": location}
        if parse_prefer(req.headers.get("prefer")).get("return") == "representation":
            body = {"@odata.context": self._context(req, table, None, "/$entity"), **table.output(rid)}
            return _json(body, 201 if created else 200,
                         {**headers, "Preference-Applied": "return=representation", "ETag": table.etag(rid)})
        return OResponse(204, {**ODATA_HEADERS, **headers})

    def _create(self, req: ORequest, table: Table) -> OResponse:
        body = self._body(req)
        values = table.coerce_record(body)
        rid = values.pop(table.primary_key, None) or str(uuid.uuid4())
        self._check_poison(table, [rid, *(values.get(c) for k in table.alternate_keys for c in k)])
        table.write(rid, values, create=True)
        return self._written(req, table, rid, True)

    def _upsert(self, req: ORequest, table: Table, key: str) -> OResponse:
        body = self._body(req)
        values = table.coerce_record(body)
        rid, key_values = self._resolve(table, key)
        self._check_poison(table, [rid, *key_values.values(), values.get(table.primary_key),
                                   *(values.get(c) for k in table.alternate_keys for c in k)])
        body_id = values.pop(table.primary_key, None)
        if body_id is not None and rid is not None and body_id != rid:
            raise ODataError(400, INVALID_VALUE_CODE, f"The primary key '{table.primary_key}' in the body does not "
                             "match the key in the URL.")
        exists = rid is not None and rid in table.rows
        if_match = req.headers.get("if-match")
        if_none_match = req.headers.get("if-none-match")
        if if_none_match is not None and if_none_match.strip() == "*" and exists:
            raise ODataError(412, DUPLICATE_CODE, "A record with matching key values already exists.")
        if if_match is not None and if_match.strip():
            if not exists:
                raise self._not_found(table, key, rid)
            assert rid is not None
            if if_match.strip() != "*" and if_match.strip() != table.etag(rid):
                raise ODataError(412, ETAG_MISMATCH_CODE, "The version of the existing record doesn't match the "
                                 "RowVersion property provided.")
        if not exists:
            rid = rid or body_id or str(uuid.uuid4())
            values.update(key_values)
        assert rid is not None
        created = table.write(rid, values)
        return self._written(req, table, rid, created)

    def _delete(self, req: ORequest, table: Table, key: str) -> OResponse:
        rid, key_values = self._resolve(table, key)
        self._check_poison(table, [rid, *key_values.values()])
        if rid is None or not table.delete(rid):
            raise self._not_found(table, key, rid)
        return OResponse(204, dict(ODATA_HEADERS))

    # -------------------------------------------------------------- $batch
    def _inner_target(self, url: str, root: str, ids: dict[str, str]) -> str:
        if url.startswith("$"):
            ref, slash, rest = url[1:].partition("/")
            if ref not in ids:
                raise ODataError(400, INVALID_VALUE_CODE, f"Unknown Content-ID reference '${ref}'.")
            url = ids[ref] + (slash + rest if slash else "")
        if "://" in url:
            parts = urlsplit(url)
            url = parts.path + ("?" + parts.query if parts.query else "")
        idx = url.find(API_PREFIX)
        if idx >= 0:
            return url[idx + len(API_PREFIX):]
        if url.startswith("/"):
            raise ODataError(400, INVALID_VALUE_CODE, f"Request URL '{url}' is outside the service root.")
        return url

    def _run_part(self, outer: ORequest, part: BatchRequest, ids: dict[str, str]) -> PartResponse:
        try:
            target = self._inner_target(part.url, outer.root, ids)
            resp = self.dispatch(ORequest(part.method, target, part.headers, part.body, outer.root, outer.client,
                                          in_batch=True))
        except ODataError as exc:
            resp = _error(exc)
        now_mono, now_wall = time.monotonic(), time.time()
        self.batch_parts.append(RequestRecord(
            seq=self.batch_parts.next_seq(), server=self.server_name, received_monotonic=now_mono,
            received_wall=now_wall, responded_monotonic=now_mono, method=part.method, path=part.url,
            status=resp.status, retry_after=None, client=outer.client, fault=None, duration_ms=0.0))
        return PartResponse(resp.status, resp.headers, resp.body, part.content_id)

    def _batch(self, req: ORequest) -> OResponse:
        try:
            items = parse_batch(req.headers.get("content-type", ""), req.body)
        except BatchFormatError as exc:
            raise ODataError(400, INVALID_VALUE_CODE, f"Invalid batch request: {exc}") from None
        total = count_requests(items)
        if total > MAX_BATCH_REQUESTS:
            raise ODataError(400, BATCH_TOO_LARGE_CODE, f"The number of requests in the batch ({total}) exceeded the "
                             f"limit of {MAX_BATCH_REQUESTS}.")
        # Without the preference in effect (not asked, or ignored per the variant switch), processing
        # stops at the first failure; the batch then answers 400 (Dataverse) or 200 (OData 4.0).
        variant = self.variants.batch
        continue_on_error = (variant.continue_on_error == "honour"
                             and "odata.continue-on-error" in parse_prefer(req.headers.get("prefer")))
        out: list[PartResponse | list[PartResponse]] = []
        failed = False
        for item in items:
            if isinstance(item, ChangeSet):
                ids: dict[str, str] = {}
                done: list[PartResponse] = []
                error: PartResponse | None = None
                with self.state.transaction() as tx:
                    for part in item.requests:
                        if part.method == "GET":
                            resp = PartResponse(400, {**ODATA_HEADERS, "Content-Type": JSON_TYPE}, odata_error_body(
                                INVALID_VALUE_CODE, "GET requests are not allowed inside a change set."),
                                part.content_id)
                        else:
                            resp = self._run_part(req, part, ids)
                        if resp.status >= 400:
                            tx.rollback()
                            error = resp
                            break
                        done.append(resp)
                        if part.content_id and "OData-EntityId" in resp.headers:
                            ids[part.content_id] = resp.headers["OData-EntityId"]
                if error is not None:
                    out.append(error)
                    failed = True
                else:
                    out.append(done)
            else:
                resp = self._run_part(req, item, {})
                if not variant.content_ids:
                    resp.content_id = None  # Dataverse echoes Content-ID inside change sets only
                out.append(resp)
                failed = failed or resp.status >= 400
            if failed and not continue_on_error:
                break
        content_type, body = write_batch_response(out)
        headers = {**ODATA_HEADERS, "Content-Type": content_type}
        if continue_on_error:
            headers["Preference-Applied"] = "odata.continue-on-error"
            return OResponse(200, headers, body)
        return OResponse(400 if failed and variant.continue_on_error != "ignore-200" else 200, headers, body)

    # -------------------------------------------------------------- control routes
    async def _ctl_expire_delta(self, request: web.Request) -> web.Response:
        self.state.expire_delta_tokens()
        return json_response({"expired": True, "version": self.state.version})

    async def _ctl_tables(self, request: web.Request) -> web.Response:
        return json_response({s: self.entity_metadata(t, True, True) | {"rows": len(t)}
                              for s, t in self.state.tables_by_set.items()})

    async def _ctl_schema(self, request: web.Request) -> web.Response:
        """A schema change of one table: :func:`~syncplane_sandbox.common.apply_schema_change` by ``"column"``."""
        table = self.state.table(request.match_info["name"])
        apply_schema_change(await request.json(), "column", SchemaOps(
            table.rename_column, table.retype_column, table.drop_column,
            lambda name, type, max_length: table.add_column(Column(name, type, max_length))))
        return json_response(self.entity_metadata(table, True, True))

    async def _ctl_change_tracking(self, request: web.Request) -> web.Response:
        table = self.state.table(request.match_info["name"])
        table.change_tracking = bool((await request.json())["enabled"])
        return json_response({"ChangeTrackingEnabled": table.change_tracking})

    async def _ctl_put_row(self, request: web.Request) -> web.Response:
        table = self.state.table(request.match_info["name"])
        try:
            rid = table.upsert(request.match_info["id"], **(await request.json()))
        except ODataError as exc:
            return json_response({"error": exc.message}, status=exc.status)
        return json_response(table.output(rid))

    async def _ctl_delete_row(self, request: web.Request) -> web.Response:
        table = self.state.table(request.match_info["name"])
        return web.Response(status=204 if table.delete(str(uuid.UUID(request.match_info["id"]))) else 404)

    async def _ctl_paging(self, request: web.Request) -> web.Response:
        """``{"default": "keep|no-link|repeat|loop", "script": [action, ...]}`` (either key)."""
        body = await request.json()
        self.variants.paging.set(body.get("default"), body.get("script"))
        return json_response(self.variants.snapshot())

    async def _ctl_batch_variant(self, request: web.Request) -> web.Response:
        """``{"continue_on_error": "honour|ignore-400|ignore-200", "content_ids": bool}``."""
        self.variants.batch.set(**(await request.json()))
        return json_response(self.variants.snapshot())

    async def _ctl_seed(self, request: web.Request) -> web.Response:
        if self.seeder is None:
            raise ValueError("seeding is not wired")
        return json_response(self.seeder(await request.json()))
