"""Convert Workflow messages to and from resource dicts.

A resource dict is what users write in YAML and what the CRD stores:
camelCase keys and short enum names (`INGRESS`, not `WORKFLOW_TYPE_INGRESS`).
Conversion walks the message descriptors, so a field added to the proto
appears everywhere without touching this module.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from syncplane.errors import FieldViolation, InvalidArgument
from syncplane.proto.enums import enum_prefix
from syncplane.proto.v1 import workflow_pb2 as pb

API_VERSION = "syncplane.io/v1"
KIND = "Workflow"
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
# Well-known types whose proto JSON is already their resource form (a Struct is the user's own keys).
_WKT = {"google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask",
        "google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}


def _walk(value: Any, desc: Any, to_short: bool, path: str) -> Any:
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    by_json = {f.json_name: f for f in desc.fields}
    by_name = {f.name: f for f in desc.fields}
    for key, item in value.items():
        field = by_json.get(key) or by_name.get(key)
        if field is None:
            if to_short:
                out[key] = item
                continue
            raise InvalidArgument([FieldViolation(f"{path}.{key}".lstrip("."), "unknown field")])
        sub = f"{path}.{field.name}".lstrip(".")
        out[key] = _convert_field(item, field, to_short, sub)
    return out


def _convert_field(item: Any, field: FieldDescriptor, to_short: bool, path: str) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return item
    if isinstance(item, list):
        return [_convert_field(x, field, to_short, f"{path}[{i}]") for i, x in enumerate(item)]
    if field.enum_type is not None and isinstance(item, str):
        prefix = enum_prefix(field.enum_type)
        if to_short:
            return item[len(prefix):] if item.startswith(prefix) else item
        full = item if item.startswith(prefix) else prefix + item
        if full not in field.enum_type.values_by_name:
            allowed = ", ".join(v.name[len(prefix):] for v in field.enum_type.values if v.number)
            raise InvalidArgument([FieldViolation(path, f"{item!r} is not one of {allowed}")])
        return full
    if field.message_type is not None and field.message_type.full_name not in _WKT:
        return _walk(item, field.message_type, to_short, path)
    if to_short and field.type in _INT64 and isinstance(item, str):
        return int(item)  # proto JSON writes 64-bit integers as strings; YAML and the CRD use integers
    return item


def message_to_dict(msg: Message) -> dict[str, Any]:
    """camelCase keys, short enum names and 64-bit integers as numbers (proto JSON writes them as
    strings); default values omitted. The one conversion behind every `-o json|yaml` of the CLI."""
    raw = json_format.MessageToDict(msg)
    result: dict[str, Any] = _walk(raw, msg.DESCRIPTOR, True, "")
    return result


def message_from_dict(data: dict[str, Any], msg: Message, path: str = "") -> None:
    """Fill `msg` from a resource dict; accepts camelCase or snake_case keys."""
    full = _walk(data, msg.DESCRIPTOR, False, path)
    try:
        json_format.ParseDict(full, msg)
    except json_format.ParseError as exc:
        raise InvalidArgument([FieldViolation(path or "spec", str(exc))]) from exc


def spec_to_dict(spec: pb.WorkflowSpec) -> dict[str, Any]:
    return message_to_dict(spec)


def spec_from_dict(data: dict[str, Any]) -> pb.WorkflowSpec:
    spec = pb.WorkflowSpec()
    message_from_dict(data, spec, "spec")
    return spec


def to_resource(wf: pb.Workflow) -> dict[str, Any]:
    """The kubectl-style view of a Workflow: apiVersion/kind/metadata/spec/status."""
    workflow_id = wf.name.split("/", 1)[-1]
    metadata: dict[str, Any] = {"name": workflow_id}
    if wf.labels:
        metadata["labels"] = dict(wf.labels)
    if wf.uid:
        metadata["uid"] = wf.uid
    if wf.etag:
        metadata["etag"] = wf.etag
    if wf.generation:
        metadata["generation"] = wf.generation
    if wf.HasField("create_time"):
        metadata["creationTimestamp"] = json_format.MessageToDict(wf)["createTime"]
    resource: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata,
                                "spec": message_to_dict(wf.spec)}
    if wf.HasField("status"):
        resource["status"] = message_to_dict(wf.status)
    return resource


def from_resource(resource: dict[str, Any]) -> tuple[str, pb.Workflow]:
    """Parse a kubectl-style document; returns (workflow_id, Workflow)."""
    if not isinstance(resource, dict):
        raise InvalidArgument([FieldViolation("document", "must be a mapping (apiVersion, kind, "
                                                  f"metadata, spec), not {type(resource).__name__}")])
    violations = []
    for key in ("metadata", "spec"):
        if not isinstance(resource.get(key) or {}, dict):
            violations.append(FieldViolation(key, "must be a mapping"))
    if not isinstance((resource.get("metadata") or {}).get("labels") or {}, dict):
        violations.append(FieldViolation("metadata.labels", "must be a mapping"))
    if violations:
        raise InvalidArgument(violations)
    if resource.get("apiVersion", API_VERSION) != API_VERSION:
        violations.append(FieldViolation("apiVersion", f"must be {API_VERSION}"))
    if resource.get("kind", KIND) != KIND:
        violations.append(FieldViolation("kind", f"must be {KIND}"))
    metadata = resource.get("metadata") or {}
    workflow_id = metadata.get("name", "")
    if not isinstance(workflow_id, str) or not workflow_id:
        violations.append(FieldViolation("metadata.name", "is required"))
    if violations:
        raise InvalidArgument(violations)
    wf = pb.Workflow()
    for key, value in (metadata.get("labels") or {}).items():
        wf.labels[str(key)] = str(value)
    message_from_dict(resource.get("spec") or {}, wf.spec, "spec")
    return workflow_id, wf


def message_to_field_dict(msg: Message) -> dict[str, Any]:
    """Like `message_to_dict` but keyed by the proto field names (snake_case, as field paths and
    BadRequest violations name them), with short enum names; default values omitted."""
    raw = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    result: dict[str, Any] = _walk(raw, msg.DESCRIPTOR, True, "")
    return result
