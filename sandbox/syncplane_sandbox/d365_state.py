"""In-memory Dataverse: tables with typed column schemas, alternate keys, row
versions and an ordered change log for change tracking.

Data structures (sized for hundreds of thousands of rows):

* ``Table.rows``: ``dict`` id → row values (column → value), ids are lower-case GUIDs.
* Paging order: two append-only parallel lists (sequence number, id); a deleted row
  leaves a ``None`` hole; a page resumes with ``bisect`` on the sequence numbers, so
  skip tokens stay valid while rows come and go.
* Change log per table: append-only parallel lists (version, id, deleted?) with a
  state-wide monotonically increasing version; "changes since version V" is a
  ``bisect`` plus one pass over the tail.
* Alternate keys: one ``dict`` per key, normalised key values → id.
"""

from __future__ import annotations

import bisect
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from syncplane_sandbox.common import SandboxClock, rename_entry

# Error codes the emulator answers with (documented so connectors can branch on them).
#: Delta token expired (by age, default 7 days, or by ``expire_delta_tokens()``): HTTP 400.
DELTA_TOKEN_EXPIRED_CODE = "0x80044352"
DELTA_TOKEN_EXPIRED_STATUS = 400
#: Malformed/unknown delta or skip token: HTTP 400.
INVALID_TOKEN_CODE = "0x80040203"
#: Query option not allowed (``$skip``; ``$filter``/``$orderby``/``$expand``/``$top`` with track-changes): 400.
QUERY_NOT_SUPPORTED_CODE = "0x80060888"
#: Change tracking requested on a table that does not have it enabled: 400.
CHANGE_TRACKING_DISABLED_CODE = "0x80044353"
UNKNOWN_PROPERTY_CODE = "0x80060888"
INVALID_VALUE_CODE = "0x80048d19"
VALUE_TOO_LONG_CODE = "0x80044331"
NOT_FOUND_CODE = "0x80040217"
DUPLICATE_CODE = "0x80040237"
ETAG_MISMATCH_CODE = "0x80060882"
#: A "poison" record rejected on purpose (as a plug-in would): HTTP 400.
POISON_CODE = "0x80040265"
BATCH_TOO_LARGE_CODE = "0x8006088b"
NOT_IMPLEMENTED_CODE = "0x8006088c"

DELTA_TOKEN_MAX_AGE_S = 7 * 24 * 3600.0

STRING_TYPES = frozenset({"String", "Memo", "EntityName"})
INT_TYPES = frozenset({"Integer", "BigInt", "State", "Status", "Picklist"})
FLOAT_TYPES = frozenset({"Decimal", "Double", "Money"})
#: Single-valued lookups, read as ``_<name>_value`` and written with ``<nav>@odata.bind``: Lookup,
#: Customer (account or contact) and Owner (systemuser or team). AttributeTypeCode, Dataverse Web API
#: reference; "Lookup properties", Web API properties page.
LOOKUP_TYPES = frozenset({"Lookup", "Customer", "Owner"})
CHOICE_TYPES = frozenset({"Picklist", "State", "Status"})
ATTRIBUTE_TYPES = STRING_TYPES | INT_TYPES | FLOAT_TYPES | LOOKUP_TYPES | {"Boolean", "DateTime", "Uniqueidentifier"}
EDM_TYPES = {"String": "Edm.String", "Memo": "Edm.String", "EntityName": "Edm.String", "Boolean": "Edm.Boolean",
             "Integer": "Edm.Int32", "BigInt": "Edm.Int64", "State": "Edm.Int32", "Status": "Edm.Int32",
             "Picklist": "Edm.Int32", "Decimal": "Edm.Decimal", "Double": "Edm.Double", "Money": "Edm.Decimal",
             "DateTime": "Edm.DateTimeOffset", "Uniqueidentifier": "Edm.Guid", "Lookup": "Edm.Guid",
             "Customer": "Edm.Guid", "Owner": "Edm.Guid"}
#: DateTimeAttributeMetadata.DateTimeBehavior (Dataverse "Behavior and format of the date and time column").
DATETIME_BEHAVIORS = frozenset({"UserLocal", "DateOnly", "TimeZoneIndependent"})
#: Annotation terms the Web API returns only when the request's ``Prefer: odata.include-annotations``
#: asks for them (Dataverse "Formatted values" and "Lookup property data").
FORMATTED_VALUE = "OData.Community.Display.V1.FormattedValue"
LOOKUP_LOGICAL_NAME = "Microsoft.Dynamics.CRM.lookuplogicalname"
ASSOCIATED_NAVIGATION_PROPERTY = "Microsoft.Dynamics.CRM.associatednavigationproperty"
#: The primary name column of the sandbox's tables (the formatted value of a lookup to them).
PRIMARY_NAMES = {"contact": "lastname", "account": "name", "systemuser": "fullname", "team": "name"}


