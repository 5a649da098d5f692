"""Random but wire-valid requests for every RPC of WorkflowService, built from the message
descriptors (Hypothesis strategies), and the invariants a live server must keep under them.

Used by tests/integration/test_api_fuzz.py (both backends: the k8s tier re-exports it) with a
bounded number of examples in `make test`, and by `make fuzz` for a long run.

The strategies walk each request's descriptor, so an RPC or a field added to the proto is
fuzzed without a change here. Strings are unicode (no lone surrogates: protobuf refuses to
serialise them, so they are not wire-valid), empty or very long; enums include numbers the
proto does not define; field masks mix real paths with random ones; names, page tokens, etags
and request ids mix values the server issued or will recognise with random ones, so that
requests reach past the first check.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from tests.factories import spec

SERVICE = svc.DESCRIPTOR.services_by_name["WorkflowService"]
# A few workflow ids, so that requests meet existing workflows; the rest is random text.
IDS = ("fz-a", "fz-b", "fz-c")
MAX_DEPTH = 6

_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=24)
TEXT = st.one_of(
    _TEXT,
    st.just(""),
    st.sampled_from(["a" * 64, "x" * 5000, "\u0000", "ünïcødé-名前", "../../etc/passwd", "workflows/", "%s%n",
                     "' OR 1=1 --", "\U0001f600" * 40]),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "\u4e2d"]), st.integers(1000, 20000)),
)
INT32 = st.one_of(st.integers(-3, 20), st.sampled_from([2**31 - 1, -(2**31), 1000, 1001, 5000]))
INT64 = st.one_of(INT32, st.sampled_from([2**63 - 1, -(2**63), 10**12]))
UINT32 = st.one_of(st.integers(0, 20), st.just(2**32 - 1))
UINT64 = st.one_of(UINT32, st.just(2**64 - 1))
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_INT32: INT32, FieldDescriptor.TYPE_SINT32: INT32, FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_INT64: INT64, FieldDescriptor.TYPE_SINT64: INT64, FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT32: UINT32, FieldDescriptor.TYPE_FIXED32: UINT32,
    FieldDescriptor.TYPE_UINT64: UINT64, FieldDescriptor.TYPE_FIXED64: UINT64,
    FieldDescriptor.TYPE_DOUBLE: FLOATS, FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
}


def names() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([f"workflows/{i}" for i in IDS]), st.sampled_from(IDS),
                     st.builds("workflows/{}".format, TEXT), TEXT)


def page_tokens() -> st.SearchStrategy[str]:
    as_json = st.builds(lambda a, f: base64.urlsafe_b64encode(json.dumps({"after": a, "filter": f}).encode()).decode(),
                        st.one_of(TEXT, names()), st.sampled_from(["[]|[]", "[1]|[]", ""]))
    return st.one_of(TEXT, as_json, st.builds(lambda b: base64.urlsafe_b64encode(b).decode(), st.binary(max_size=40)))


def mask_paths() -> st.SearchStrategy[list[str]]:
    spec_paths = [f"spec.{f.name}" for f in pb.WorkflowSpec.DESCRIPTOR.fields]
    known = ["spec", "labels", "status", "name", "etag", "spec.ingress.replay", "spec.ingress.entities",
             "spec.source.endpoint", "labels.team", *spec_paths]
    return st.lists(st.one_of(st.sampled_from(known), TEXT), max_size=4)


# Fields whose meaning the server checks against what exists: mostly values it knows, some random.
_BY_NAME: dict[str, st.SearchStrategy[Any]] = {
    "name": names(),
    "parent": names(),
    "workflow_id": st.one_of(st.sampled_from(IDS), TEXT),
    "etag": st.one_of(st.just(""), st.integers(0, 50).map(str), TEXT),
    "page_token": page_tokens(),
    "request_id": st.one_of(st.sampled_from(["req-1", "req-2"]), TEXT),
    # Workers are real processes: a started workflow never gets more than a couple of them.
    "workers": st.sampled_from([0, 1, 2, 17, -1, 2**31 - 1]),
}


def _wkt(desc: Descriptor) -> st.SearchStrategy[Message] | None:
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == "google.protobuf.FieldMask":
        return mask_paths().map(lambda p: cls(paths=p))
    if desc.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        seconds = st.one_of(st.integers(-5, 4000), st.sampled_from([315576000001, -(10**12), 253402300800]))
        return st.builds(lambda s, n: cls(seconds=s, nanos=n), seconds,
                         st.one_of(st.just(0), st.integers(0, 999_999_999), st.just(-1)))
    return None


def message_strategy(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type: each field left unset or set to a random value of its type."""
    known = _wkt(desc)
    if known is not None:
        return known
    cls = message_factory.GetMessageClass(desc)
    if depth >= MAX_DEPTH:
        return st.just(cls())
    def deferred(f: FieldDescriptor) -> st.SearchStrategy[Any]:
        return st.deferred(lambda: field_strategy(f, depth + 1))

    optional = {f.name: deferred(f) for f in desc.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: build(cls, values))


