"""One way to reach the Kubernetes API: in-cluster config in a pod, else
$KUBECONFIG (read at call time, not import time)."""

from __future__ import annotations

import os
from typing import Any


async def api_client() -> Any:
    from kubernetes_asyncio import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    configuration = client.Configuration()
    await config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None,
                                  client_configuration=configuration)
    return client.ApiClient(configuration)


class LazyApi:
    """One API group of ``kubernetes_asyncio.client`` (``"CoreV1Api"``, ``"CoordinationV1Api"``, …) over
    an ApiClient: the one given, or one that :func:`api_client` opens on the first :meth:`get`. ``api`` is
    None until then. :meth:`close` closes the ApiClient when this owns it (``owns``; by default when it
    was not given, and always one it opened)."""

    def __init__(self, group: str, client: Any | None = None, *, owns: bool | None = None) -> None:
        self.group = group
        self.client = client
        self.owns = client is None if owns is None else owns
        self.api: Any = None

    async def get(self) -> Any:
        """The API group's client object, opening the ApiClient if there is none."""
        if self.api is None:
            from kubernetes_asyncio import client

            if self.client is None:
                self.client, self.owns = await api_client(), True
            self.api = getattr(client, self.group)(self.client)
        return self.api

    async def close(self) -> None:
        """Close the ApiClient if this owns it; forget both either way."""
        if self.owns and self.client is not None:
            await self.client.close()
        self.client, self.api = None, None
