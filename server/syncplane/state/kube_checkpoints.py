"""Checkpoints on Kubernetes: one ConfigMap per workflow, one data key per stream.

The ConfigMap is `<workflow>-checkpoints` in the workflow's namespace; its data
maps a stream to its cursor. The operator creates it (empty, owned by the
Workflow, so deleting the Workflow deletes it) when it starts the workflow; a
worker creates it itself (without an owner) only when it is missing. Nobody
deletes it on stop: checkpoints survive stop/start and the loss of any pod.

A commit is a JSON merge PATCH of its one data key, never a read-modify-write
of the whole map, so workers committing different streams at once never lose
each other's cursors. Transient failures (5xx, 429, connection errors,
timeouts) are retried with capped exponential backoff and jitter; when they
run out, `CheckpointError` has ``transient=True`` (an outage: the engine retries
the pass and shows the state store as Degraded). Anything else (403 Forbidden,
a missing namespace, an invalid object) raises `CheckpointError` with
``transient=False`` and what to fix (the workflow goes to ERROR with that message).

Async only: `aload` / `acommit` satisfy `syncplane.state.stores.AsyncCheckpointStore`.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from syncplane.connectors.http import pause
from syncplane.contract.names import checkpoint_configmap_name, checkpoint_labels
from syncplane.kubeclient import LazyApi
from syncplane.model.convert import API_VERSION, KIND

log = logging.getLogger(__name__)
T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
# A ConfigMap key: [-._a-zA-Z0-9]+, at most 253 characters.
_KEY_MAX = 253
_KEEP = re.compile(r"[-_a-zA-Z0-9]")
_ESCAPE = "."


class CheckpointError(RuntimeError):
    """A ConfigMap could not be read or written.

    ``transient`` is True when the API server failed in a way that passes (5xx, 429, connection
    errors, timeouts) and this store's own retries ran out: the caller retries later. It is False
    when retrying cannot help (403 Forbidden, a missing namespace, a rejected object): the message
    says what to fix. ``reason`` is the status reason for either case.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient
        self.reason = "STATE_STORE_UNAVAILABLE" if transient else "STATE_STORE_REJECTED"


def workflow_owner(workflow: str, uid: str) -> dict[str, Any]:
    """The ownerReferences metadata making the Workflow own the ConfigMap (none without a uid)."""
    if not uid:
        return {}
    return {"ownerReferences": [{"apiVersion": API_VERSION, "kind": KIND, "name": workflow, "uid": uid}]}


def stream_key(stream: str) -> str:
    """The ConfigMap data key of a stream: the name itself when it only has [-_a-zA-Z0-9]; otherwise
    every other byte (UTF-8) is written `.xx` (hex), so `optinout:crm` is `optinout.3acrm`.
    Injective ('.' only ever starts an escape), and never `.` or `..`."""
    if not stream:
        raise ValueError("a stream name is required")
    key = "".join(ch if _KEEP.fullmatch(ch) else "".join(f"{_ESCAPE}{b:02x}" for b in ch.encode())
                  for ch in stream)
    if len(key) > _KEY_MAX:
        raise ValueError(f"stream name {stream!r} is too long for a ConfigMap key ({len(key)} > {_KEY_MAX})")
    return key


def committed_annotation(stream: str) -> str:
    """The checkpoints ConfigMap's annotation holding when ``stream`` last committed (epoch seconds):
    ``syncplane.io/committed-<16 hex of SHA-256(stream)>`` (an annotation name has 63 characters at
    most, a stream key up to 253)."""
    return f"syncplane.io/committed-{hashlib.sha256(stream.encode()).hexdigest()[:16]}"


def stream_name(key: str) -> str:
    """The inverse of `stream_key`."""
    out = bytearray()
    i = 0
    while i < len(key):
        if key[i] == _ESCAPE:
            out.append(int(key[i + 1:i + 3], 16))
            i += 3
        else:
            out.extend(key[i].encode())
            i += 1
    return out.decode()