def field_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key = field.message_type.fields_by_name["key"]
        value = field.message_type.fields_by_name["value"]
        return st.dictionaries(single(key, depth), single(value, depth), max_size=3)
    if field.is_repeated:
        return st.lists(single(field, depth), max_size=3)
    return single(field, depth)


def single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.name in _BY_NAME and field.type != FieldDescriptor.TYPE_MESSAGE:
        return _BY_NAME[field.name]
    if field.enum_type is not None:
        defined = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(defined), st.integers(-5, 1000))
    if field.message_type is not None:
        return message_strategy(field.message_type, depth)
    return _SCALARS[field.type]


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry_value = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                if entry_value.message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            if field.message_type is not None:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def valid_workflows() -> st.SearchStrategy[pb.Workflow]:
    """A valid workflow of each type, with now and then a field or two made random."""
    spec_fields = list(pb.WorkflowSpec.DESCRIPTOR.fields)

    def make(kind: str, changes: dict[str, Any], labels: dict[str, str]) -> pb.Workflow:
        wf = pb.Workflow(spec=spec(kind))
        wf.spec.workers = 1
        partial = build(pb.WorkflowSpec, changes)
        for name in changes:
            wf.spec.ClearField(name)  # type: ignore[arg-type]
        wf.spec.MergeFrom(partial)  # type: ignore[arg-type]
        wf.labels.update(labels)
        return wf

    def one_change(f: FieldDescriptor) -> st.SearchStrategy[dict[str, Any]]:
        return field_strategy(f, 1).map(lambda v: {f.name: v})

    change = st.sampled_from(spec_fields).flatmap(one_change)
    known_labels = st.dictionaries(st.sampled_from(["team", "env", "example.com/owner"]),
                                   st.sampled_from(["crm", "a-b", ""]), max_size=2)
    labels: st.SearchStrategy[dict[str, str]] = st.one_of(st.just({}), known_labels,
                                                          st.dictionaries(_TEXT, _TEXT, max_size=2))
    return st.builds(make, st.sampled_from(["ingress", "egress", "opt_in_out"]), st.one_of(st.just({}), change),
                     labels)


def request_strategy(method_name: str) -> st.SearchStrategy[Message]:
    """A request of the method: random, or (where it carries a Workflow) around a valid one."""
    desc = SERVICE.methods_by_name[method_name].input_type
    random = message_strategy(desc)
    if "workflow" not in desc.fields_by_name:
        return random

    def with_valid(req: Message, wf: pb.Workflow, workflow_id: str) -> Message:
        out = type(req)()
        out.CopyFrom(req)
        workflow = out.workflow  # type: ignore[attr-defined]
        workflow.CopyFrom(wf)
        workflow.name = f"workflows/{workflow_id}"
        if "workflow_id" in desc.fields_by_name:
            out.workflow_id = workflow_id  # type: ignore[attr-defined]
        return out

    valid = st.builds(with_valid, random, valid_workflows(), st.sampled_from(IDS))
    return st.one_of(random, valid, valid)


def calls() -> st.SearchStrategy[list[tuple[str, Message]]]:
    """A short sequence of (method, request), every method of the service in reach."""
    def with_method(method: str) -> st.SearchStrategy[tuple[str, Message]]:
        return request_strategy(method).map(lambda r: (method, r))

    one = st.sampled_from([m.name for m in SERVICE.methods]).flatmap(with_method)
    return st.lists(one, min_size=1, max_size=4)
