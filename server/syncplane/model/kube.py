"""Pure: Workflow custom resources (Kubernetes objects) <-> the shared protobuf model.

Used by the operator and by the gRPC server's Kubernetes backend."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from syncplane.contract.names import LAST_VERIFY_ANNOTATION
from syncplane.errors import SyncplaneError
from syncplane.model.convert import message_from_dict, message_to_dict
from syncplane.proto.v1 import workflow_pb2 as pb


def etag_of(meta: Mapping[str, Any]) -> str:
    """What users wrote: the generation (spec) and the labels.

    Not the resourceVersion: the operator's status writes change that every
    second or so, which would make every etag a client holds stale at once.
    Optimistic concurrency against the API server still uses resourceVersion.
    """
    labels = json.dumps(meta.get("labels") or {}, sort_keys=True)
    return f"{int(meta.get('generation') or 0)}-{hashlib.sha256(labels.encode()).hexdigest()[:8]}"


def last_verify_annotation(result: pb.VerifyResult) -> str:
    return json.dumps(message_to_dict(result), sort_keys=True)


def workflow_from_body(body: Mapping[str, Any]) -> pb.Workflow:
    meta = body.get("metadata") or {}
    wf = pb.Workflow(name=f"workflows/{meta.get('name', '')}", uid=meta.get("uid", ""),
                     etag=etag_of(meta), generation=int(meta.get("generation") or 0))
    if meta.get("creationTimestamp"):
        wf.create_time.FromJsonString(str(meta["creationTimestamp"]))
    for key, value in (meta.get("labels") or {}).items():
        wf.labels[key] = value
    message_from_dict(dict(body.get("spec") or {}), wf.spec, "spec")
    status = dict(body.get("status") or {})
    known = {f.json_name for f in pb.WorkflowStatus.DESCRIPTOR.fields}
    message_from_dict(_spell_paths({k: v for k, v in status.items() if k in known}, proto_path), wf.status, "status")
    raw = (meta.get("annotations") or {}).get(LAST_VERIFY_ANNOTATION)
    if raw:
        try:
            message_from_dict(json.loads(raw), wf.status.last_verify, "status.lastVerify")
        except (ValueError, SyncplaneError):
            wf.status.ClearField("last_verify")  # unreadable (edited by hand): as if never verified
    if not wf.status.phase:
        # Not reconciled yet (no status written): STOPPED, as lifecycle.current_phase() and the
        # embedded store say, so a just-created Workflow reads the same on both backends.
        wf.status.phase = pb.PHASE_STOPPED
    return wf


# A spec field path in a status text: `spec.batch_size`, `spec.ingress.entities[0].source_table`.
_SPEC_PATH = re.compile(r"\bspec(?:\.[A-Za-z][A-Za-z0-9_]*(?:\[\d+\])*)+")


def resource_path(path: str) -> str:
    """A proto field path in the resource's spelling: ``spec.batch_size`` -> ``spec.batchSize`` (the
    fields' JSON names; the spec has no map whose keys could be mistaken for field names)."""
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), path)


def proto_path(path: str) -> str:
    """The inverse of resource_path: ``spec.batchSize`` -> ``spec.batch_size`` (AIP's spelling, gRPC's)."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), path)


def _spell_paths(status: dict[str, Any], spell: Callable[[str], str]) -> dict[str, Any]:
    """The status with the spec paths it names (drift's changed fields, the conditions' messages)
    spelled by ``spell``: on Kubernetes a Workflow names its own fields as the resource spells them."""
    drift = status.get("drift")
    if isinstance(drift, dict) and isinstance(drift.get("changedFields"), list):
        status["drift"] = {**drift, "changedFields": [spell(str(p)) for p in drift["changedFields"]]}
    conditions = status.get("conditions")
    if isinstance(conditions, list):
        status["conditions"] = [
            {**c, "message": _SPEC_PATH.sub(lambda m: spell(m.group(0)), c["message"])}
            if isinstance(c, dict) and isinstance(c.get("message"), str) else c for c in conditions]
    return status


def status_patch(old: Mapping[str, Any], new: pb.WorkflowStatus) -> dict[str, Any]:
    """A merge patch turning `old` into `new`; empty when nothing changed."""
    target = _spell_paths(message_to_dict(new), resource_path)
    # The printer columns (`kubectl get workflows`) show 0 and false, not blanks: written explicitly,
    # though proto JSON omits a default.
    target.setdefault("backlog", 0)
    target["drift"] = {"detected": False, **(target.get("drift") or {})}
    # lastVerify is the API server's, kept in an annotation (LAST_VERIFY_ANNOTATION): never a status write.
    target.pop("lastVerify", None)
    known = {f.json_name for f in pb.WorkflowStatus.DESCRIPTOR.fields} - {"lastVerify"}
    return _merge_patch(old, target, known)


def _merge_patch(old: Mapping[str, Any], new: Mapping[str, Any], known: set[str] | None = None) -> dict[str, Any]:
    """RFC 7386 merges objects key by key: a field gone from a nested object (a counter back to 0,
    which proto JSON omits) must be written as null there, or the old value stays."""
    patch: dict[str, Any] = {}
    for k, v in new.items():
        before = old.get(k)
        if isinstance(v, Mapping) and isinstance(before, Mapping):
            if sub := _merge_patch(before, v):
                patch[k] = sub
        elif before != v:
            patch[k] = v
    patch.update({k: None for k in old if k not in new and (known is None or k in known)})
    return patch


def merged(current: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with the merge patch ``patch`` applied (RFC 7386: a null removes the key, an object
    merges key by key, anything else replaces); a new dict, ``current`` is left as it is."""
    out = dict(current)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping):
            sub = current.get(k)
            out[k] = merged(sub if isinstance(sub, Mapping) else {}, v)
        else:
            out[k] = v
    return out


def reflects(current: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    """Whether ``current`` already shows the merge patch ``patch`` (RFC 7386): the watch has
    delivered that write, or a later one."""
    for k, v in patch.items():
        if v is None:
            if k in current:
                return False
        elif isinstance(v, Mapping):
            sub = current.get(k)
            if not isinstance(sub, Mapping) or not reflects(sub, v):
                return False
        elif current.get(k) != v:
            return False
    return True
