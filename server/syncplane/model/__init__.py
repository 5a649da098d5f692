"""The Workflow resource model: the protobuf messages are the one source of
truth; this package converts them at the edges (YAML/CRD dicts, names)."""

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.api.v1 import workflow_service_pb2 as svc
from syncplane.model.convert import (
    enum_short_name,
    from_resource,
    phase_name,
    spec_from_dict,
    spec_to_dict,
    to_resource,
)
from syncplane.model.names import WORKFLOW_PREFIX, parse_name, workflow_name

__all__ = [
    "WORKFLOW_PREFIX",
    "enum_short_name",
    "from_resource",
    "parse_name",
    "pb",
    "phase_name",
    "spec_from_dict",
    "spec_to_dict",
    "svc",
    "to_resource",
    "workflow_name",
]
