"""Resolve the credentials a workflow references, before the worker says ready.

A reference names a Kubernetes Secret in the workflow's namespace, which the
operator mounts into the worker pod (``<secrets-dir>/<name>/<key>``: the worker's
identity cannot read Secrets), or, when embedded, a JSON file
``<secrets-dir>/<name>.json`` with the same keys:
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

from syncplane.connectors.http import CAMPAIGN_API_HOST, Credentials, audience_allows, origin_of
from syncplane.private_files import ExposedFileError, check_private, make_private_dir
from syncplane.proto.v1 import workflow_pb2 as pb
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


def secret_references(spec: pb.WorkflowSpec) -> dict[str, str]:
    """Secret name → the first spec field referencing it (source first)."""
    refs: dict[str, str] = {}
    for f in ("source", "destination"):
        refs.setdefault(getattr(spec, f).credentials.name, f"spec.{f}.credentials")
    return refs


def load_local_secrets(spec: pb.WorkflowSpec, secrets_dir: Path) -> dict[str, ConnectionSecret]:
    """The referenced secrets from ``secrets_dir``: a ``<name>/`` directory holding a file per key (a
    Kubernetes Secret volume, which the operator mounts into the worker pod), else ``<name>.json``
    (embedded). Every file must be private (see syncplane.private_files).

    Raises:
        CredentialsError: a secret missing, unreadable, exposed to other users or lacking a key.
    """
    found: dict[str, ConnectionSecret] = {}
    for name, used_by in secret_references(spec).items():
        if (secrets_dir / name).is_dir():
            found[name] = _mounted_secret(secrets_dir / name, name, used_by)
            continue
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


def _mounted_secret(directory: Path, name: str, used_by: str) -> ConnectionSecret:
    """A Secret volume: one file per key (the kubelet's ``..data`` bookkeeping entries skipped)."""
    data: dict[str, str] = {}
    try:
        for path in sorted(directory.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            check_private(path, f"secret key file (Secret {name}, referenced by {used_by})")
            data[path.name] = path.read_text()
    except ExposedFileError as exc:
        raise CredentialsError(str(exc)) from None
    except OSError as exc:
        raise CredentialsError(f"Secret {name} referenced by {used_by} could not be read from {directory} "
                               f"({type(exc).__name__})") from None
    if not data:   # an optional Secret volume whose Secret does not exist is an empty directory
        raise CredentialsError(f"Secret {name} referenced by {used_by} was not found (nothing mounted at "
                               f"{directory})")
    return ConnectionSecret.parse(name, f"Secret {name}", data)


def write_local_secret(secrets_dir: Path, name: str, data: dict[str, str]) -> Path:
    """Write an embedded-mode secret file, readable by its owner only."""
    make_private_dir(secrets_dir)
    path = secrets_dir / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return path