@dataclass(frozen=True)
class Retry:
    """Capped exponential backoff with full jitter, for transient API failures."""

    attempts: int = 8
    base: float = 0.2
    cap: float = 5.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0-based): uniform in [0, min(cap, base * 2**attempt)]."""
        return random.uniform(0, min(self.cap, self.base * 2 ** attempt))


def _transient(exc: BaseException) -> bool:
    from kubernetes_asyncio.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return exc.status is not None and (exc.status >= 500 or exc.status == 429)
    import aiohttp

    return isinstance(exc, aiohttp.ClientError | TimeoutError | ConnectionError)


def _not_found_kind(exc: Any) -> str:
    """What a 404 says is missing ('configmaps', 'namespaces', …), from the Status body."""
    import json

    try:
        return str((json.loads(exc.body or "{}").get("details") or {}).get("kind", ""))
    except (ValueError, AttributeError):
        return ""


async def _unless_conflict(write: Awaitable[Any]) -> bool:
    """Await ``write``: True when it was made, False when the API server answered 409 Conflict (the
    object exists already, or changed since the resourceVersion the write carries)."""
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await write
        return True
    except ApiException as exc:
        if exc.status != 409:
            raise
        return False


class ConfigMapStore:
    """A worker's ConfigMaps in one namespace: the client, and calls retried when transient.

    Give it an `ApiClient` (closed by its owner) or let it open one through
    `syncplane.kubeclient.LazyApi` on first use (closed by `close()`).
    """

    def __init__(self, namespace: str, api_client: Any | None = None, retry: Retry | None = None,
                 owner_uid: str = "") -> None:
        if not namespace:
            raise ValueError("a namespace is required")
        self.namespace = namespace
        self.owner_uid = owner_uid  # the Workflow's: a ConfigMap the worker creates goes with it
        self.retry = retry or Retry()
        self._core = LazyApi("CoreV1Api", api_client)

    async def _api(self) -> Any:
        return await self._core.get()

    async def close(self) -> None:
        """Close the client if this store opened it."""
        await self._core.close()

    async def aclose(self) -> None:
        """:meth:`close`, for :class:`syncplane.state.stores.Stores`."""
        await self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, what: str, name: str, attempt: Callable[[], Awaitable[T]]) -> T:
        from kubernetes_asyncio.client.exceptions import ApiException

        for n in range(self.retry.attempts):
            try:
                result: T = await attempt()
                return result
            except ApiException as exc:
                if exc.status == 403:
                    raise CheckpointError(
                        f"cannot {what}: forbidden to use ConfigMap {self.namespace}/{name} (the worker's "
                        f"ServiceAccount needs get, create and patch on its workflow's configmaps in "
                        f"{self.namespace!r}): "
                        f"{exc.reason}", transient=False) from exc
                if exc.status == 404 and _not_found_kind(exc) == "namespaces":
                    raise CheckpointError(f"cannot {what}: namespace {self.namespace!r} does not exist",
                                          transient=False) from exc
                if not _transient(exc) or n == self.retry.attempts - 1:
                    raise CheckpointError(f"cannot {what} in ConfigMap {self.namespace}/{name}: "
                                          f"HTTP {exc.status} {exc.reason}", transient=_transient(exc)) from exc
                failure = f"HTTP {exc.status}"
            except Exception as exc:
                if not _transient(exc):
                    raise
                if n == self.retry.attempts - 1:
                    raise CheckpointError(f"cannot {what} in ConfigMap {self.namespace}/{name}: "
                                          f"{type(exc).__name__}: {exc}", transient=True) from exc
                failure = type(exc).__name__
            delay = self.retry.delay(n)
            log.warning("could not %s (%s); retrying in %.2fs", what, failure, delay)
            await pause(delay)
        raise AssertionError("unreachable")

    def _new_configmap(self, name: str, workflow: str, labels: Mapping[str, str], data: Mapping[str, str],
                       annotations: Mapping[str, str]) -> dict[str, Any]:
        """The body of a ConfigMap this store creates: ``name`` in its namespace with ``labels``, the
        ``annotations`` (none when empty) and ``data``, owned by ``workflow`` when this store knows its uid."""
        return {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": self.namespace, "labels": dict(labels),
                             **({"annotations": dict(annotations)} if annotations else {}),
                             **workflow_owner(workflow, self.owner_uid)},
                "data": dict(data)}

    async def read(self, what: str, name: str) -> Any | None:
        """ConfigMap ``name`` (the client's V1ConfigMap), or None when it does not exist; retried as
        `_call` does (``what`` names the reading in its errors). Raises `CheckpointError` as `_call` does."""
        from kubernetes_asyncio.client.exceptions import ApiException

        async def attempt() -> Any | None:
            api = await self._api()
            try:
                return await api.read_namespaced_config_map(name, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise

        return await self._call(what, name, attempt)

    async def merge_patch(self, what: str, name: str, patch: dict[str, Any], *, workflow: str,
                          labels: Mapping[str, str] | None) -> bool:
        """Apply a JSON merge patch (``{"data": {key: value or None}}``, optionally with
        ``"metadata": {"annotations": ...}``) to ConfigMap ``name``, retried as `_call` does (``what``
        names the change in its errors). Only the keys in ``patch`` change, so writers of other keys
        never lose each other's. When the ConfigMap does not exist: with ``labels``, create it with those
        labels, owned by ``workflow`` (when this store knows its uid), holding the patch's non-null data
        and annotations, and if another writer created it meanwhile (409), patch that one; with
        ``labels=None``, change nothing (nothing to remove). Returns True when this call created it.
        Raises `CheckpointError` as `_call` does."""
        from kubernetes_asyncio.client.exceptions import ApiException

        def values(d: Mapping[str, str | None]) -> dict[str, str]:
            return {k: v for k, v in d.items() if v is not None}

        async def attempt() -> bool:
            api = await self._api()
            try:
                await api.patch_namespaced_config_map(name, self.namespace, patch, _content_type=MERGE_PATCH)
                return False
            except ApiException as exc:
                if exc.status != 404:
                    raise
            if labels is None:
                return False
            body = self._new_configmap(name, workflow, labels, values(patch.get("data") or {}),
                                       values((patch.get("metadata") or {}).get("annotations") or {}))
            if await _unless_conflict(api.create_namespaced_config_map(self.namespace, body)):
                return True
            # another writer created it in between: patch ours onto theirs
            await api.patch_namespaced_config_map(name, self.namespace, patch, _content_type=MERGE_PATCH)
            return False

        return await self._call(what, name, attempt)


class ConfigMapCheckpoints(ConfigMapStore):
    """`AsyncCheckpointStore` over `<workflow>-checkpoints` ConfigMaps in one namespace."""

    # -- AsyncCheckpointStore ---------------------------------------------------------------

    async def aload(self, workflow: str, stream: str) -> str | None:
        """The stream's committed cursor; None when nothing was committed (or the ConfigMap is missing)."""
        data = await self.aload_all(workflow)
        value = data.get(stream)
        return None if value is None else str(value)

    async def acommit(self, workflow: str, stream: str, cursor: str) -> None:
        """Set this stream's cursor, and only it: a merge PATCH of one data key; creates the
        ConfigMap if it is missing, owned by the Workflow when its uid is known (so it is
        deleted with it, and a Workflow created again under that name starts afresh)."""
        name, key = checkpoint_configmap_name(workflow), stream_key(stream)
        # When, beside it (verify reports a change at or after it as in flight, as embedded does)
        committed = {committed_annotation(stream): f"{time.time():.3f}"}
        patch = {"metadata": {"annotations": committed}, "data": {key: cursor}}
        if await self.merge_patch(f"commit the checkpoint of {workflow}/{stream}", name, patch, workflow=workflow,
                                  labels=checkpoint_labels(workflow)):
            log.info("created checkpoints ConfigMap %s/%s (the operator had not)", self.namespace, name)

    async def aswap(self, workflow: str, stream: str, expected: str | None, cursor: str) -> bool:
        """Compare-and-set of one data key (see `AsyncCheckpointStore.aswap`), by optimistic
        concurrency: the merge PATCH carries the resourceVersion read, so the API server refuses
        it (409) when the ConfigMap changed since. Another key's commit changes it too: then the
        key is read again and the swap retried, while it still holds ``expected``."""
        from kubernetes_asyncio.client.exceptions import ApiException

        name, key = checkpoint_configmap_name(workflow), stream_key(stream)
        committed = {committed_annotation(stream): f"{time.time():.3f}"}

        async def attempt() -> bool | None:  # None: lost a race on another key, read again
            api = await self._api()
            try:
                cm = await api.read_namespaced_config_map(name, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                if expected is not None:
                    return False
                body = self._new_configmap(name, workflow, checkpoint_labels(workflow), {key: cursor}, committed)
                return True if await _unless_conflict(api.create_namespaced_config_map(self.namespace, body)) else None
            if (cm.data or {}).get(key) != expected:
                return False
            patch = {"metadata": {"resourceVersion": cm.metadata.resource_version, "annotations": committed},
                     "data": {key: cursor}}
            written = _unless_conflict(
                api.patch_namespaced_config_map(name, self.namespace, patch, _content_type=MERGE_PATCH))
            return True if await written else None

        while True:
            done = await self._call(f"swap the checkpoint of {workflow}/{stream}", name, attempt)
            if done is not None:
                return done

    # -- extras -----------------------------------------------------------------------------
    async def acommitted(self, workflow: str, stream: str) -> tuple[str | None, float | None]:
        """The stream's cursor and when it was committed (epoch seconds; None when unknown: a
        commit made before commit times were kept); (None, None) before the first commit."""
        cm = await self.read(f"load the checkpoint of {workflow}/{stream}", checkpoint_configmap_name(workflow))
        if cm is None or (cursor := (cm.data or {}).get(stream_key(stream))) is None:
            return None, None
        try:
            when = float((cm.metadata.annotations or {})[committed_annotation(stream)])
        except (KeyError, ValueError):
            when = None
        return str(cursor), when

    async def aload_all(self, workflow: str) -> dict[str, str]:
        """Every stream's cursor of a workflow (stream name -> cursor)."""
        cm = await self.read(f"load the checkpoints of {workflow}", checkpoint_configmap_name(workflow))
        return {} if cm is None else {stream_name(k): str(v) for k, v in (cm.data or {}).items()}
