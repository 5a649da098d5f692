"""The API server's 422 (the CRD refusing a Workflow) becomes INVALID_ARGUMENT with field paths.

The bodies are the `Status` the API server sends for an invalid custom resource (causes from
the OpenAPI schema and from the CEL rules' fieldPath)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from syncplane.errors import InvalidArgument
from syncplane.store.kubernetes import rejected


@dataclass
class ApiError:
    body: str
    status: int = 422


def status(*causes: dict[str, str], message: str = "Workflow.syncplane.io \"x\" is invalid") -> ApiError:
    return ApiError(json.dumps({"kind": "Status", "status": "Failure", "message": message, "reason": "Invalid",
                                "details": {"name": "x", "group": "syncplane.io", "kind": "Workflow",
                                            "causes": list(causes)}, "code": 422}))


@pytest.mark.parametrize(("error", "expected"), [
    (status({"reason": "FieldValueInvalid", "message": "must not carry credentials", "field": "spec.source.endpoint"},
            {"reason": "FieldValueInvalid", "message": "should be less than or equal to 1000",
             "field": "spec.batchSize"}),
     [("spec.source.endpoint", "must not carry credentials"),
      ("spec.batch_size", "should be less than or equal to 1000")]),
    (status(message="admission refused"), [("spec", "admission refused")]),
    (ApiError("not json"), [("spec", "invalid")]),
])
def test_a_422_names_the_fields(error: ApiError, expected: list[tuple[str, str]]):
    got = rejected(error)
    assert isinstance(got, InvalidArgument)
    assert [(v.field, v.description) for v in got.violations] == expected
