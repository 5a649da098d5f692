"""Pure: Workflow custom resources <-> the shared protobuf model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.model.convert import message_from_dict, message_to_dict


def workflow_from_body(body: Mapping[str, Any]) -> pb.Workflow:
    meta = body.get("metadata") or {}
    wf = pb.Workflow(name=f"workflows/{meta.get('name', '')}", uid=meta.get("uid", ""),
                     etag=str(meta.get("resourceVersion", "")), generation=int(meta.get("generation") or 0))
    for key, value in (meta.get("labels") or {}).items():
        wf.labels[key] = value
    message_from_dict(dict(body.get("spec") or {}), wf.spec, "spec")
    status = dict(body.get("status") or {})
    known = {f.json_name for f in pb.WorkflowStatus.DESCRIPTOR.fields}
    message_from_dict({k: v for k, v in status.items() if k in known}, wf.status, "status")
    return wf


def status_patch(old: Mapping[str, Any], new: pb.WorkflowStatus) -> dict[str, Any]:
    """A merge patch turning `old` into `new`; empty when nothing changed."""
    target = message_to_dict(new)
    known = {f.json_name for f in pb.WorkflowStatus.DESCRIPTOR.fields}
    patch: dict[str, Any] = {k: v for k, v in target.items() if old.get(k) != v}
    patch.update({k: None for k in old if k in known and k not in target})
    return patch
