"""The Workflow CustomResourceDefinition, derived from the proto descriptors.

Types, field names (camelCase) and enums come from the messages; bounds and
patterns come from syncplane.validation.rules, so the API server enforces the
same limits as the gRPC validation. Rules that need the whole object (one
section per type, one mapping per source table) are CEL validations.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from syncplane.proto.enums import enum_prefix
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1.comments import COMMENTS
from syncplane.validation import rules

GROUP, VERSION, KIND, PLURAL, SINGULAR = "syncplane.io", "v1", "Workflow", "workflows", "workflow"
SHORT_NAMES = ["spwf"]
DNS1123 = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "integer", "format": "int64"},
}
_WKT: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]{1,9})?s$"},
}

# Extra constraints by proto message and field, on top of the derived type.
CONSTRAINTS: dict[tuple[str, str], dict[str, Any]] = {
    ("WorkflowSpec", "batch_size"): {"minimum": 1, "maximum": rules.MAX_BATCH_SIZE},
    ("WorkflowSpec", "workers"): {"minimum": 1, "maximum": rules.MAX_WORKERS},
    ("WorkflowSpec", "restart_nonce"): {"minimum": 0},
    # No user info, fragment, spaces or control characters (the same rules as syncplane.validation).
    ("Connection", "endpoint"): {"pattern": r"^https?://[^@/#\x00-\x20\x7f]+(/[^#\x00-\x20\x7f]*)?$",
                                 "maxLength": 2048},
    ("Connection", "max_concurrency"): {"minimum": 0, "maximum": max(rules.MAX_CONCURRENCY_DYNAMICS365,
                                                                     rules.MAX_CONCURRENCY_CAMPAIGN)},
    ("SecretReference", "name"): {"pattern": DNS1123, "minLength": 1, "maxLength": 63},
    # Lists keyed by a field: the API server itself refuses duplicates (one
    # mapping per source table; one source field per destination field).
    ("IngressSpec", "entities"): {"minItems": 1, "maxItems": rules.MAX_CUSTOM_ENTITIES + 1,
                                  "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["sourceTable"]},
    ("EntityMapping", "source_table"): {"pattern": rules.CRM_IDENTIFIER.pattern},
    ("EntityMapping", "source_key"): {"pattern": rules.CRM_IDENTIFIER.pattern},
    ("EntityMapping", "destination_resource"): {"pattern": rules.CAMPAIGN_IDENTIFIER.pattern},
    ("EntityMapping", "destination_key"): {"pattern": rules.CAMPAIGN_IDENTIFIER.pattern},
    ("EntityMapping", "fields"): {"minItems": 1, "maxItems": rules.MAX_COLUMNS_PER_ENTITY,
                                  "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["destination"]},
    ("EntityMapping", "replacements"): {"maxItems": 200},
    ("FieldMapping", "source"): {"pattern": rules.CRM_IDENTIFIER.pattern},
    ("FieldMapping", "destination"): {"pattern": rules.CAMPAIGN_IDENTIFIER.pattern},
    ("ValueReplacement", "field"): {"pattern": rules.CRM_IDENTIFIER.pattern},
    ("Filter", "conditions"): {"maxItems": 50},
    ("FilterCondition", "field"): {"pattern": rules.CRM_IDENTIFIER.pattern},
    ("OptInOutSpec", "field_pairs"): {"maxItems": len(rules.CAMPAIGN_OPT_OUT_FIELDS),
                                      "x-kubernetes-list-type": "map",
                                      "x-kubernetes-list-map-keys": ["campaignField"]},
    ("OptOutFieldPair", "campaign_field"): {"enum": sorted(rules.CAMPAIGN_OPT_OUT_FIELDS)},
    ("OptOutFieldPair", "crm_field"): {"pattern": rules.CRM_OPT_OUT_FIELD.pattern},
}
REQUIRED: dict[str, list[str]] = {
    "WorkflowSpec": ["type", "source", "destination"],
    "Connection": ["kind", "endpoint", "credentials"],
    "SecretReference": ["name"],
    "EntityMapping": ["sourceTable", "destinationResource", "sourceKey", "destinationKey", "fields"],
    "FieldMapping": ["source", "destination"],
    "ValueReplacement": ["field", "value", "replacement"],
    "FilterCondition": ["field", "operator"],
    "OptInOutSpec": ["direction"],
    "OptOutFieldPair": ["campaignField", "crmField"],
}
# What apply_defaults() fills in, for Workflows applied with kubectl: the API server defaults them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "WorkflowSpec": {"desiredState": "STOPPED", "batchSize": rules.DEFAULT_BATCH_SIZE,
                     "pollInterval": f"{rules.DEFAULT_POLL_SECONDS}s", "workers": 1},
}

def _cel_string(text: str) -> str:
    """``text`` inside a single-quoted CEL string literal (backslashes and quotes escaped)."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


