"""Resolve the credentials a workflow references, before the worker says ready.

A reference names a Kubernetes Secret in the workflow's namespace or, when
embedded, a JSON file ``<secrets-dir>/<name>.json`` with the same keys:
``clientId``, ``clientSecret``, ``tokenUrl``, and optionally ``scope`` and
``apiKey`` (Campaign's X-Api-Key, the client id when absent). A missing or
unreadable secret is fatal (retrying cannot fix it): the worker reports
BAD_CREDENTIALS and the workflow goes to ERROR. Only a secret's name and key
names ever appear in messages, never a value.

A secret also says where its tokens may go (its audience, see
``Credentials.audience``): Dataverse's ``scope`` names the org URL
(``https://org.crm.dynamics.com/.default``); Campaign's API host is shared, so
its secret names the ``organization`` (and ``apiHost`` when it is not
``https://mc.adobe.io``). :func:`check_endpoints` refuses a spec endpoint
outside it at start (ENDPOINT_NOT_ALLOWED, naming the field).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.connectors.http import CAMPAIGN_API_HOST, Credentials, audience_allows, origin_of
from syncplane.private_files import ExposedFileError, check_private, make_private_dir
from syncplane.validation.endpoints import endpoint_problem

REQUIRED_KEYS = ("clientId", "clientSecret", "tokenUrl")


class CredentialsError(Exception):
    def __init__(self, message: str, reason: str = "BAD_CREDENTIALS") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ConnectionSecret:
    name: str
    client_id: str
    client_secret: str = field(repr=False)
    token_url: str
    scope: str | None = None
    api_key: str | None = None
    organization: str | None = None
    api_host: str = CAMPAIGN_API_HOST

    @classmethod
    def parse(cls, name: str, label: str, data: dict[str, str]) -> ConnectionSecret:
        """``label`` names the secret in messages, e.g. ``Secret ns/name``."""
        missing = [k for k in REQUIRED_KEYS if not data.get(k)]
        if missing:
            raise CredentialsError(f"{label} lacks the key(s) {', '.join(missing)}")
        return cls(name, data["clientId"], data["clientSecret"], data["tokenUrl"], data.get("scope") or None,
                   data.get("apiKey") or None, data.get("organization") or None,
                   data.get("apiHost") or CAMPAIGN_API_HOST)

    def credentials(self) -> Credentials:
        return Credentials(self.client_id, self.client_secret, scope=self.scope, api_key=self.api_key,
                           organization=self.organization, api_host=self.api_host)


def check_endpoints(spec: pb.WorkflowSpec, secrets: dict[str, ConnectionSecret]) -> None:
    """Refuse a spec whose source or destination endpoint is outside the audience of the secret it
    names, before any token is fetched.

    Raises:
        CredentialsError: reason ``ENDPOINT_NOT_ALLOWED``, naming the field and the secret (never a value).
    """
    for f in ("source", "destination"):
        conn = getattr(spec, f)
        problem = endpoint_problem(conn.endpoint, conn.allow_cleartext)
        if problem:  # a Workflow applied with kubectl did not pass the API's validation
            raise CredentialsError(f"spec.{f}.endpoint: {problem}", "ENDPOINT_NOT_ALLOWED")
        secret = secrets[conn.credentials.name]
        audience = secret.credentials().audience
        endpoint = conn.endpoint if conn.endpoint.endswith("/") else conn.endpoint + "/"
        if not audience:
            raise CredentialsError(
                f"spec.{f}.credentials: the secret {secret.name!r} declares no origin for its tokens: set scope to "
                f"the Dataverse org URL (https://ORG.crm.dynamics.com/.default) or organization (Campaign)",
                "ENDPOINT_NOT_ALLOWED")
        if not audience_allows(audience, endpoint):
            raise CredentialsError(
                f"spec.{f}.endpoint: {origin_of(endpoint)} is not an origin the secret {secret.name!r} "
                f"(spec.{f}.credentials) is for; it is for {', '.join(audience)}", "ENDPOINT_NOT_ALLOWED")


def _references(spec: pb.WorkflowSpec) -> dict[str, str]:
    """Secret name → the first spec field referencing it."""
    refs: dict[str, str] = {}
    for f in ("source", "destination"):
        refs.setdefault(getattr(spec, f).credentials.name, f"spec.{f}.credentials")
    return refs


def load_local_secrets(spec: pb.WorkflowSpec, secrets_dir: Path) -> dict[str, ConnectionSecret]:
    found: dict[str, ConnectionSecret] = {}
    for name, used_by in _references(spec).items():
        path = secrets_dir / f"{name}.json"
        try:
            check_private(path, f"secret file (referenced by {used_by})")
            data: Any = json.loads(path.read_text())
        except FileNotFoundError:
            raise CredentialsError(f"secret file {path} referenced by {used_by} was not found") from None
        except ExposedFileError as exc:
            raise CredentialsError(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"secret file {path} referenced by {used_by} could not be read "
                                   f"({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise CredentialsError(f"secret file {path} referenced by {used_by} is not a JSON object")
        found[name] = ConnectionSecret.parse(name, f"secret file {path}", {str(k): str(v) for k, v in data.items()})
    return found


def write_local_secret(secrets_dir: Path, name: str, data: dict[str, str]) -> Path:
    """Write an embedded-mode secret file, readable by its owner only."""
    make_private_dir(secrets_dir)
    path = secrets_dir / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path


async def load_kubernetes_secrets(spec: pb.WorkflowSpec, namespace: str) -> dict[str, ConnectionSecret]:
    """Secrets by reference name, for the source and destination connections."""
    import base64

    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    from syncplane.kubeclient import api_client

    found: dict[str, ConnectionSecret] = {}
    api: Any = await api_client()
    try:
        core = client.CoreV1Api(api)
        for name, used_by in _references(spec).items():
            try:
                secret = await core.read_namespaced_secret(name, namespace)
            except ApiException as exc:
                what = "was not found" if exc.status == 404 else f"could not be read (HTTP {exc.status})"
                raise CredentialsError(f"Secret {namespace}/{name} referenced by {used_by} {what}") from None
            data = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
            found[name] = ConnectionSecret.parse(name, f"Secret {namespace}/{name}", data)
    finally:
        await api.close()
    return found
