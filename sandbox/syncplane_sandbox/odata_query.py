"""OData query parsing for the Dataverse emulator (pure: no I/O, no routes).

What the requests of the Dynamics 365 Web API carry, as the emulator reads it:

* the ``Prefer`` header (RFC 7240; OData 4.0 part 1 §8.2.8: ``odata.maxpagesize``,
  ``odata.track-changes``, ``odata.include-annotations``, ``odata.continue-on-error``,
  ``return=representation``);
* literals and keys in a URL (OData 4.0 part 2 ABNF: ``'text'`` with ``''`` for a quote, GUIDs,
  numbers, ``true``/``false``/``null``), a primary key ``(guid)`` or an alternate key
  ``(name='value',...)`` (Dataverse: "Use an alternate key to reference a record");
* a path segment ``set(key)/rest``;
* a tiny ``$filter``: ``column op literal`` joined by ``and`` (``eq ne gt ge lt le``); anything
  else answers 501, which the emulator says rather than guessing; a GUID literal compares in SQL
  Server's uniqueidentifier order (:func:`sql_guid_order`), as Dataverse evaluates it.

Errors are :class:`~syncplane_sandbox.d365_state.ODataError` with Dataverse's codes, as the
routes (``d365.py``) answer them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

from syncplane_sandbox.d365_state import INVALID_VALUE_CODE, NOT_IMPLEMENTED_CODE, ODataError


def parse_prefer(value: str | None) -> dict[str, str]:
    """``Prefer`` header → {preference: value} (value "" for bare preferences). Preferences are
    comma-separated; a quoted value may hold commas (RFC 7240), as an include-annotations list does."""
    prefs: dict[str, str] = {}
    for item in _split_outside(value or "", ",", '"'):
        name, _, val = item.strip().partition("=")
        if name:
            prefs[name.strip().lower()] = val.strip().strip('"')
    return prefs


def _split_outside(text: str, sep: str, quote_char: str) -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in text:
        if ch == quote_char:
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(buf))
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf))
    return parts


def annotation_filter(prefer: dict[str, str]) -> Callable[[str], bool] | None:
    """``odata.include-annotations`` → which annotation terms to return (None: none asked).

    OData 4.0 part 1 §8.2.8.4: a comma-separated list of term names or patterns, ``*`` for all,
    ``namespace.*`` for a namespace, a leading ``-`` excludes; an exclusion wins over an
    inclusion (the sandbox's simplification of "the more specific wins")."""
    raw = prefer.get("odata.include-annotations")
    if raw is None:
        return None
    include: list[str] = []
    exclude: list[str] = []
    for item in (i.strip() for i in raw.split(",") if i.strip()):
        (exclude if item.startswith("-") else include).append(item.lstrip("-"))

    def matches(term: str, pattern: str) -> bool:
        return pattern == "*" or pattern == term or (pattern.endswith(".*") and term.startswith(pattern[:-1]))

    def wanted(term: str) -> bool:
        return any(matches(term, p) for p in include) and not any(matches(term, p) for p in exclude)

    return wanted


# ---------------------------------------------------------------------- literals, keys and $filter


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, buf, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "'":
            if quoted and i + 1 < len(text) and text[i + 1] == "'":
                buf.append("''")
                i += 2
                continue
            quoted = not quoted
        if not quoted and text.startswith(sep, i):
            parts.append("".join(buf))
            buf = []
            i += len(sep)
            continue
        buf.append(ch)
        i += 1
    if quoted:
        raise ODataError(400, INVALID_VALUE_CODE, "Unterminated string literal.")
    parts.append("".join(buf))
    return parts


GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def parse_literal(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == "'" and text[-1] == "'":
        return text[1:-1].replace("''", "'")
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    if GUID.match(text):
        return text.lower()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ODataError(400, INVALID_VALUE_CODE, f"Syntax error: unrecognized literal '{text}'.") from None


def parse_key(text: str) -> list[tuple[str | None, Any]]:
    pairs: list[tuple[str | None, Any]] = []
    for part in _split_outside_quotes(text, ","):
        name, eq, value = part.partition("=")
        if eq and not name.strip().startswith("'"):
            pairs.append((name.strip(), parse_literal(value)))
        else:
            pairs.append((None, parse_literal(part)))
    return pairs


def split_segment(path: str) -> tuple[str, str | None, str]:
    """``contacts(emailaddress1='a(b)')/x`` → (``contacts``, ``emailaddress1='a(b)'``, ``x``)."""
    paren = path.find("(")
    slash = path.find("/")
    if paren < 0 or 0 <= slash < paren:
        if slash < 0:
            return path, None, ""
        return path[:slash], None, path[slash + 1:]
    quoted, i = False, paren + 1
    while i < len(path):
        ch = path[i]
        if ch == "'":
            quoted = not quoted
        elif ch == ")" and not quoted:
            return path[:paren], path[paren + 1:i], path[i + 1:].lstrip("/")
        i += 1
    raise ODataError(400, INVALID_VALUE_CODE, "Bad Request - Error in query syntax.")


_CLAUSE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s+(eq|ne|gt|ge|lt|le)\s+(.+?)\s*$", re.IGNORECASE)


def sql_guid_order(text: str) -> bytes:
    """The sort key of a GUID as SQL Server (so Dataverse) orders ``uniqueidentifier`` values,
    which is not the order of its text: the last 6 bytes are the most significant, then bytes
    8-9, 6-7, 4-5 and 0-3 of its .NET byte array (``Guid.ToByteArray``, little-endian in its first
    three fields; Python's ``UUID.bytes_le``). Source: SqlGuid.CompareTo ("treats the last 6
    bytes as the most significant ones in comparisons") and its SQLGuid.cs byte order."""
    raw = uuid.UUID(text).bytes_le
    return bytes(raw[i] for i in (10, 11, 12, 13, 14, 15, 8, 9, 6, 7, 4, 5, 0, 1, 2, 3))


def compile_filter(text: str, resolve: Callable[[str], str]) -> Callable[[dict[str, Any]], bool]:
    """A tiny ``$filter``: ``a eq 'x' and b ge 3`` (case-insensitive string comparison). A GUID
    literal (unquoted, ``contactid ge 5c1e…``) compares as a ``uniqueidentifier``, in SQL Server's
    order (:func:`sql_guid_order`), as Dataverse evaluates it."""
    clauses: list[tuple[str, str, Any, bool]] = []
    for part in _split_outside_quotes(text, " and "):
        match = _CLAUSE.match(part)
        if not match:
            raise ODataError(501, NOT_IMPLEMENTED_CODE, f"The sandbox $filter supports 'column op literal' joined "
                             f"by 'and' only; got '{part.strip()}'.")
        literal = match.group(3).strip()
        guid = bool(GUID.match(literal))
        clauses.append((resolve(match.group(1)), match.group(2).lower(),
                        sql_guid_order(literal) if guid else parse_literal(literal), guid))

    def norm(v: Any) -> Any:
        return v.casefold() if isinstance(v, str) else v

    def guid_value(v: Any) -> bytes | None:
        return sql_guid_order(v) if isinstance(v, str) and GUID.match(v) else None

    def check(row: dict[str, Any]) -> bool:
        for name, op, lit, guid in clauses:
            val = guid_value(row.get(name)) if guid else norm(row.get(name))
            want = lit if guid else norm(lit)
            if op == "eq":
                ok = val == want
            elif op == "ne":
                ok = val != want
            else:
                try:
                    ok = (val is not None and want is not None and
                          {"gt": val > want, "ge": val >= want, "lt": val < want, "le": val <= want}[op])
                except TypeError:
                    ok = False
            if not ok:
                return False
        return True

    return check