class ODataError(Exception):
    """An error the Web API answers with ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def format_datetime(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_datetime(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T"))
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def coerce_datetime(col: Column, text: str) -> str:
    """How Dataverse stores and returns a DateTime value by its behaviour: UserLocal as a UTC
    instant (``2024-05-01T22:00:00Z``); DateOnly as a date (``2024-05-02``), no time and no
    conversion; TimeZoneIndependent as the wall time given, never converted (returned with a
    ``Z`` that means no zone). Raises ValueError when the text is no date."""
    if col.behavior == "DateOnly":
        return datetime.fromisoformat(text.strip()[:10]).date().isoformat()
    if col.behavior == "TimeZoneIndependent":
        wall = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T"))
        return wall.replace(tzinfo=None).strftime("%Y-%m-%dT%H:%M:%SZ")
    return format_datetime(parse_datetime(text))


@dataclass
class Column:
    """A column (attribute): Dataverse ``AttributeType`` names (String, Boolean, Integer,
    DateTime, Uniqueidentifier, State, Picklist, Decimal, Double, Lookup, ...)."""

    name: str
    type: str
    max_length: int | None = None
    read_only: bool = False  # server-set (modifiedon, createdon): silently ignored on write
    targets: tuple[str, ...] = ()  # Lookup/Customer/Owner: entity set names it may point to
    state_values: tuple[int, ...] = ()  # State/Picklist: allowed values (empty = any int)
    labels: dict[Any, str] = field(default_factory=dict)  # choice value / boolean → its display label
    behavior: str = "UserLocal"  # DateTime: UserLocal | DateOnly | TimeZoneIndependent
    date_only: bool = False      # DateTime: Format DateOnly (a UserLocal date-only column is still UTC)

    def __post_init__(self) -> None:
        if self.type not in ATTRIBUTE_TYPES:
            raise ValueError(f"unknown attribute type {self.type!r}")
        if self.behavior not in DATETIME_BEHAVIORS:
            raise ValueError(f"unknown DateTime behavior {self.behavior!r}")

    @property
    def lookup(self) -> bool:
        return self.type in LOOKUP_TYPES

    @property
    def output_name(self) -> str:
        return f"_{self.name}_value" if self.lookup else self.name


def target_key(column: str) -> str:
    """Where a row keeps the logical name of the table a lookup value points to."""
    return f"{column}@{LOOKUP_LOGICAL_NAME}"


_MISSING = object()


class Table:
    """One Dataverse table (entity set)."""

    def __init__(self, state: D365State, logical_name: str, entity_set: str, primary_key: str,
                 columns: list[Column], alternate_keys: list[tuple[str, ...]] | None = None,
                 change_tracking: bool = True) -> None:
        self.state = state
        self.logical_name = logical_name
        self.entity_set = entity_set
        self.primary_key = primary_key
        self.columns: dict[str, Column] = {}
        for col in [Column(primary_key, "Uniqueidentifier"), *columns]:
            self.columns[col.name] = col
        self.change_tracking = change_tracking
        self._output_columns: list[tuple[str, str]] | None = None
        self.alternate_keys: list[tuple[str, ...]] = []
        self._key_index: dict[tuple[str, ...], dict[tuple[Any, ...], str]] = {}
        self.rows: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, int] = {}
        self._order_seq: list[int] = []
        self._order_ids: list[str | None] = []
        self._pos: dict[str, int] = {}
        self._next_seq = 1
        self._dead = 0
        self._log_versions: list[int] = []
        self._log_ids: list[str] = []
        self._log_deleted: list[bool] = []
        for key in alternate_keys or []:
            self.add_alternate_key(key)

    # ------------------------------------------------------------------ schema
    def output_columns(self) -> list[tuple[str, str]]:
        """(column, name in responses) pairs, cached until the schema changes."""
        if self._output_columns is None:
            self._output_columns = [(name, col.output_name) for name, col in self.columns.items()]
        return self._output_columns

    def add_alternate_key(self, columns: tuple[str, ...]) -> None:
        for name in columns:
            if name not in self.columns:
                raise ValueError(f"{self.logical_name}: no column {name!r} for an alternate key")
        self.alternate_keys.append(tuple(columns))
        index: dict[tuple[Any, ...], str] = {}
        for rid, row in self.rows.items():
            k = self._key_value(columns, row)
            if k is not None:
                index[k] = rid
        self._key_index[tuple(columns)] = index

    def add_column(self, column: Column) -> None:
        self._output_columns = None
        if column.name in self.columns:
            raise ValueError(f"{self.logical_name} already has a column {column.name!r}")
        self.columns[column.name] = column

    def drop_column(self, name: str) -> None:
        self._output_columns = None
        self._schema_column(name)
        del self.columns[name]
        for row in self.rows.values():
            row.pop(name, None)
        for key in [k for k in self.alternate_keys if name in k]:
            self.alternate_keys.remove(key)
            del self._key_index[key]

    def rename_column(self, old: str, new: str) -> None:
        """Schema change: the column is renamed, data kept (as a publisher's rename would)."""
        self._output_columns = None
        col = self._schema_column(old)
        if new in self.columns:
            raise ValueError(f"{self.logical_name} already has a column {new!r}")
        col.name = new
        self.columns = rename_entry(self.columns, self.rows.values(), old, new)
        renamed = []
        for key in self.alternate_keys:
            new_key = tuple(new if c == old else c for c in key)
            self._key_index[new_key] = self._key_index.pop(key)
            renamed.append(new_key)
        self.alternate_keys = renamed

    def retype_column(self, name: str, type: str, max_length: int | None = None) -> None:
        """Schema change: a new attribute type (and length); existing values are kept as stored."""
        self._output_columns = None
        col = self._schema_column(name)
        replacement = Column(name, type, max_length, col.read_only, col.targets)
        self.columns[name] = replacement

    def _schema_column(self, name: str) -> Column:
        if name == self.primary_key:
            raise ValueError("the primary key cannot be changed")
        try:
            return self.columns[name]
        except KeyError:
            raise ValueError(f"{self.logical_name} has no column {name!r}") from None

    # ------------------------------------------------------------------ values
    @staticmethod
    def _norm_key_part(value: Any) -> Any:
        return value.casefold() if isinstance(value, str) else value

    def _key_value(self, key: tuple[str, ...], row: dict[str, Any]) -> tuple[Any, ...] | None:
        parts = tuple(self._norm_key_part(row.get(c)) for c in key)
        return None if any(p is None for p in parts) else parts

    def coerce(self, name: str, value: Any) -> Any:
        """Validate one value against the column schema; ODataError(400) naming the column."""
        col = self.columns.get(name)
        if col is None or col.lookup:
            raise ODataError(400, UNKNOWN_PROPERTY_CODE, f"Could not find a property named '{name}' on type "
                             f"'Microsoft.Dynamics.CRM.{self.logical_name}'.")
        if value is None:
            if name == self.primary_key:
                raise self._bad_value(col, value)
            return None
        t = col.type
        if t in STRING_TYPES:
            if not isinstance(value, str):
                raise self._bad_value(col, value)
            if col.max_length is not None and len(value) > col.max_length:
                raise ODataError(400, VALUE_TOO_LONG_CODE, f"A validation error occurred. The length of the "
                                 f"'{name}' attribute of the '{self.logical_name}' entity exceeded the maximum "
                                 f"allowed length of '{col.max_length}'.")
            return value
        if t == "Boolean":
            if not isinstance(value, bool):
                raise self._bad_value(col, value)
            return value
        if t in INT_TYPES:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self._bad_value(col, value)
            if t != "BigInt" and not -(2**31) <= value < 2**31:
                raise self._bad_value(col, value)
            if col.state_values and value not in col.state_values:
                raise ODataError(400, INVALID_VALUE_CODE, f"{value} is not a valid value for the '{name}' "
                                 f"attribute of the '{self.logical_name}' entity.")
            return value
        if t in FLOAT_TYPES:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self._bad_value(col, value)
            return value
        if t == "DateTime":
            if not isinstance(value, str):
                raise self._bad_value(col, value)
            try:
                return coerce_datetime(col, value)
            except ValueError:
                raise self._bad_value(col, value) from None
        # Uniqueidentifier
        if not isinstance(value, str):
            raise self._bad_value(col, value)
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise self._bad_value(col, value) from None

    def _bad_value(self, col: Column, value: Any) -> ODataError:
        return ODataError(400, INVALID_VALUE_CODE, f"Cannot convert the literal '{value}' to the expected type "
                          f"'{EDM_TYPES[col.type]}' of property '{col.name}' of "
                          f"'Microsoft.Dynamics.CRM.{self.logical_name}'.")

    def coerce_record(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validate a request body: columns, ``<lookup>@odata.bind`` references; annotations ignored."""
        values: dict[str, Any] = {}
        for name, value in body.items():
            if "@odata.bind" in name:
                values.update(self._bind(name.split("@", 1)[0], value))
                continue
            if name.startswith("@") or "@" in name:
                continue
            col = self.columns.get(name)
            if col is not None and col.read_only:
                continue
            values[name] = self.coerce(name, value)
        return values

    def _bind(self, nav: str, value: Any) -> dict[str, Any]:
        col = self.columns.get(nav)
        if col is None:
            base = nav.rsplit("_", 1)[0]
            col = self.columns.get(base) if base != nav else None
            if col is None:
                col = next((c for c in self.columns.values() if c.name.lower() == nav.lower()), None)
        if col is None or not col.lookup:
            raise ODataError(400, UNKNOWN_PROPERTY_CODE, f"An undeclared property '{nav}' which only has property "
                             f"annotations in the payload but no property value was found in the payload.")
        if value is None:
            return {col.name: None, target_key(col.name): None}
        if not isinstance(value, str):
            raise self._bad_value(col, value)
        ref = value.rsplit("/", 1)[-1]
        target_set, _, rest = ref.partition("(")
        target = self.state.tables_by_set.get(target_set)
        if target is None or (col.targets and target_set not in col.targets) or not rest.endswith(")"):
            raise ODataError(400, INVALID_VALUE_CODE, f"Invalid reference '{value}' for '{nav}'.")
        try:
            rid = str(uuid.UUID(rest[:-1]))
        except ValueError:
            raise ODataError(400, INVALID_VALUE_CODE, f"Invalid reference '{value}' for '{nav}'.") from None
        if rid not in target.rows:
            raise ODataError(404, NOT_FOUND_CODE, f"{target.logical_name} With Id = {rid} Does Not Exist")
        return {col.name: rid, target_key(col.name): target.logical_name}

    # ------------------------------------------------------------------ reads
    def get(self, rid: str) -> dict[str, Any] | None:
        return self.rows.get(rid)

    def etag(self, rid: str) -> str:
        return f'W/"{self.versions[rid]}"'

    def find_by_key(self, key_values: dict[str, Any]) -> str | None:
        """Id of the row matching an alternate key (``{column: value}``), None if absent;
        ODataError(400) when no alternate key has exactly those columns."""
        for key in self.alternate_keys:
            if set(key) == set(key_values):
                norm = tuple(self._norm_key_part(key_values[c]) for c in key)
                return self._key_index[key].get(norm)
        raise ODataError(400, INVALID_VALUE_CODE, f"The key '{','.join(sorted(key_values))}' is not defined as an "
                         f"alternate key for the '{self.logical_name}' entity.")

    def output(self, rid: str, select: list[str] | None = None,
               annotations: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """A row as the Web API returns it (``@odata.etag``, lookups as ``_x_value``). ``annotations``
        says which annotation terms the request asked for (``Prefer: odata.include-annotations``);
        none are returned unless asked, as Dataverse does."""
        row = self.rows[rid]
        out: dict[str, Any] = {"@odata.etag": f'W/"{self.versions[rid]}"'}
        if select is None and annotations is None:
            get = row.get
            out.update({output: get(name) for name, output in self.output_columns()})
            return out
        for name in select if select is not None else list(self.columns):
            col = self.columns[name]
            value = row.get(name)
            out[col.output_name] = value
            if annotations is not None and value is not None:
                self._annotate(out, col, row, value, annotations)
        out.setdefault(self.primary_key, rid)
        return out

    def _annotate(self, out: dict[str, Any], col: Column, row: dict[str, Any], value: Any,
                  wanted: Callable[[str], bool]) -> None:
        name = col.output_name
        if col.lookup:
            target = row.get(target_key(col.name)) or self._single_target(col)
            if target and wanted(LOOKUP_LOGICAL_NAME):
                out[f"{name}@{LOOKUP_LOGICAL_NAME}"] = target
            if target and wanted(ASSOCIATED_NAVIGATION_PROPERTY):
                out[f"{name}@{ASSOCIATED_NAVIGATION_PROPERTY}"] = (
                    f"{col.name}_{target}" if len(col.targets) > 1 else col.name)
        if wanted(FORMATTED_VALUE):
            text = self._formatted(col, row, value)
            if text is not None:
                out[f"{name}@{FORMATTED_VALUE}"] = text

    def _single_target(self, col: Column) -> str | None:
        if len(col.targets) == 1 and col.targets[0] in self.state.tables_by_set:
            return self.state.tables_by_set[col.targets[0]].logical_name
        return None

    def _formatted(self, col: Column, row: dict[str, Any], value: Any) -> str | None:
        """The display form Dataverse gives (en-US user settings): choice and yes/no labels,
        grouped numbers, currency, the user's date format, a lookup's primary name."""
        t = col.type
        if t in CHOICE_TYPES or t == "Boolean":
            return col.labels.get(value, "Yes" if value is True else "No" if value is False else str(value))
        if t == "Money":
            return f"${float(value):,.2f}"
        if t in ("Integer", "BigInt"):
            return f"{int(value):,}"
        if t in ("Decimal", "Double"):
            return f"{float(value):,.2f}"
        if t == "DateTime":
            if col.behavior == "DateOnly":
                moment = datetime.fromisoformat(str(value))
                return f"{moment.month}/{moment.day}/{moment.year}"
            moment = parse_datetime(str(value))  # the sandbox's users are on UTC
            if col.date_only:
                return f"{moment.month}/{moment.day}/{moment.year}"
            return f"{moment.month}/{moment.day}/{moment.year} {moment:%I:%M %p}".replace(" 0", " ", 1)
        if col.lookup:
            target = self.state.tables_by_logical.get(str(row.get(target_key(col.name)) or self._single_target(col)))
            name_col = PRIMARY_NAMES.get(target.logical_name) if target is not None else None
            other = target.rows.get(str(value)) if target is not None else None
            return str(other.get(name_col) or "") if other is not None and name_col else None
        return None

    def page(self, after_seq: int, limit: int, predicate: Any = None) -> tuple[list[str], int, bool]:
        """Up to ``limit`` live ids in creation order after sequence ``after_seq``:
        (ids, last sequence returned, more rows remain?)."""
        start = bisect.bisect_right(self._order_seq, after_seq)
        ids: list[str] = []
        seqs, order = self._order_seq, self._order_ids
        last = after_seq
        i = start
        n = len(order)
        while i < n:
            rid = order[i]
            if rid is not None and (predicate is None or predicate(self.rows[rid])):
                if len(ids) == limit:
                    return ids, last, True
                ids.append(rid)
                last = seqs[i]
            i += 1
        return ids, last, False

    def changes(self, since: int, upto: int) -> list[tuple[str, bool]]:
        """(id, deleted) for every row changed in versions (since, upto]: rows created or
        updated first (in order of last change), deletions after."""
        lo = bisect.bisect_right(self._log_versions, since)
        hi = bisect.bisect_right(self._log_versions, upto)
        last: dict[str, bool] = {}
        ids, deleted = self._log_ids, self._log_deleted
        for i in range(lo, hi):
            rid = ids[i]
            last.pop(rid, None)
            last[rid] = deleted[i]
        upserts = [(rid, False) for rid, d in last.items() if not d and rid in self.rows]
        deletes = [(rid, True) for rid, d in last.items() if d or rid not in self.rows]
        return upserts + deletes

    # ------------------------------------------------------------------ writes
    def _check_keys(self, rid: str, row: dict[str, Any]) -> None:
        for key in self.alternate_keys:
            k = self._key_value(key, row)
            if k is not None:
                other = self._key_index[key].get(k)
                if other is not None and other != rid:
                    raise ODataError(412, DUPLICATE_CODE, "A record with matching key values already exists. "
                                     f"({self.logical_name}: {', '.join(key)})")

    def _store(self, rid: str, row: dict[str, Any] | None, version: int | None) -> None:
        """Raw write maintaining indexes and order; no validation, no change log."""
        old = self.rows.get(rid)
        if old is not None:
            for key in self.alternate_keys:
                k = self._key_value(key, old)
                if k is not None and self._key_index[key].get(k) == rid:
                    del self._key_index[key][k]
        if row is None:
            if old is not None:
                del self.rows[rid]
                del self.versions[rid]
                pos = self._pos.pop(rid)
                self._order_ids[pos] = None
                self._dead += 1
                if self._dead > 4096 and self._dead * 2 > len(self._order_ids):
                    self._compact()
            return
        self.rows[rid] = row
        assert version is not None
        self.versions[rid] = version
        for key in self.alternate_keys:
            k = self._key_value(key, row)
            if k is not None:
                self._key_index[key][k] = rid
        if old is None:
            self._pos[rid] = len(self._order_ids)
            self._order_seq.append(self._next_seq)
            self._order_ids.append(rid)
            self._next_seq += 1

    def _compact(self) -> None:
        seqs: list[int] = []
        ids: list[str | None] = []
        for s, rid in zip(self._order_seq, self._order_ids, strict=True):
            if rid is not None:
                self._pos[rid] = len(ids)
                seqs.append(s)
                ids.append(rid)
        self._order_seq, self._order_ids, self._dead = seqs, ids, 0

    def _log(self, rid: str, deleted: bool) -> int:
        version = self.state.next_version()
        self._log_versions.append(version)
        self._log_ids.append(rid)
        self._log_deleted.append(deleted)
        return version

    def write(self, rid: str, values: dict[str, Any], *, create: bool | None = None) -> bool:
        """Create or merge-update a row with already-validated values; stamps ``modifiedon``
        (and ``createdon``) and logs the change. ``create``: True = must not exist (412),
        False = must exist (404), None = upsert. Returns True when the row was created."""
        old = self.rows.get(rid)
        if create is True and old is not None:
            raise ODataError(412, DUPLICATE_CODE, "A record with matching key values already exists.")
        if create is False and old is None:
            raise ODataError(404, NOT_FOUND_CODE, f"{self.logical_name} With Id = {rid} Does Not Exist")
        row = dict(old) if old is not None else dict.fromkeys(self.columns)
        row.update(values)
        row[self.primary_key] = rid
        stamp = self.state.now_text()
        if "modifiedon" in self.columns:
            row["modifiedon"] = stamp
        if old is None and "createdon" in self.columns:
            row["createdon"] = stamp
        self._check_keys(rid, row)
        self.state.remember(self, rid, old, self.versions.get(rid))
        version = self._log(rid, False)
        self._store(rid, row, version)
        return old is None

    def delete(self, rid: str) -> bool:
        old = self.rows.get(rid)
        if old is None:
            return False
        self.state.remember(self, rid, old, self.versions[rid])
        self._log(rid, True)
        self._store(rid, None, None)
        return True

    # ------------------------------------------------------------------ convenience for tests / seeding
    def upsert(self, rid: str | None = None, **values: Any) -> str:
        """Validate and write a row from Python (as a D365 user would); returns its id."""
        rid = str(uuid.UUID(rid)) if rid else str(uuid.uuid4())
        self.write(rid, self.coerce_record(values))
        return rid

    def bulk_load(self, rows: list[dict[str, Any]]) -> None:
        """Fast seeding path: rows must already be valid and carry their primary key."""
        for row in rows:
            rid = row[self.primary_key]
            full = dict.fromkeys(self.columns)
            full.update(row)
            self._check_keys(rid, full)
            self._store(rid, full, self._log(rid, False))

    def __len__(self) -> int:
        return len(self.rows)

    def _truncate_log(self, length: int) -> None:
        del self._log_versions[length:]
        del self._log_ids[length:]
        del self._log_deleted[length:]

    def log_length(self) -> int:
        return len(self._log_versions)


@dataclass
class _Undo:
    entries: list[tuple[Table, str, dict[str, Any] | None, int | None]] = field(default_factory=list)
    log_lengths: dict[str, int] = field(default_factory=dict)


class D365State:
    """All tables of the emulated organisation plus change-tracking bookkeeping."""

    def __init__(self, clock: SandboxClock, delta_token_max_age_s: float = DELTA_TOKEN_MAX_AGE_S) -> None:
        self.clock = clock
        self.delta_token_max_age_s = delta_token_max_age_s
        self.version = 0
        self.tables_by_set: dict[str, Table] = {}
        self.tables_by_logical: dict[str, Table] = {}
        self.poison: dict[str, set[str]] = {}
        self.organization_id = "5a4db0c0-0000-4000-8000-00000000c0de"
        self._min_delta_version = 0
        self._undo: _Undo | None = None
        self._delta_cache: OrderedDict[tuple[str, int, int], list[tuple[str, bool]]] = OrderedDict()

    # -------------------------------------------------------------- tables
    def add_table(self, logical_name: str, entity_set: str, primary_key: str, columns: list[Column],
                  alternate_keys: list[tuple[str, ...]] | None = None, change_tracking: bool = True) -> Table:
        """Register a table (custom tables included); ``modifiedon``/``createdon`` are added."""
        if entity_set in self.tables_by_set or logical_name in self.tables_by_logical:
            raise ValueError(f"table {logical_name}/{entity_set} exists")
        cols = list(columns)
        names = {c.name for c in cols}
        for stamp in ("createdon", "modifiedon"):
            if stamp not in names:
                cols.append(Column(stamp, "DateTime", read_only=True))
        table = Table(self, logical_name, entity_set, primary_key, cols, alternate_keys, change_tracking)
        self.tables_by_set[entity_set] = table
        self.tables_by_logical[logical_name] = table
        return table

    def table(self, name: str) -> Table:
        """A table by entity set name (``contacts``) or logical name (``contact``)."""
        table = self.tables_by_set.get(name)
        if table is None:
            table = self.tables_by_logical.get(name)
        if table is None:
            raise KeyError(f"no table {name!r}")
        return table

    # -------------------------------------------------------------- versions and delta tokens
    def next_version(self) -> int:
        self.version += 1
        return self.version

    def now_text(self) -> str:
        return format_datetime(self.clock.now())

    def make_delta_token(self, version: int) -> str:
        """Dataverse-shaped token ``<version>!<MM/DD/YYYY HH:MM:SS>`` (UTC issue time)."""
        return f"{version}!{self.clock.now():%m/%d/%Y %H:%M:%S}"

    def parse_delta_token(self, token: str) -> int:
        """Version of a delta token; ODataError 400 ``DELTA_TOKEN_EXPIRED_CODE`` when expired."""
        version_text, sep, issued_text = token.partition("!")
        try:
            version = int(version_text)
            issued = datetime.strptime(issued_text, "%m/%d/%Y %H:%M:%S").replace(tzinfo=UTC)
        except ValueError:
            raise ODataError(400, INVALID_TOKEN_CODE, f"Invalid delta token '{token}'.") from None
        if not sep or version < 0 or version > self.version:
            raise ODataError(400, INVALID_TOKEN_CODE, f"Invalid delta token '{token}'.")
        age = self.clock.time() - issued.timestamp()
        if version < self._min_delta_version or age > self.delta_token_max_age_s:
            raise ODataError(DELTA_TOKEN_EXPIRED_STATUS, DELTA_TOKEN_EXPIRED_CODE,
                             "The version stamp associated with the client has expired. The delta token has "
                             "expired; please perform a full sync.")
        return version

    def expire_delta_tokens(self) -> None:
        """Every delta token issued so far becomes expired (as after the retention period)."""
        self._min_delta_version = self.next_version()
        self._delta_cache.clear()

    def delta(self, table: Table, since: int, upto: int) -> list[tuple[str, bool]]:
        """``table.changes`` memoised per (since, upto) so paging a large delta stays linear."""
        key = (table.entity_set, since, upto)
        hit = self._delta_cache.get(key)
        if hit is None:
            hit = table.changes(since, upto)
            self._delta_cache[key] = hit
            while len(self._delta_cache) > 16:
                self._delta_cache.popitem(last=False)
        else:
            self._delta_cache.move_to_end(key)
        return hit

    # -------------------------------------------------------------- poison records
    def poison_keys(self, entity_set: str, *keys: str) -> None:
        """Writes addressing these keys (id or alternate-key value) get 400 ``POISON_CODE``."""
        self.table(entity_set)
        self.poison.setdefault(self.table(entity_set).entity_set, set()).update(k.lower() for k in keys)

    def clear_poison(self) -> None:
        self.poison.clear()

    def is_poisoned(self, table: Table, candidates: list[Any]) -> str | None:
        bad = self.poison.get(table.entity_set)
        if not bad:
            return None
        for value in candidates:
            if isinstance(value, str) and value.lower() in bad:
                return value
        return None

    # -------------------------------------------------------------- transactions (change sets)
    def remember(self, table: Table, rid: str, old: dict[str, Any] | None, old_version: int | None) -> None:
        if self._undo is not None:
            self._undo.log_lengths.setdefault(table.entity_set, table.log_length())
            self._undo.entries.append((table, rid, old, old_version))

    @contextmanager
    def transaction(self) -> Iterator[_Transaction]:
        """All-or-nothing scope for a change set: ``tx.rollback()`` undoes every write made
        inside it (rows, indexes and change log). Versions consumed are not reused."""
        if self._undo is not None:
            raise RuntimeError("transactions do not nest")
        undo = _Undo()
        self._undo = undo
        tx = _Transaction(self, undo)
        try:
            yield tx
        except BaseException:
            tx.rollback()
            raise
        finally:
            self._undo = None

    def _rollback(self, undo: _Undo) -> None:
        for table, rid, old, old_version in reversed(undo.entries):
            table._store(rid, None, None)
            if old is not None:
                table._store(rid, old, old_version)
        for entity_set, length in undo.log_lengths.items():
            self.tables_by_set[entity_set]._truncate_log(length)
        undo.entries.clear()
        undo.log_lengths.clear()


class _Transaction:
    def __init__(self, state: D365State, undo: _Undo) -> None:
        self._state = state
        self._undo = undo

    def rollback(self) -> None:
        self._state._rollback(self._undo)


# ---------------------------------------------------------------------- the default schema


ALLOW = {False: "Allow", True: "Do Not Allow"}  # the labels of the contact's donot* yes/no columns


def contact_columns() -> list[Column]:
    """The standard contact columns the sandbox knows, with their Dataverse types: the polymorphic
    lookups (``parentcustomerid`` Customer, ``ownerid`` Owner), each DateTime behaviour
    (``birthdate`` DateOnly, ``anniversary`` UserLocal with Format DateOnly, ``lastusedincampaign``
    UserLocal, ``new_appointmentat`` TimeZoneIndependent), Money, Integer and a choice."""
    return [
        Column("emailaddress1", "String", 100),
        Column("firstname", "String", 50),
        Column("lastname", "String", 50),
        Column("donotbulkemail", "Boolean", labels=dict(ALLOW)),
        Column("donotemail", "Boolean", labels=dict(ALLOW)),
        Column("donotphone", "Boolean", labels=dict(ALLOW)),
        Column("statecode", "State", state_values=(0, 1), labels={0: "Active", 1: "Inactive"}),
        Column("preferredcontactmethodcode", "Picklist", state_values=(1, 2, 3, 4, 5),
               labels={1: "Any", 2: "Email", 3: "Phone", 4: "Fax", 5: "Mail"}),
        Column("parentcustomerid", "Customer", targets=("accounts", "contacts")),
        Column("ownerid", "Owner", targets=("systemusers", "teams")),
        Column("birthdate", "DateTime", behavior="DateOnly", date_only=True),
        Column("anniversary", "DateTime", behavior="UserLocal", date_only=True),
        Column("lastusedincampaign", "DateTime", behavior="UserLocal"),
        Column("new_appointmentat", "DateTime", behavior="TimeZoneIndependent"),
        Column("creditlimit", "Money"),
        Column("numberofchildren", "Integer"),
        Column("address1_latitude", "Double"),
    ]


def install_default_tables(state: D365State) -> None:
    """``contacts`` (alternate key ``emailaddress1``), what its polymorphic lookups point to
    (``accounts``, ``systemusers``, ``teams``), the custom ``new_loyaltycards`` and the
    activity-like ``new_emailevents`` (alternate key ``new_eventid``, for egress)."""
    state.add_table("account", "accounts", "accountid", [Column("name", "String", 160)])
    state.add_table("systemuser", "systemusers", "systemuserid", [Column("fullname", "String", 200)])
    state.add_table("team", "teams", "teamid", [Column("name", "String", 160)])
    state.add_table("contact", "contacts", "contactid", contact_columns(), alternate_keys=[("emailaddress1",)])
    state.add_table("new_loyaltycard", "new_loyaltycards", "new_loyaltycardid", [
        Column("new_cardnumber", "String", 20),
        Column("new_tier", "String", 20),
        Column("new_points", "Integer"),
        Column("new_contactid", "Lookup", targets=("contacts",)),
        Column("statecode", "State", state_values=(0, 1)),
    ], alternate_keys=[("new_cardnumber",)])
    state.add_table("new_emailevent", "new_emailevents", "activityid", [
        Column("subject", "String", 200),
        Column("new_eventid", "String", 100),
        Column("new_eventtype", "String", 20),
        Column("regardingobjectid", "Lookup", targets=("contacts",)),
        Column("new_campaignname", "String", 200),
        Column("new_deliveryname", "String", 200),
        Column("new_eventdate", "DateTime"),
        Column("new_trackingurl", "String", 2000),
        Column("new_mirrorpageurl", "String", 2000),
    ], alternate_keys=[("new_eventid",)])
