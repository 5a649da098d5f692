"""issue 17: every field of the Workflow CRD has a description, taken from the proto's comments."""

from __future__ import annotations

from typing import Any

from syncplane.model.crd import workflow_crd


def _undescribed(node: dict[str, Any], path: str) -> list[str]:
    out = []
    for key, child in (node.get("properties") or {}).items():
        if not child.get("description"):
            out.append(f"{path}.{key}")
        out.extend(_undescribed(child, f"{path}.{key}"))
    if "items" in node:
        out.extend(_undescribed(node["items"], f"{path}[]"))
    return out


def test_every_spec_and_status_field_is_described():
    root = workflow_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert _undescribed(root["spec"], "spec") + _undescribed(root["status"], "status") == []


def test_an_enum_field_lists_its_values_with_their_comments():
    spec = workflow_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    text = spec["properties"]["type"]["description"]
    assert "INGRESS: Dynamics 365 contacts and custom entities into Campaign." in text
    assert "OPT_IN_OUT:" in text
