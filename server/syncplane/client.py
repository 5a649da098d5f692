"""A gRPC client for the CLI and tests: channel setup and readable errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.validation.endpoints import is_loopback

DEFAULT_ADDRESS = "127.0.0.1:7443"


@dataclass(frozen=True)
class ClientConfig:
    address: str = DEFAULT_ADDRESS
    token: str | None = None
    ca_file: Path | None = None
    plaintext: bool = False   # explicitly allow a token without TLS to a non-loopback server

    @classmethod
    def from_env(cls) -> ClientConfig:
        ca = os.environ.get("SYNCPLANE_CA_FILE")
        return cls(address=os.environ.get("SYNCPLANE_ADDRESS", DEFAULT_ADDRESS),
                   token=os.environ.get("SYNCPLANE_TOKEN") or None, ca_file=Path(ca) if ca else None)


class CleartextTokenError(Exception):
    """A token would go without TLS to a server that is not on loopback."""


def channel(config: ClientConfig) -> grpc.Channel:
    """A channel to the control plane, the token attached to every call.

    Raises:
        CleartextTokenError: a token, no CA file, a non-loopback address, and no ``plaintext``.
    """
    if config.token and config.ca_file is None and not config.plaintext and not is_loopback(config.address):
        raise CleartextTokenError(
            f"refusing to send the token in clear text to {config.address}: give --ca-file (TLS), "
            "or --plaintext if the network between is trusted")
    if config.ca_file is None:
        ch = grpc.insecure_channel(config.address)
    else:
        ch = grpc.secure_channel(config.address, grpc.ssl_channel_credentials(config.ca_file.read_bytes()))
    if config.token:
        ch = grpc.intercept_channel(ch, _TokenInterceptor(config.token))
    return ch


def stub(config: ClientConfig) -> svc_grpc.WorkflowServiceStub:
    return svc_grpc.WorkflowServiceStub(channel(config))


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _add(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        md = [*list(details.metadata or []), self._md]
        return details._replace(metadata=md) if hasattr(details, "_replace") else _Details(details, md)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._add(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._add(details), request)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def violation_lines(violations: list[tuple[str, str]]) -> list[str]:
    """The CLI's (and README's) form of an INVALID_ARGUMENT: a count, then one
    `  field.path: reason` line per violation, each once."""
    n = len(violations)
    return [f"INVALID_ARGUMENT: {n} invalid field{'s' if n != 1 else ''}",
            *(f"  {field}: {description}" for field, description in violations)]


def describe_error(err: grpc.RpcError) -> str:
    """`CODE: message` on one line; for INVALID_ARGUMENT with field violations, the
    violations instead of the message (which repeats them) - see violation_lines."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = str(err.details() if hasattr(err, "details") else err) or ""
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    violations: list[tuple[str, str]] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    if violations:
        return "\n".join(violation_lines(violations))
    if code == grpc.StatusCode.UNAVAILABLE:
        details = "cannot reach the control plane (is `syncplane up` running? --server sets the address): " + \
            " ".join(details.split())
    return f"{code.name}: {' '.join(details.split())}"
