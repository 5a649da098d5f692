"""Resource names: `workflows/{workflow_id}` (AIP-122)."""

from __future__ import annotations

import re

from syncplane.errors import FieldViolation, InvalidArgument

WORKFLOW_PREFIX = "workflows/"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def workflow_name(workflow_id: str) -> str:
    return WORKFLOW_PREFIX + workflow_id


def is_dns1123_label(value: str) -> bool:
    return bool(DNS1123_LABEL.fullmatch(value))


def parse_name(name: str, field: str = "name") -> str:
    """Return the workflow id of `workflows/{id}`; a bare id is accepted too."""
    workflow_id = name[len(WORKFLOW_PREFIX):] if name.startswith(WORKFLOW_PREFIX) else name
    if not is_dns1123_label(workflow_id):
        raise InvalidArgument([FieldViolation(
            field, f"{name!r} is not `workflows/{{id}}` with a DNS-1123 label id "
                   "(lowercase letters, digits and '-', at most 63 characters)")])
    return workflow_id
