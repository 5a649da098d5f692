"""The gRPC server factory: WorkflowService + health + reflection, TLS and token auth."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from syncplane.api.callers import Callers, SharedToken
from syncplane.api.interceptors import ServerInterceptor
from syncplane.api.servicer import WorkflowServicer
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.proto.v1 import workflow_service_pb2_grpc as svc_grpc
from syncplane.service import WorkflowService
from syncplane.service.dead_letters import DeadLetterService
from syncplane.service.verify import VerifyService
from syncplane.validation.endpoints import is_loopback

SERVICE_NAME = svc.DESCRIPTOR.services_by_name["WorkflowService"].full_name


class InsecureBindError(RuntimeError):
    pass


class BindError(RuntimeError):
    """The listen address cannot be bound (in use, or not an address of this host)."""


@dataclass(frozen=True)
class ServerSecurity:
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None
    reflection: bool = True   # serve grpc.reflection (generic clients list the API)
    # Who may call: the shared token above when None; the Kubernetes backend passes its
    # TokenReview/SubjectAccessReview callers (syncplane.runtime.kube_auth).
    callers: Callers | None = None

    def authenticator(self) -> Callers:
        return self.callers or SharedToken(self.token)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None


def check_bind(address: str, security: ServerSecurity) -> None:
    """Refuse a non-loopback address unless both TLS and a bearer token are set."""
    if is_loopback(address):
        return
    missing = [what for what, ok in (("TLS (--tls-cert/--tls-key)", security.tls),
                                     ("a bearer token (--token-file or SYNCPLANE_SERVER_TOKEN)",
                                      bool(security.token) or security.callers is not None))
               if not ok]
    if missing:
        raise InsecureBindError(
            f"refusing to listen on {address}: a non-loopback address needs {' and '.join(missing)}; "
            "bind 127.0.0.1 for local use")


async def create_server(
    service: WorkflowService, address: str = "127.0.0.1:0", security: ServerSecurity | None = None,
    tracer_provider: TracerProvider | None = None, dead_letters: DeadLetterService | None = None,
    verifier: VerifyService | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    security = security or ServerSecurity()
    check_bind(address, security)
    server = grpc.aio.server(interceptors=[ServerInterceptor(security.authenticator(), tracer_provider)],
                             options=[("grpc.so_reuseport", 0)])
    svc_grpc.add_WorkflowServiceServicer_to_server(WorkflowServicer(service, dead_letters, verifier), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if security.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
    try:
        if security.tls:
            assert security.tls_cert and security.tls_key
            creds = grpc.ssl_server_credentials([(security.tls_key.read_bytes(), security.tls_cert.read_bytes())])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:   # grpc says only "Failed to bind to address"
        raise BindError(f"cannot listen on {address}: the address is in use (another `syncplane up`?) "
                        "or not an address of this host; choose another with --listen") from exc
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer


async def serve_until_signalled(server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int,
                                port_file: Path | None = None, stop: asyncio.Event | None = None) -> None:
    """Announce the port, wait for SIGTERM/SIGINT (or `stop`), then shut down
    gracefully: health goes NOT_SERVING, in-flight RPCs get a grace period."""
    if port_file:   # written whole, then renamed: a reader never sees it empty
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(str(port))   # a few bytes, once, at start-up
        tmp.replace(port_file)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)
