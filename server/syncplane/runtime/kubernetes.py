"""`syncplane server --backend kubernetes`: the same WorkflowService over
Workflow custom resources. The operator reconciles; this process only
reads CRs and writes their spec (never status)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from syncplane.api.callers import SharedToken
from syncplane.api.server import ServerSecurity, check_bind, create_server, serve_until_signalled
from syncplane.console import ConsoleConfig, announce_console, serve_console
from syncplane.kubeclient import api_client
from syncplane.runtime.kube_auth import KubernetesCallers
from syncplane.service import WorkflowService
from syncplane.service.dead_letters import DeadLetterService
from syncplane.service.verify import VerifyService
from syncplane.startup import startup_line
from syncplane.state.kube_records import ConfigMapRecords
from syncplane.store.kubernetes import KubernetesStore
from syncplane.telemetry import serve_metrics, setup_metrics, setup_tracing
from syncplane.verify.kube import KubernetesVerifyRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KubernetesServerConfig:
    namespace: str
    address: str = "127.0.0.1:7443"
    security: ServerSecurity = field(default_factory=ServerSecurity)
    otlp_endpoint: str | None = None
    metrics_address: str | None = None   # host:port of /metrics (Prometheus); None: not served
    port_file: Path | None = None
    console: ConsoleConfig | None = None
    console_port_file: Path | None = None
    # "kubernetes": each caller's own token (TokenReview + SubjectAccessReview); "token": the shared one.
    auth: str = "kubernetes"


async def kubernetes_store(namespace: str) -> KubernetesStore:
    return KubernetesStore(await api_client(), namespace)


def kubernetes_verifier(store: KubernetesStore) -> VerifyService:
    """VerifyWorkflow on Kubernetes: this server reads no Secret, so each comparison runs in a Job as
    the workflow's own worker identity, and the server waits for its result (syncplane.verify.kube)."""
    return VerifyService(store, KubernetesVerifyRunner(store))


async def serve_kubernetes(config: KubernetesServerConfig, stop: asyncio.Event | None = None) -> None:
    console_config = config.console
    if console_config is not None:   # refuse an insecure console before anything starts
        check_bind(console_config.address, console_config.security if config.auth != "kubernetes"
                   else replace(console_config.security, callers=SharedToken(None)))   # (callers come below)
    setup_tracing("syncplane-server", config.otlp_endpoint)
    setup_metrics("syncplane-server", config.otlp_endpoint)
    if config.metrics_address:
        serve_metrics(config.metrics_address)
    store = await kubernetes_store(config.namespace)
    security = config.security
    if config.auth == "kubernetes":
        # one set of callers for gRPC and the console: each caller's own token, TokenReview + SubjectAccessReview
        callers = KubernetesCallers(store.api_client, config.namespace)
        security = replace(security, callers=callers)
        if console_config is not None:
            console_config = replace(console_config, security=replace(console_config.security, callers=callers))
    service = WorkflowService(store)
    # The workers keep their dead letters in ConfigMaps of this namespace, 16 shards per workflow.
    letters = DeadLetterService(store, ConfigMapRecords(config.namespace, store.api_client))
    server, port, health = await create_server(service, config.address, security, dead_letters=letters,
                                               verifier=kubernetes_verifier(store))
    try:
        console = await serve_console(console_config, service, letters, config.console_port_file)
    except BaseException:
        await server.stop(None)
        await store.api_client.close()
        raise
    if console is not None:
        announce_console(console[1])
    host = config.address.rsplit(":", 1)[0]
    log.info(startup_line("server", listen=f"{host}:{port}", tls=config.security.tls,
                          backend="kubernetes", namespaces=[config.namespace], auth=config.auth,
                          console=console[1] if console is not None else "off"))
    await serve_until_signalled(server, health, port, config.port_file, stop)
    if console is not None:
        await console[0].cleanup()
    await store.api_client.close()
