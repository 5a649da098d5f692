"""In-memory Adobe Campaign Standard: resources (profiles, custom resources, the
email-event feed) with typed field schemas, opaque generated PKeys, a unique
integration key per resource and an ordered modification log for ``lastModified``
feeds.

Data structures: ``rows`` dict PKey → record; a unique-key dict value → PKey;
append-only (sequence, PKey) lists for paging; append-only (timestamp, PKey) lists
for "modified since" (an entry is live while it is the record's latest stamp).
``lastModified`` stamps are strictly increasing per sandbox (millisecond steps)."""

from __future__ import annotations

import base64
import bisect
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from syncplane_sandbox.common import SandboxClock, rename_entry

ACS_FIELD_TYPES = frozenset({"string", "boolean", "int", "double", "datetime", "date", "link"})
#: What deleting a record does to the records linking to it (see ``AcsState.link_delete``).
LINK_DELETE_FORMS = ("keep", "cascade")
#: Tables with more rows than this need ``_forcePagination=true`` to get ``next`` links.
FORCE_PAGINATION_THRESHOLD = 100_000
DEFAULT_LINE_COUNT = 25
MAX_LINE_COUNT = 10_000
#: ``createdBy.name`` of records not written through the API (seeded or made by "marketers").
MARKETING_USER = "marketing-user"

PROFILE_OPT_OUT_FIELDS = ("blackList", "blackListEmail", "blackListFax", "blackListMobile", "blackListPhone",
                          "blackListPostalMail", "blackListPushnotification", "ccpaOptOut")


class AcsError(Exception):
    def __init__(self, status: int, error_code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.status, "error_code": self.error_code, "message": self.message}
        if self.field is not None:
            out["field"] = self.field
        return out


# Error codes (``error_code`` in the JSON body).
UNKNOWN_FIELD = "SBX-400-UNKNOWN-FIELD"
INVALID_VALUE = "SBX-400-INVALID-VALUE"
VALUE_TOO_LONG = "SBX-400-TOO-LONG"
KEY_CHANGE = "SBX-400-PKEY-READONLY"
DUPLICATE_KEY = "SBX-409-DUPLICATE-KEY"
NOT_FOUND = "SBX-404-NOT-FOUND"
POISON = "SBX-400-POISON"


def format_acs_time(ts: float) -> str:
    """Campaign's timestamp shape: ``2024-05-01 12:34:56.789Z`` (UTC, milliseconds)."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_acs_time(text: str) -> float:
    """Accepts Campaign's shape and ISO 8601 (``T``/space, ``Z``/offset, optional fraction)."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


@dataclass
class AcsField:
    name: str
    type: str
    max_length: int | None = None
    read_only: bool = False
    target: str | None = None  # link: the target resource name

    def __post_init__(self) -> None:
        if self.type not in ACS_FIELD_TYPES:
            raise ValueError(f"unknown field type {self.type!r}")


@dataclass(frozen=True)
class AcsFilter:
    """A resource filter ``by<Name>?<param>_parameter=v`` — ``eq`` on the unique key, or
    ``since`` (``lastModified >= v``, ascending)."""

    name: str
    parameter: str
    field: str
    kind: str  # "eq" | "since"


_SERVER_FIELDS = ("PKey", "href", "created", "lastModified", "createdBy")