# What the rules cost the API server (issue 17, `python -m benchmarks.bench_crd_writes`, 500 writes x 3
# alternating rounds, medians; a shared machine at load 5-35): a status merge patch, the operator's only
# write in a cold start, costs about 9 ms of API server CPU with these rules and 8.2-9.4 ms with none
# (within the rounds' spread); a spec merge patch 8.9-10.9 ms against 7.7-8.3 ms; a ConfigMap of the
# Workflow's size about 3-4 ms. Status writes do evaluate the rules (on Kubernetes 1.36 the status
# strategy runs the CEL validator over the whole object; ratcheting only forgives errors on unchanged
# values), but a CPU profile of the API server (pprof) during status writes puts all CEL evaluation at
# about 6%, with no regular-expression matching in it (cel-go compiles a constant pattern once). The
# rest is the generic custom-resource path (JSON decoding and encoding of the whole object, schema
# coercion, managedFields, the watch). So the rules stay CEL where a rule needs two fields; a single
# field's bound is OpenAPI (`pattern`, `maximum`, `enum`).
CEL: dict[str, list[dict[str, str]]] = {
    "WorkflowSpec": [
        {"rule": "self.type != 'INGRESS' || (has(self.ingress) && !has(self.egress) && !has(self.optInOut))",
         "message": "an INGRESS workflow needs spec.ingress and no other section", "fieldPath": ".ingress"},
        {"rule": "self.type != 'EGRESS' || (has(self.egress) && !has(self.ingress) && !has(self.optInOut))",
         "message": "an EGRESS workflow needs spec.egress and no other section", "fieldPath": ".egress"},
        {"rule": "self.type != 'OPT_IN_OUT' || (has(self.optInOut) && !has(self.ingress) && !has(self.egress))",
         "message": "an OPT_IN_OUT workflow needs spec.optInOut and no other section", "fieldPath": ".optInOut"},
        {"rule": "self.type != 'INGRESS' || (self.source.kind == 'DYNAMICS365' "
                 "&& self.destination.kind == 'CAMPAIGN_STANDARD')",
         "message": "INGRESS reads DYNAMICS365 and writes CAMPAIGN_STANDARD", "fieldPath": ".source.kind"},
        {"rule": "self.type != 'EGRESS' || (self.source.kind == 'CAMPAIGN_STANDARD' "
                 "&& self.destination.kind == 'DYNAMICS365')",
         "message": "EGRESS reads CAMPAIGN_STANDARD and writes DYNAMICS365", "fieldPath": ".source.kind"},
    ],
    "Connection": [
        # The same pattern as validation (syncplane.validation.rules.SECRET_QUERY).
        {"rule": f"!has(self.endpoint) || !self.endpoint.matches('{_cel_string(rules.SECRET_QUERY.pattern)}')",
         "message": "must not carry credentials: a query parameter looks like a secret; use credentials.name",
         "fieldPath": ".endpoint"},
        {"rule": "self.endpoint.startsWith('https://') || (has(self.allowCleartext) && self.allowCleartext) || "
                 "self.endpoint.matches('^http://(localhost|127\\\\.[0-9.]+|\\\\[::1\\\\])(:[0-9]+)?(/.*)?$')",
         "message": "must use https (plain http only on loopback, or with allowCleartext: true)",
         "fieldPath": ".endpoint"},
        {"rule": "!self.endpoint.matches('^https?://(169\\\\.254\\\\.|\\\\[fe[89ab][0-9a-f]:|"
                 "\\\\[fd00:ec2::254\\\\]|100\\\\.100\\\\.100\\\\.200|metadata(\\\\.google\\\\.internal|"
                 "\\\\.goog)?[:/]|metadata(\\\\.google\\\\.internal|\\\\.goog)?$)')",
         "message": "must not be a link-local or cloud metadata address", "fieldPath": ".endpoint"},
        {"rule": f"self.kind != 'DYNAMICS365' || !has(self.maxConcurrency) || "
                 f"self.maxConcurrency <= {rules.MAX_CONCURRENCY_DYNAMICS365}",
         "message": f"must be at most {rules.MAX_CONCURRENCY_DYNAMICS365} for DYNAMICS365 (Dataverse's limit on "
                    "concurrent requests per user)", "fieldPath": ".maxConcurrency"},
    ],
    "IngressSpec": [
        {"rule": "self.entities.filter(e, e.destinationResource != 'profile').size() <= "
                 f"{rules.MAX_CUSTOM_ENTITIES}",
         "message": f"at most {rules.MAX_CUSTOM_ENTITIES} custom entities", "fieldPath": ".entities"},
    ],
    "EgressSpec": [
        {"rule": "(has(self.send) && self.send) || (has(self.open) && self.open) || "
                 "(has(self.click) && self.click) || (has(self.bounce) && self.bounce)",
         "message": "switch on at least one event type: send, open, click or bounce"},
    ],
    "OptInOutSpec": [
        {"rule": "!has(self.fieldPairs) || "
                 "self.fieldPairs.all(p, self.fieldPairs.exists_one(q, q.crmField == p.crmField))",
         "message": "each Dynamics 365 field is paired at most once", "fieldPath": ".fieldPairs"},
        {"rule": "self.direction == 'DISABLED' || (has(self.fieldPairs) && size(self.fieldPairs) > 0)",
         "message": "needs at least one field pair unless the direction is DISABLED", "fieldPath": ".fieldPairs"},
    ],
}


