"""Domain errors as HTTP answers, through the same mapping the gRPC interceptor uses
(syncplane.api.interceptors.to_status): one set of codes, reasons and field violations."""

from __future__ import annotations

from typing import Any

from google.rpc import code_pb2, error_details_pb2

from syncplane.api.interceptors import to_status

# google.rpc.Code -> HTTP status, as in google/rpc/code.proto (the HTTP mapping each code documents).
HTTP_STATUS = {
    code_pb2.INVALID_ARGUMENT: 400, code_pb2.FAILED_PRECONDITION: 400, code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNAUTHENTICATED: 401, code_pb2.PERMISSION_DENIED: 403, code_pb2.NOT_FOUND: 404,
    code_pb2.ABORTED: 409, code_pb2.ALREADY_EXISTS: 409, code_pb2.INTERNAL: 500, code_pb2.UNKNOWN: 500,
}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for an exception raised by the service layer.

    The body is ``{"code": "FAILED_PRECONDITION", "message": str, "reason": str,
    "fieldViolations": [{"field": "spec.batch_size", "description": str}]}``; an unexpected
    exception becomes INTERNAL without internals, exactly as over gRPC.
    """
    status = to_status(exc)
    body: dict[str, Any] = {"code": code_pb2.Code.Name(status.code), "message": status.message, "reason": "",
                            "fieldViolations": []}
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(info):
            body["reason"] = info.reason
        elif detail.Unpack(bad):
            body["fieldViolations"] = [{"field": v.field, "description": v.description}
                                       for v in bad.field_violations]
    return HTTP_STATUS.get(status.code, 500), body
