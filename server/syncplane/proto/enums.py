"""Enum values by their short names: ``WORKFLOW_TYPE_INGRESS`` is ``INGRESS``, ``PHASE_RUNNING``
is ``RUNNING`` (the spelling of YAML, the CRD, the CLI and the console). Pure."""

from __future__ import annotations

from google.protobuf.descriptor import EnumDescriptor

from syncplane.proto.v1 import workflow_pb2 as pb


def enum_prefix(enum: EnumDescriptor) -> str:
    """The prefix every value of ``enum`` carries: its zero value's name without ``UNSPECIFIED``."""
    zero = enum.values_by_number[0].name
    return zero[: -len("UNSPECIFIED")] if zero.endswith("UNSPECIFIED") else ""


def enum_short_name(enum: EnumDescriptor, number: int) -> str:
    """The value ``number`` of ``enum`` without its prefix; the number itself when ``enum`` has no such value."""
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    return value.name[len(enum_prefix(enum)):]


def phase_name(phase: int) -> str:
    """A `Phase` by its short name: ``RUNNING``."""
    return enum_short_name(pb.Phase.DESCRIPTOR, phase)
