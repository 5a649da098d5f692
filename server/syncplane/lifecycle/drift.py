"""Drift: the spec the user edited versus the spec the workers were started with.

The lifecycle fields (`desired_state`, `restart_nonce`, and `trace_parent`, the trace of the call
that asked for the run) are not part of what workers run, so changing them is never drift.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from google.protobuf import json_format

from syncplane.proto.v1 import workflow_pb2 as pb

LIFECYCLE_FIELDS = ("desired_state", "restart_nonce", "trace_parent")


def applied_view(spec: pb.WorkflowSpec) -> dict[str, Any]:
    """The part of a spec that workers run, as a plain dict (snake_case)."""
    data: dict[str, Any] = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    for name in LIFECYCLE_FIELDS:
        data.pop(name, None)
    return data


def spec_hash(spec: pb.WorkflowSpec) -> str:
    """16 hex digits of SHA-256 over the spec's applied view (lifecycle fields left out), canonical JSON."""
    canonical = json.dumps(applied_view(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def changed_fields(applied: pb.WorkflowSpec, current: pb.WorkflowSpec, prefix: str = "spec") -> list[str]:
    """Paths of the fields that differ, most specific first-level path that changed."""
    out: list[str] = []
    _diff(applied_view(applied), applied_view(current), prefix, out)
    return sorted(out)


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() | new.keys():
            _diff(old.get(key), new.get(key), f"{path}.{key}", out)
        return
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, f"{path}[{i}]", out)
        return
    out.append(path)


def drift_diff(applied: pb.WorkflowSpec, current: pb.WorkflowSpec,
               prefix: str = "spec") -> list[tuple[str, Any, Any]]:
    """Each changed field (the paths of `changed_fields`) with its applied and its edited
    value, as plain JSON values (None where the field is absent on that side)."""
    old, new = applied_view(applied), applied_view(current)
    return [(path, value_at(old, path, prefix), value_at(new, path, prefix))
            for path in changed_fields(applied, current, prefix)]


def value_at(view: dict[str, Any], path: str, prefix: str = "spec") -> Any:
    """The value at a `changed_fields` path (``spec.ingress.entities[0].fields``) in an
    `applied_view` dict, or None where it does not exist."""
    value: Any = view
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path.removeprefix(prefix).lstrip(".")):
        if part.startswith("["):
            index = int(part[1:-1])
            value = value[index] if isinstance(value, list) and index < len(value) else None
        else:
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            return None
    return value