class AcsResource:
    def __init__(self, state: AcsState, name: str, section: str, fields: list[AcsField], key_field: str | None,
                 label: str, writable: bool = True, key_required: bool = True) -> None:
        self.state = state
        self.key_required = key_required
        self.name = name
        self.section = section  # URL section: profileAndServices | customResources | events
        self.label = label
        self.writable = writable
        self.fields: dict[str, AcsField] = {f.name: f for f in fields}
        self.key_field = key_field
        self.filters: dict[str, AcsFilter] = {}
        if key_field is not None:
            if key_field not in self.fields:
                raise ValueError(f"{name}: key field {key_field!r} is not a field")
            fname = "by" + key_field[0].upper() + key_field[1:]
            self.filters[fname] = AcsFilter(fname, f"{key_field}_parameter", key_field, "eq")
        self.filters["byLastModified"] = AcsFilter("byLastModified", "lastModified_parameter", "lastModified", "since")
        self.rows: dict[str, dict[str, Any]] = {}
        self.mod_ts: dict[str, float] = {}
        self._key_index: dict[Any, str] = {}
        self._order_seq: list[int] = []
        self._order_keys: list[str | None] = []
        self._pos: dict[str, int] = {}
        self._next_seq = 1
        self._log_ts: list[float] = []
        self._log_keys: list[str] = []

    # ------------------------------------------------------------------ schema changes
    def rename_field(self, old: str, new: str) -> None:
        f = self._schema_field(old)
        if new in self.fields:
            raise ValueError(f"{self.name} already has a field {new!r}")
        f.name = new
        self.fields = rename_entry(self.fields, self.rows.values(), old, new)
        if self.key_field == old:
            self.key_field = new
            self.filters = {k: v for k, v in self.filters.items() if v.field != old}
            fname = "by" + new[0].upper() + new[1:]
            self.filters[fname] = AcsFilter(fname, f"{new}_parameter", new, "eq")

    def retype_field(self, name: str, type: str, max_length: int | None = None) -> None:
        f = self._schema_field(name)
        self.fields[name] = AcsField(name, type, max_length, f.read_only, f.target)

    def add_field(self, field: AcsField) -> None:
        if field.name in self.fields:
            raise ValueError(f"{self.name} already has a field {field.name!r}")
        self.fields[field.name] = field

    def drop_field(self, name: str) -> None:
        self._schema_field(name)
        if name == self.key_field:
            raise ValueError("the unique key field cannot be dropped")
        del self.fields[name]
        for row in self.rows.values():
            row.pop(name, None)

    def _schema_field(self, name: str) -> AcsField:
        try:
            return self.fields[name]
        except KeyError:
            raise ValueError(f"{self.name} has no field {name!r}") from None

    # ------------------------------------------------------------------ validation
    def validate(self, body: dict[str, Any], pkey: str | None = None) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, value in body.items():
            if name == "PKey":
                if pkey is None or value != pkey:
                    raise AcsError(400, KEY_CHANGE, "The PKey is generated by Campaign and cannot be set or changed.",
                                   "PKey")
                continue
            if name in _SERVER_FIELDS:
                continue
            f = self.fields.get(name)
            if f is None:
                raise AcsError(400, UNKNOWN_FIELD, f"Unknown field '{name}' for resource '{self.name}'.", name)
            if f.read_only:
                continue
            values[name] = self._coerce(f, value)
        return values

    def _coerce(self, f: AcsField, value: Any) -> Any:
        if value is None:
            if f.name == self.key_field and self.key_required:
                raise AcsError(400, INVALID_VALUE, f"Field '{f.name}' cannot be empty.", f.name)
            return None
        bad = AcsError(400, INVALID_VALUE, f"Invalid value for field '{f.name}' of type {f.type}.", f.name)
        t = f.type
        if t == "string":
            if not isinstance(value, str):
                raise bad
            if f.max_length is not None and len(value) > f.max_length:
                raise AcsError(400, VALUE_TOO_LONG, f"Value of field '{f.name}' exceeds the maximum length of "
                               f"{f.max_length} characters ({len(value)}).", f.name)
            return value
        if t == "boolean":
            if not isinstance(value, bool):
                raise bad
            return value
        if t == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
            return value
        if t == "double":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad
            return value
        if t in ("datetime", "date"):
            if not isinstance(value, str):
                raise bad
            try:
                ts = parse_acs_time(value)
            except ValueError:
                raise bad from None
            return format_acs_time(ts) if t == "datetime" else value[:10]
        # link: {"PKey": "@..."}
        pk = value.get("PKey") if isinstance(value, dict) else None
        target = self.state.resources.get(f.target or "")
        if not isinstance(pk, str) or target is None:
            raise bad
        if pk not in target.rows:
            raise AcsError(404, NOT_FOUND, f"Linked {target.name} record '{pk}' (field '{f.name}') does not exist.",
                           f.name)
        return pk

    # ------------------------------------------------------------------ reads
    def find(self, key_value: Any) -> str | None:
        return self._key_index.get(key_value)

    def get(self, pkey: str) -> dict[str, Any] | None:
        return self.rows.get(pkey)

    @property
    def collection_path(self) -> str:
        """Path of the collection below the API base (``profileAndServices/profile``, ``events``)."""
        return self.section if self.section == self.name else f"{self.section}/{self.name}"

    def href(self, base: str, pkey: str) -> str:
        return f"{base}{self.collection_path}/{pkey}"

    def output(self, pkey: str, base: str) -> dict[str, Any]:
        row = self.rows[pkey]
        out: dict[str, Any] = {"PKey": pkey, "href": self.href(base, pkey)}
        for name, f in self.fields.items():
            value = row.get(name)
            if f.type == "link" and value is not None:
                target = self.state.resources[f.target or ""]
                value = {"PKey": value, "href": target.href(base, value)}
            out[name] = value
        out["created"] = row["created"]
        out["lastModified"] = row["lastModified"]
        out["createdBy"] = {"name": row["createdBy"]}
        return out

    def page(self, after_seq: int, limit: int) -> tuple[list[str], int, bool]:
        start = bisect.bisect_right(self._order_seq, after_seq)
        out: list[str] = []
        last = after_seq
        for i in range(start, len(self._order_keys)):
            pk = self._order_keys[i]
            if pk is None:
                continue
            if len(out) == limit:
                return out, last, True
            out.append(pk)
            last = self._order_seq[i]
        return out, last, False

    def modified_since(self, since: float, position: int | None, limit: int) -> tuple[list[str], int, bool]:
        """Records with ``lastModified >= since`` ascending: (PKeys, resume position, more?)."""
        i = bisect.bisect_left(self._log_ts, since) if position is None else position
        out: list[str] = []
        n = len(self._log_ts)
        while i < n:
            pk, ts = self._log_keys[i], self._log_ts[i]
            if self.mod_ts.get(pk) == ts:
                if len(out) == limit:
                    return out, i, True
                out.append(pk)
            i += 1
        return out, i, False

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ writes
    def create(self, values: dict[str, Any], created_by: str = MARKETING_USER, ts: float | None = None) -> str:
        """Insert validated values; 409 when the unique key is taken. Returns the new PKey."""
        key = values.get(self.key_field) if self.key_field is not None else None
        if self.key_field is not None:
            if key is None and self.key_required:
                raise AcsError(400, INVALID_VALUE, f"Field '{self.key_field}' is mandatory.", self.key_field)
            if key is not None and key in self._key_index:
                raise AcsError(409, DUPLICATE_KEY, f"A {self.name} with {self.key_field} '{key}' already exists "
                               "(unique index violation).", self.key_field)
        pkey = self.state.new_pkey()
        stamp = self.state.next_ts() if ts is None else ts
        text = format_acs_time(stamp)
        row = dict.fromkeys(self.fields)
        for name, f in self.fields.items():
            if f.type == "boolean":
                row[name] = False
        row.update(values)
        row.update(created=text, lastModified=text, createdBy=created_by)
        self.rows[pkey] = row
        if key is not None:
            self._key_index[key] = pkey
        self._pos[pkey] = len(self._order_keys)
        self._order_seq.append(self._next_seq)
        self._order_keys.append(pkey)
        self._next_seq += 1
        self._touch(pkey, stamp)
        return pkey

    def update(self, pkey: str, values: dict[str, Any]) -> None:
        row = self.rows.get(pkey)
        if row is None:
            raise AcsError(404, NOT_FOUND, f"No {self.name} with PKey '{pkey}'.")
        if self.key_field is not None and self.key_field in values:
            new_key = values[self.key_field]
            owner = self._key_index.get(new_key)
            if owner is not None and owner != pkey:
                raise AcsError(409, DUPLICATE_KEY, f"A {self.name} with {self.key_field} '{new_key}' already exists "
                               "(unique index violation).", self.key_field)
            if row.get(self.key_field) is not None:
                self._key_index.pop(row[self.key_field], None)
            if new_key is not None:
                self._key_index[new_key] = pkey
        row.update(values)
        stamp = self.state.next_ts()
        row["lastModified"] = format_acs_time(stamp)
        self._touch(pkey, stamp)

    def delete(self, pkey: str) -> bool:
        """Delete one record; the records linking to it follow ``AcsState.link_delete``."""
        row = self.rows.pop(pkey, None)
        if row is None:
            return False
        if self.state.link_delete == "cascade":
            for other in self.state.resources.values():
                for f in other.fields.values():
                    if f.type == "link" and f.target == self.name:
                        for linked in [pk for pk, r in other.rows.items() if r.get(f.name) == pkey]:
                            other.delete(linked)
        if self.key_field is not None and row.get(self.key_field) is not None:
            self._key_index.pop(row[self.key_field], None)
        self.mod_ts.pop(pkey, None)
        self._order_keys[self._pos.pop(pkey)] = None
        return True

    def _touch(self, pkey: str, stamp: float) -> None:
        self.mod_ts[pkey] = stamp
        self._log_ts.append(stamp)
        self._log_keys.append(pkey)

    # ------------------------------------------------------------------ convenience for tests
    def add(self, created_by: str = MARKETING_USER, **values: Any) -> str:
        """Validate and create from Python (defaults to a non-integration author)."""
        return self.create(self.validate(values), created_by)

    def set(self, pkey: str, **values: Any) -> None:
        """Validate and update from Python (as a marketer editing in Campaign)."""
        self.update(pkey, self.validate(values, pkey))

    def by_key(self, key_value: Any) -> dict[str, Any] | None:
        pk = self.find(key_value)
        return None if pk is None else self.rows[pk]


