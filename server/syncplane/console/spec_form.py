"""The edit page's form: spec fields as inputs named by their field paths.

An input is named exactly as a `BadRequest` field violation names its field
(``spec.ingress.entities[0].fields[1].destination``), so the page puts each violation next to
its input, and `spec_from_form` rebuilds the spec from the names alone. Pure functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from syncplane.model.convert import message_from_dict, message_to_field_dict
from syncplane.proto.enums import enum_short_name
from syncplane.proto.v1 import workflow_pb2 as pb

_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
CHECKBOX_OFF = "false"


def spec_view(spec: pb.WorkflowSpec) -> dict[str, Any]:
    """The spec as the form shows it: field names, short enum names, defaults omitted."""
    return message_to_field_dict(spec)


def enum_names(enum: Any) -> list[str]:
    return [enum_short_name(enum.DESCRIPTOR, v.number) for v in enum.DESCRIPTOR.values if v.number]


def _set(root: dict[str, Any], path: str, value: Any) -> None:
    parts = [(m.group(1), m.group(2)) for m in _PART.finditer(path)]
    node: Any = root
    for i, (key, index) in enumerate(parts):
        last = i == len(parts) - 1
        nxt: Any = {} if not last and parts[i + 1][0] else [] if not last else value
        if key:
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, nxt)
        else:
            pos = int(index)
            while len(node) <= pos:
                node.append(None)
            if last:
                node[pos] = value
            else:
                if node[pos] is None:
                    node[pos] = nxt
                node = node[pos]


def _typed(value: Any, desc: Any) -> Any:
    """Checkbox strings ("true"/"false") become booleans for the spec's boolean fields only: a
    text field may hold the word "false"."""
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        field = desc.fields_by_name.get(key)
        if field is None:
            out[key] = item
        elif field.type == FieldDescriptor.TYPE_BOOL and isinstance(item, str):
            out[key] = {"true": True, CHECKBOX_OFF: False}.get(item, item)
        elif field.message_type is not None and isinstance(item, list):
            out[key] = [_typed(x, field.message_type) for x in item]
        elif field.message_type is not None:
            out[key] = _typed(item, field.message_type)
        else:
            out[key] = item
    return out


def _blank(value: Any) -> bool:
    """A list row the user left blank: every text empty, every checkbox as rendered."""
    if isinstance(value, dict):
        return all(_blank(v) for v in value.values())
    if isinstance(value, list):
        return all(_blank(v) for v in value)
    return value in ("", None) or isinstance(value, bool)


def _clean(value: dict[str, Any], desc: Any) -> dict[str, Any]:
    """Drop what the form cannot leave unset otherwise: empty strings, false and empty
    sub-messages (proto3 defaults, which the spec's own dict omits too), and blank list rows.
    A proto3 `optional` field (presence) keeps an explicit false."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        field = desc.fields_by_name.get(key)
        if field is not None and field.message_type is not None and field.message_type.full_name.startswith(
                "syncplane."):
            if isinstance(item, list):
                item = [_clean(x, field.message_type) for x in item if isinstance(x, dict) and not _blank(x)]
            elif isinstance(item, dict):
                item = _clean(item, field.message_type)
        explicit_false = item is False and field is not None and field.has_presence
        if explicit_false or (item not in ("", None, [], {}) and item is not False):
            out[key] = item
    return out


def spec_from_form(items: Iterable[tuple[str, str]]) -> pb.WorkflowSpec:
    """Rebuild a spec from the form's (name, value) pairs, in order: names under ``spec.``; a
    later value for a name wins (a checkbox follows its hidden "false"); "true"/"false" become
    booleans; list rows left entirely blank are dropped; empty strings mean unset (so a
    checkbox whose value is "" leaves an optional field unset: how an unset `apply_updates`
    round-trips). Rendering a spec's form and reading it back gives the same spec.

    Raises:
        InvalidArgument: a value the spec's types reject, with its field path.
    """
    data: dict[str, Any] = {}
    for name, value in items:
        if name.startswith("spec."):
            _set(data, name, value)
    spec = pb.WorkflowSpec()
    desc = pb.WorkflowSpec.DESCRIPTOR
    message_from_dict(_clean(_typed(data.get("spec", {}), desc), desc), spec, "spec")
    return spec
