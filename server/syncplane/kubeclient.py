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