class AcsState:
    """The emulated Campaign organisation."""

    def __init__(self, clock: SandboxClock, org: str, salt: str = "sandbox") -> None:
        self.clock = clock
        self.org = org
        self.resources: dict[str, AcsResource] = {}
        self.force_pagination_threshold = FORCE_PAGINATION_THRESHOLD
        self.poison: dict[str, set[str]] = {}
        # What deleting a record does to the records whose link points at it: the link's "Behavior
        # if deleted or duplicated" (Campaign Standard, "Defining links between resources"; the
        # privacy tutorial "Modifying custom resources for privacy requests"). "keep", the default:
        # they stay, their link naming the deleted record; "cascade": they are deleted with it.
        self.link_delete = "keep"
        self._salt = salt
        self._pkeys = 0
        self._last_ts = 0.0

    def add_resource(self, name: str, section: str, fields: list[AcsField], key_field: str | None,
                     label: str = "", writable: bool = True, key_required: bool = True) -> AcsResource:
        if name in self.resources:
            raise ValueError(f"resource {name} exists")
        res = AcsResource(self, name, section, fields, key_field, label or name, writable, key_required)
        self.resources[name] = res
        return res

    def add_custom_resource(self, name: str, fields: list[AcsField], key_field: str, label: str = "") -> AcsResource:
        """A custom resource (``customResources/<name>``) with a unique key field (``by<Key>`` filter)."""
        return self.add_resource(name, "customResources", fields, key_field, label)

    @property
    def profiles(self) -> AcsResource:
        return self.resources["profile"]

    @property
    def events(self) -> AcsResource:
        return self.resources["events"]

    def resource(self, name: str) -> AcsResource:
        try:
            return self.resources[name]
        except KeyError:
            raise KeyError(f"no resource {name!r}") from None

    def new_pkey(self) -> str:
        self._pkeys += 1
        digest = hashlib.blake2b(f"{self._salt}:{self._pkeys}".encode(), digest_size=24).digest()
        return "@" + base64.urlsafe_b64encode(digest).decode()

    def next_ts(self) -> float:
        """A ``lastModified`` stamp: now, but strictly after the previous one (1 ms steps)."""
        now = round(self.clock.time(), 3)
        self._last_ts = max(now, round(self._last_ts + 0.001, 3))
        return self._last_ts

    def reserve_past(self, n: int) -> list[float]:
        """``n`` strictly increasing stamps ending about now (for seeding history)."""
        now = round(self.clock.time(), 3)
        start = max(round(now - n * 0.001, 3), round(self._last_ts + 0.001, 3))
        stamps = [round(start + i * 0.001, 3) for i in range(n)]
        if stamps:
            self._last_ts = stamps[-1]
        return stamps

    def set_link_delete(self, behaviour: str) -> None:
        """Raises ``ValueError`` for a behaviour that is not one of ``LINK_DELETE_FORMS``."""
        if behaviour not in LINK_DELETE_FORMS:
            raise ValueError(f"link delete behaviour must be one of {', '.join(LINK_DELETE_FORMS)}")
        self.link_delete = behaviour

    def poison_keys(self, resource: str, *keys: str) -> None:
        """POST/PATCH/DELETE of records with these PKeys or unique-key values get 400."""
        self.resource(resource)
        self.poison.setdefault(resource, set()).update(k.lower() for k in keys)

    def clear_poison(self) -> None:
        self.poison.clear()

    def is_poisoned(self, resource: str, candidates: list[Any]) -> str | None:
        bad = self.poison.get(resource)
        if not bad:
            return None
        return next((c for c in candidates if isinstance(c, str) and c.lower() in bad), None)


