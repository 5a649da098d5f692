"""Dead letters, held records and repairs on Kubernetes: one ConfigMap per record, so they outlive the pod.

A worker pod's own volume dies with it; a held record (an event whose contact is not in the CRM
yet) or a dead letter kept there would be lost once the checkpoint has moved past it. Here each
lives in a ConfigMap of the workflow's namespace:

- named `<workflow>-dl-<hash>` (a dead letter), `<workflow>-held-<hash>` or `<workflow>-repair-<hash>`
  (a record `syncplane verify --repair` queued for the stream's next pass), the hash being the
  first 16 hex digits of SHA-256 over `stream NUL key`;
- labelled with the workflow and the kind, plus `syncplane.io/retry: "true"` once
  RetryDeadLetters marked it (the worker re-sends those, then removes the label or the record);
- owned by the Workflow (its uid comes from the operator), so deleting the Workflow deletes them;
- holding the record as JSON in `data["record.json"]`, secrets redacted as in the embedded store.

`ConfigMapRecords` is the worker's `AsyncDeadLetterStore`, `AsyncHeldStore` and `AsyncRepairQueue`
(the verify Job queues, the workers send and remove), and the API server's `DeadLetterStore` on the
Kubernetes backend (`list_letters`, `mark`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from syncplane.connectors.base import Record
from syncplane.contract.names import RECORD_LABEL, RETRY_LABEL, WORKFLOW_LABEL
from syncplane.state.kube_checkpoints import MERGE_PATCH, ConfigMapStore, workflow_owner
from syncplane.state.records import DeadLetter, Held, redact

DEAD_LETTER, HELD, REPAIR = "dead-letter", "held", "repair"
DATA_KEY = "record.json"
_PREFIX = {DEAD_LETTER: "dl", HELD: "held", REPAIR: "repair"}


def record_name(workflow: str, kind: str, stream: str, key: str) -> str:
    """The ConfigMap name of a record: ``<workflow>-<dl|held|repair>-<16 hex of SHA-256(stream NUL key)>``."""
    digest = hashlib.sha256(f"{stream}\0{key}".encode()).hexdigest()[:16]
    return f"{workflow}-{_PREFIX[kind]}-{digest}"


def record_selector(workflow: str, kind: str, retry: bool = False) -> str:
    """The label selector of a workflow's records of ``kind`` (only those marked for retry when ``retry``)."""
    selector = f"{WORKFLOW_LABEL}={workflow},{RECORD_LABEL}={kind}"
    return selector + (f",{RETRY_LABEL}=true" if retry else "")


def letter_of(doc: dict[str, Any], retry: bool) -> DeadLetter:
    """The :class:`DeadLetter` a record ConfigMap's JSON holds; raises KeyError/ValueError when malformed."""
    return DeadLetter(stream=str(doc["stream"]), key=str(doc["key"]), resource=str(doc.get("resource", "")),
                      key_field=str(doc.get("keyField", "")), payload=dict(doc.get("payload") or {}),
                      deleted=bool(doc.get("deleted")), status=int(doc["status"]), error=str(doc["error"]),
                      first_seen=float(doc["firstSeen"]), last_seen=float(doc["lastSeen"]),
                      attempts=int(doc["attempts"]), retry=retry)


def held_of(doc: dict[str, Any]) -> Held:
    """The :class:`Held` a record ConfigMap's JSON holds; raises KeyError/ValueError when malformed."""
    return Held(str(doc["key"]), dict(doc.get("payload") or {}), int(doc["status"]), str(doc["error"]),
                int(doc["attempts"]))