def description(field: FieldDescriptor) -> str:
    """What `kubectl explain` prints for a field: its proto comment, else its message's or enum's;
    for an enum, each value's comment after its short name."""
    kind = field.message_type or field.enum_type
    text = COMMENTS.get(field.full_name) or (COMMENTS.get(kind.full_name, "") if kind is not None else "")
    if field.enum_type is not None:
        prefix = enum_prefix(field.enum_type)
        values = [f"{v.name[len(prefix):]}: {COMMENTS[f'{field.enum_type.full_name}.{v.name}']}"
                  for v in field.enum_type.values if f"{field.enum_type.full_name}.{v.name}" in COMMENTS]
        text = " ".join([text, *values]).strip()
    return text


def _field_schema(owner: Descriptor, field: FieldDescriptor) -> dict[str, Any]:
    schema = _field_schema_of(owner, field)
    if text := description(field):
        schema = {"description": text, **schema}
    return schema


def _field_schema_of(owner: Descriptor, field: FieldDescriptor) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(owner, value)}
    single = _single(owner, field)
    if field.is_repeated:
        schema: dict[str, Any] = {"type": "array", "items": single}
        schema.update(CONSTRAINTS.get((owner.name, field.name), {}))
        return schema
    single.update(CONSTRAINTS.get((owner.name, field.name), {}))
    return single


def _single(owner: Descriptor, field: FieldDescriptor) -> dict[str, Any]:
    if field.enum_type is not None:
        prefix = enum_prefix(field.enum_type)
        return {"type": "string", "enum": [v.name[len(prefix):] for v in field.enum_type.values if v.number]}
    if field.message_type is not None:
        if field.message_type.full_name in _WKT:
            return dict(_WKT[field.message_type.full_name])
        return message_schema(field.message_type)
    schema = dict(_SCALARS[field.type])
    if field.type == FieldDescriptor.TYPE_STRING:
        schema["maxLength"] = 1024
    return schema


def message_schema(desc: Descriptor, with_rules: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": {
        f.json_name: _field_schema(desc, f) for f in desc.fields}}
    if with_rules and desc.name in REQUIRED:
        schema["required"] = REQUIRED[desc.name]
    if with_rules:
        for name, value in DEFAULTS.get(desc.name, {}).items():
            schema["properties"][name]["default"] = value
    if with_rules and desc.name in CEL:
        schema["x-kubernetes-validations"] = CEL[desc.name]
    return schema


def _status_schema() -> dict[str, Any]:
    # Status is written by the operator; describe it exactly, but without input rules.
    schema = message_schema(pb.WorkflowStatus.DESCRIPTOR, with_rules=False)

    def strip(node: dict[str, Any]) -> None:
        node.pop("required", None)
        node.pop("x-kubernetes-validations", None)
        for child in node.get("properties", {}).values():
            strip(child)
        if "items" in node:
            strip(node["items"])

    strip(schema)
    return schema


def workflow_crd() -> dict[str, Any]:
    columns = [
        {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
        {"name": "Desired", "type": "string", "jsonPath": ".spec.desiredState"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Degraded", "type": "string", "jsonPath": ".status.degradation.reason"},
        {"name": "Backlog", "type": "integer", "jsonPath": ".status.backlog"},
        {"name": "Drift", "type": "boolean", "jsonPath": ".status.drift.detected"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}",
                     "annotations": {"syncplane.io/generated-by": "scripts/generate.py from proto/syncplane/v1"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "listKind": f"{KIND}List",
                      "shortNames": SHORT_NAMES, "categories": ["syncplane"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A syncplane integration workflow between Dynamics 365 and Campaign Standard.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                        "metadata": {"type": "object", "properties": {
                            "name": {"type": "string", "pattern": DNS1123, "maxLength": 63}}},
                        "spec": message_schema(pb.WorkflowSpec.DESCRIPTOR),
                        "status": _status_schema(),
                    },
                }},
            }],
        },
    }