def install_default_resources(state: AcsState) -> None:
    """``profile`` (key ``externalId``), the custom ``cusLoyaltyCard`` (key ``crmId``, link to
    profile) and the read-only ``events`` feed (key ``eventId``)."""
    state.add_resource("profile", "profileAndServices", [
        AcsField("email", "string", 128),
        AcsField("firstName", "string", 30),
        AcsField("lastName", "string", 50),
        AcsField("externalId", "string", 100),
        *(AcsField(name, "boolean") for name in PROFILE_OPT_OUT_FIELDS),
    ], key_field="externalId", label="Profiles", key_required=False)
    state.add_custom_resource("cusLoyaltyCard", [
        AcsField("crmId", "string", 100),
        AcsField("cardNumber", "string", 20),
        AcsField("tier", "string", 20),
        AcsField("points", "int"),
        AcsField("profile", "link", target="profile"),
    ], key_field="crmId", label="Loyalty cards")
    state.add_resource("events", "events", [
        AcsField("eventId", "string", 64),
        AcsField("eventType", "string", 16),
        AcsField("bounceType", "string", 8),
        AcsField("externalId", "string", 100),
        AcsField("campaignId", "string", 64),
        AcsField("campaignName", "string", 128),
        AcsField("deliveryId", "string", 64),
        AcsField("deliveryName", "string", 128),
        AcsField("date", "datetime"),
        AcsField("trackingUrl", "string", 2000),
        AcsField("mirrorPageUrl", "string", 2000),
    ], key_field="eventId", label="Email delivery and tracking events", writable=False)