class ConfigMapRecords(ConfigMapStore):
    """Dead letters and held records as ConfigMaps, one per record (see the module's text)."""

    def __init__(self, namespace: str, api_client: Any | None = None, owner_uid: str = "") -> None:
        super().__init__(namespace, api_client, owner_uid=owner_uid)
        self.location = f"kubernetes:{namespace}"  # one store for every worker of the namespace
        # Names of the dead letters this worker knows of, per workflow (from its last listing and
        # its own writes): a written record settles its dead letter with no request when it has none.
        self._letters: dict[str, set[str]] = {}

    # -- the API calls -------------------------------------------------------------------------
    async def _list(self, workflow: str, kind: str, retry: bool = False) -> list[tuple[str, dict[str, Any], bool]]:
        """(name, record, marked for retry) of every record of a kind, all pages."""
        async def attempt() -> list[tuple[str, dict[str, Any], bool]]:
            api = await self._api()
            out, token = [], None
            while True:
                page = await api.list_namespaced_config_map(
                    self.namespace, label_selector=record_selector(workflow, kind, retry), limit=500,
                    **({"_continue": token} if token else {}))
                for cm in page.items:
                    try:
                        doc = json.loads((cm.data or {})[DATA_KEY])
                    except (KeyError, ValueError):
                        continue  # not ours, or damaged: never guess
                    out.append((cm.metadata.name, doc, (cm.metadata.labels or {}).get(RETRY_LABEL) == "true"))
                token = page.metadata._continue
                if not token:
                    return out

        return await self._call(f"list the {kind} records of {workflow}", f"{workflow}-*", attempt)

    async def _read(self, name: str) -> dict[str, Any] | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        async def attempt() -> dict[str, Any] | None:
            api = await self._api()
            try:
                cm = await api.read_namespaced_config_map(name, self.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            try:
                doc: dict[str, Any] = json.loads((cm.data or {})[DATA_KEY])
                return doc
            except (KeyError, ValueError):
                return None

        return await self._call(f"read {name}", name, attempt)

    async def _write(self, workflow: str, kind: str, name: str, doc: dict[str, Any], existed: bool) -> None:
        """Create the record, or replace its data (and drop a retry mark) if it exists."""
        from kubernetes_asyncio.client.exceptions import ApiException

        data = {DATA_KEY: json.dumps(doc, sort_keys=True)}

        async def attempt() -> None:
            api = await self._api()
            if existed:
                await api.patch_namespaced_config_map(
                    name, self.namespace, {"metadata": {"labels": {RETRY_LABEL: None}}, "data": data},
                    _content_type=MERGE_PATCH)
                return
            body = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": self.namespace,
                                 "labels": {WORKFLOW_LABEL: workflow, RECORD_LABEL: kind},
                                 **workflow_owner(workflow, self.owner_uid)},
                    "data": data}
            try:
                await api.create_namespaced_config_map(self.namespace, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                await api.patch_namespaced_config_map(name, self.namespace, {"data": data},
                                                      _content_type=MERGE_PATCH)

        await self._call(f"write {name}", name, attempt)

    async def _delete(self, name: str) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        async def attempt() -> None:
            api = await self._api()
            try:
                await api.delete_namespaced_config_map(name, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise

        await self._call(f"delete {name}", name, attempt)

    async def _mark(self, name: str, marked: bool) -> None:
        """Set or clear the retry label; a record deleted meanwhile (delivered) needs neither."""
        from kubernetes_asyncio.client.exceptions import ApiException

        async def attempt() -> None:
            api = await self._api()
            try:
                await api.patch_namespaced_config_map(
                    name, self.namespace, {"metadata": {"labels": {RETRY_LABEL: "true" if marked else None}}},
                    _content_type=MERGE_PATCH)
            except ApiException as exc:
                if exc.status != 404:
                    raise

        await self._call(f"mark {name}", name, attempt)

    # -- AsyncDeadLetterStore (the worker) -------------------------------------------------------
    async def adead_letter(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                           error: str, *, resource: str = "", key_field: str = "", deleted: bool = False) -> None:
        """``AsyncDeadLetterStore.adead_letter`` (see the module's text)."""
        name = record_name(workflow, DEAD_LETTER, stream, key)
        old = await self._read(name)
        now = time.time()
        doc = {"stream": stream, "key": key, "resource": resource, "keyField": key_field,
               "payload": redact(payload), "deleted": deleted, "status": status, "error": error,
               "firstSeen": old["firstSeen"] if old else now, "lastSeen": now,
               "attempts": int(old["attempts"]) + 1 if old else 1}
        await self._write(workflow, DEAD_LETTER, name, doc, existed=old is not None)
        self._letters.setdefault(workflow, set()).add(name)

    async def adead_letter_count(self, workflow: str) -> int:
        """``AsyncDeadLetterStore.adead_letter_count`` (see the module's text)."""
        return len(await self.list_letters(workflow))

    async def amarked_for_retry(self, workflow: str, stream: str) -> list[DeadLetter]:
        """``AsyncDeadLetterStore.amarked_for_retry`` (see the module's text)."""
        rows = await self._list(workflow, DEAD_LETTER, retry=True)
        self._letters.setdefault(workflow, set()).update(name for name, _, _ in rows)
        return sorted((letter_of(doc, True) for _, doc, _ in rows if doc.get("stream") == stream),
                      key=lambda d: d.key)

    async def asettle_retry(self, workflow: str, stream: str, delivered: Iterable[str],
                            rejected: Iterable[tuple[str, int, str]], sent: Iterable[str]) -> None:
        """``AsyncDeadLetterStore.asettle_retry`` (see the module's text)."""
        known = self._letters.setdefault(workflow, set())
        for key in delivered:
            name = record_name(workflow, DEAD_LETTER, stream, key)
            if name in known:
                await self._delete(name)
                known.discard(name)
        again = set()
        for key, status, error in rejected:
            name = record_name(workflow, DEAD_LETTER, stream, key)
            old = await self._read(name)
            if old is not None:
                old.update(status=status, error=error, lastSeen=time.time(), attempts=int(old["attempts"]) + 1)
                await self._write(workflow, DEAD_LETTER, name, old, existed=True)
                again.add(key)
        for key in sent:
            name = record_name(workflow, DEAD_LETTER, stream, key)
            if key not in again and name in known:
                await self._mark(name, False)

    # -- AsyncHeldStore (the worker) -------------------------------------------------------------
    async def ahold(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                    error: str) -> None:
        """``AsyncHeldStore.ahold`` (see the module's text)."""
        name = record_name(workflow, HELD, stream, key)
        old = await self._read(name)
        doc = {"stream": stream, "key": key, "payload": redact(payload), "status": status, "error": error,
               "attempts": int(old["attempts"]) + 1 if old else 1}
        await self._write(workflow, HELD, name, doc, existed=old is not None)

    async def arelease(self, workflow: str, stream: str, key: str) -> None:
        """``AsyncHeldStore.arelease`` (see the module's text)."""
        await self._delete(record_name(workflow, HELD, stream, key))

    async def aall(self, workflow: str, stream: str) -> list[Held]:
        """``AsyncHeldStore.aall`` (see the module's text)."""
        rows = await self._list(workflow, HELD)
        return sorted((held_of(doc) for _, doc, _ in rows if doc.get("stream") == stream), key=lambda h: h.key)

    # -- AsyncRepairQueue (the verify Job queues, the worker sends) -------------------------------
    async def aqueue_repairs(self, workflow: str, stream: str, records: Sequence[Record]) -> int:
        """Queue records for the stream's next pass (a newer queueing of a key replaces the older);
        the payload is the source record as read (no secret: source values only). Returns how many."""
        now = time.time()
        for r in records:
            name = record_name(workflow, REPAIR, stream, r.key)
            doc = {"stream": stream, "key": r.key, "payload": {} if r.deleted else r.values,
                   "deleted": r.deleted, "queued": now}
            await self._write(workflow, REPAIR, name, json.loads(json.dumps(doc, default=str)), existed=False)
        return len(records)

    async def arepairs(self, workflow: str, stream: str) -> list[Record]:
        """The stream's queued repairs, oldest queueing first (then by key)."""
        rows = [doc for _, doc, _ in await self._list(workflow, REPAIR) if doc.get("stream") == stream]
        rows.sort(key=lambda d: (float(d.get("queued") or 0), str(d["key"])))
        return [Record(str(d["key"]), {} if d.get("deleted") else dict(d.get("payload") or {}),
                       deleted=bool(d.get("deleted"))) for d in rows]

    async def arepaired(self, workflow: str, stream: str, keys: Iterable[str]) -> None:
        """``AsyncRepairQueue.arepaired`` (see the module's text)."""
        for key in keys:
            await self._delete(record_name(workflow, REPAIR, stream, key))

    # -- the API server's side (DeadLetterStore) -------------------------------------------------
    async def list_letters(self, workflow: str) -> list[DeadLetter]:
        """Every dead letter of a workflow, ordered by (stream, key)."""
        rows = await self._list(workflow, DEAD_LETTER)
        self._letters[workflow] = {name for name, _, _ in rows}
        return sorted((letter_of(doc, marked) for _, doc, marked in rows), key=lambda d: (d.stream, d.key))

    async def page(self, workflow: str, after: tuple[str, str] | None, limit: int) -> tuple[list[DeadLetter], int]:
        """One listing gives both the page and the total."""
        letters = await self.list_letters(workflow)
        return [d for d in letters if after is None or (d.stream, d.key) > after][:limit], len(letters)

    async def mark(self, workflow: str, keys: Sequence[str]) -> tuple[int, list[str]]:
        """Mark the workflow's dead letters (all, or those with these keys, in any stream) for
        retry. All or nothing: returns (marked, unknown keys)."""
        letters = await self.list_letters(workflow)
        if keys:
            present = {d.key for d in letters}
            unknown = [k for k in keys if k not in present]
            if unknown:
                return 0, unknown
            wanted = set(keys)
            letters = [d for d in letters if d.key in wanted]
        for d in letters:
            await self._mark(record_name(workflow, DEAD_LETTER, d.stream, d.key), True)
        return len(letters), []
