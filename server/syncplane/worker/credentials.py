"""Resolve the credentials a workflow references, before the worker says ready.

A reference names a Kubernetes Secret in the workflow's namespace or, when
embedded, a JSON file ``<secrets-dir>/<name>.json`` with the same keys:
``clientId``, ``clientSecret``, ``tokenUrl``, and optionally ``scope`` and
``apiKey`` (Campaign's X-Api-Key, the client id when absent). A missing or
unreadable secret is fatal (retrying cannot fix it): the worker reports
BAD_CREDENTIALS and the workflow goes to ERROR. Only a secret's name and key
names ever appear in messages, never a value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.connectors.http import Credentials

REQUIRED_KEYS = ("clientId", "clientSecret", "tokenUrl")


class CredentialsError(Exception):
    reason = "BAD_CREDENTIALS"


@dataclass(frozen=True)
class ConnectionSecret:
    name: str
    client_id: str
    client_secret: str = field(repr=False)
    token_url: str
    scope: str | None = None
    api_key: str | None = None

    @classmethod
    def parse(cls, name: str, label: str, data: dict[str, str]) -> ConnectionSecret:
        """``label`` names the secret in messages, e.g. ``Secret ns/name``."""
        missing = [k for k in REQUIRED_KEYS if not data.get(k)]
        if missing:
            raise CredentialsError(f"{label} lacks the key(s) {', '.join(missing)}")
        return cls(name, data["clientId"], data["clientSecret"], data["tokenUrl"], data.get("scope") or None,
                   data.get("apiKey") or None)

    def credentials(self) -> Credentials:
        return Credentials(self.client_id, self.client_secret, scope=self.scope, api_key=self.api_key)


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
            data: Any = json.loads(path.read_text())
        except FileNotFoundError:
            raise CredentialsError(f"secret file {path} referenced by {used_by} was not found") from None
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"secret file {path} referenced by {used_by} could not be read "
                                   f"({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise CredentialsError(f"secret file {path} referenced by {used_by} is not a JSON object")
        found[name] = ConnectionSecret.parse(name, f"secret file {path}", {str(k): str(v) for k, v in data.items()})
    return found


def write_local_secret(secrets_dir: Path, name: str, data: dict[str, str]) -> Path:
    """Write an embedded-mode secret file, readable by its owner only."""
    secrets_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
