"""Resolve the credentials a workflow references, before the worker says ready.

On Kubernetes a reference names a Secret in the workflow's namespace. A
missing or unreadable Secret is fatal (retrying cannot fix it): the worker
reports BAD_CREDENTIALS and the workflow goes to ERROR. Only the Secret's
name ever appears in messages, never a value.
"""

from __future__ import annotations

from typing import Any

from syncplane.api.v1 import workflow_pb2 as pb


class CredentialsError(Exception):
    reason = "BAD_CREDENTIALS"


async def load_kubernetes_secrets(spec: pb.WorkflowSpec, namespace: str) -> dict[str, dict[str, str]]:
    """Secret data by reference name, for the source and destination connections."""
    import base64

    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    from syncplane.kubeclient import api_client

    found: dict[str, dict[str, str]] = {}
    api: Any = await api_client()
    try:
        core = client.CoreV1Api(api)
        for field in ("source", "destination"):
            name = getattr(spec, field).credentials.name
            if name in found:
                continue
            try:
                secret = await core.read_namespaced_secret(name, namespace)
            except ApiException as exc:
                what = "was not found" if exc.status == 404 else f"could not be read (HTTP {exc.status})"
                raise CredentialsError(
                    f"Secret {namespace}/{name} referenced by spec.{field}.credentials {what}") from None
            found[name] = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
    finally:
        await api.close()
    return found
