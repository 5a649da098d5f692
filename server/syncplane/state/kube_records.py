"""Dead letters, held records and repairs on Kubernetes: in ConfigMaps whose names follow from the workflow's.

A worker pod's own volume dies with it; a held record (an event whose contact is not in the CRM
yet) or a dead letter kept there would be lost once the checkpoint has moved past it. Here they
live in ConfigMaps of the workflow's namespace, in fixed shards:

- a record's id is the first 16 hex digits of SHA-256 over `stream NUL key`; it lives in the shard
  named after the id's first hex digit, `<workflow>-dl-<0..f>` (dead letters),
  `<workflow>-held-<0..f>` (held records) or `<workflow>-repair-<0..f>` (records `syncplane verify
  --repair` queued for the stream's next pass), as `data["<id>"]` (the record as JSON, secrets
  redacted as in the embedded store), with `data["<id>.retry"] = "true"` once RetryDeadLetters marked
  a dead letter (the worker re-sends those, then removes the mark or the record);
- each shard is labelled with the workflow and the kind, owned by the Workflow (its uid comes from
  the operator), so deleting the Workflow deletes them; created on its first record, never deleted
  (an empty shard costs one small object).

Why fixed names (issue 13, item 2): a worker reads only its own workflow's objects. RBAC can only
narrow `get` and `patch` by name (`resourceNames`), and only names known in advance; a ConfigMap per
record (the earlier layout) had to be found by listing the namespace, which showed every workflow's
dead letters. With `RECORD_SHARDS` names per kind, all of them derivable from the workflow's name
(`contract.names.worker_configmap_names`), the operator's per-Workflow Role names each one and a worker needs no
`list` at all; `create` cannot be narrowed by name, and the chart's ValidatingAdmissionPolicy
limits it to these names. Every change is a JSON merge patch of the record's own keys, so two
workers (or a worker and the API server marking a retry) never overwrite each other's records.

A ConfigMap holds at most 1 MiB, so one kind holds about `RECORD_SHARDS` MiB of records per workflow
(16,000 dead letters of 1 KiB); a write past that fails as the API server rejects it (the workflow
goes to ERROR with its message). 16 shards (`RECORD_SHARDS`) keep a full read at 16 GETs (made
concurrently).

Upgrade: records under the earlier per-record names (`<workflow>-dl-<16 hex>`, `-held-`, `-repair-`)
are not read (the worker may no longer get them); README "Upgrading" says how to carry them over.

`ConfigMapRecords` is the worker's `AsyncDeadLetterStore`, `AsyncHeldStore` and `AsyncRepairQueue`
(the verify Job queues, the workers send and remove), and the API server's `DeadLetterStore` on the
Kubernetes backend (`list_letters`, `mark`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from syncplane.connectors.base import Record
from syncplane.contract.names import (
    DEAD_LETTER,
    HELD,
    RECORD_LABEL,
    RECORD_SHARDS,
    REPAIR,
    RETRY_SUFFIX,
    WORKFLOW_LABEL,
    record_shard,
    record_shard_name,
)
from syncplane.state.kube_checkpoints import ConfigMapStore
from syncplane.state.records import DeadLetter, Held, redact


def letter_of(doc: dict[str, Any], retry: bool) -> DeadLetter:
    """The :class:`DeadLetter` a record's JSON holds; raises KeyError/ValueError when malformed."""
    return DeadLetter(stream=str(doc["stream"]), key=str(doc["key"]), resource=str(doc.get("resource", "")),
                      key_field=str(doc.get("keyField", "")), payload=dict(doc.get("payload") or {}),
                      deleted=bool(doc.get("deleted")), status=int(doc["status"]), error=str(doc["error"]),
                      first_seen=float(doc["firstSeen"]), last_seen=float(doc["lastSeen"]),
                      attempts=int(doc["attempts"]), retry=retry)


def held_of(doc: dict[str, Any]) -> Held:
    """The :class:`Held` a record's JSON holds; raises KeyError/ValueError when malformed."""
    return Held(str(doc["key"]), dict(doc.get("payload") or {}), int(doc["status"]), str(doc["error"]),
                int(doc["attempts"]))


def records_of(data: dict[str, str]) -> list[tuple[str, dict[str, Any], bool]]:
    """(id, record, marked for retry) of each record in a shard's data; a damaged value or a
    retry mark without its record is skipped (never guess)."""
    out = []
    for rid, value in data.items():
        if rid.endswith(RETRY_SUFFIX):
            continue
        try:
            doc = json.loads(value)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append((rid, doc, data.get(rid + RETRY_SUFFIX) == "true"))
    return out


class ConfigMapRecords(ConfigMapStore):
    """Dead letters, held records and repairs in fixed ConfigMap shards (see the module's text)."""

    def __init__(self, namespace: str, api_client: Any | None = None, owner_uid: str = "") -> None:
        super().__init__(namespace, api_client, owner_uid=owner_uid)
        self.location = f"kubernetes:{namespace}"  # one store for every worker of the namespace
        # (shard, id) of the dead letters this worker knows of, per workflow (from its last reading
        # and its own writes): a written record settles its dead letter with no request when it has none.
        self._letters: dict[str, set[tuple[str, str]]] = {}

    # -- the API calls -------------------------------------------------------------------------
    async def _read_shard(self, name: str) -> dict[str, str]:
        """A shard's data (empty when it does not exist yet): one GET by name."""
        cm = await self.read(f"read {name}", name)
        return {} if cm is None else dict(cm.data or {})

    async def _list(self, workflow: str, kind: str) -> list[tuple[str, str, dict[str, Any], bool]]:
        """(shard, id, record, marked for retry) of every record of a kind: each shard read by name
        (concurrently), no listing."""
        names = [record_shard_name(workflow, kind, i) for i in range(RECORD_SHARDS)]
        shards = await asyncio.gather(*(self._read_shard(name) for name in names))
        return [(name, rid, doc, marked) for name, data in zip(names, shards, strict=True)
                for rid, doc, marked in records_of(data)]

    async def _read(self, name: str, rid: str) -> dict[str, Any] | None:
        found = [doc for key, doc, _ in records_of(await self._read_shard(name)) if key == rid]
        return found[0] if found else None

    async def _patch(self, workflow: str, kind: str, name: str, data: dict[str, str | None], create: bool) -> None:
        """A JSON merge patch of these data keys only (None removes a key). A missing shard is
        created (labelled, owned by the Workflow) when ``create``; otherwise there is nothing to change."""
        await self.merge_patch(f"write {name}", name, {"data": data}, workflow=workflow,
                               labels={WORKFLOW_LABEL: workflow, RECORD_LABEL: kind} if create else None)

    async def _write(self, workflow: str, kind: str, name: str, rid: str, doc: dict[str, Any]) -> None:
        """Create or replace the record, dropping its retry mark."""
        await self._patch(workflow, kind, name, {rid: json.dumps(doc, sort_keys=True), rid + RETRY_SUFFIX: None},
                          create=True)

    async def _delete(self, workflow: str, kind: str, name: str, rid: str) -> None:
        await self._patch(workflow, kind, name, {rid: None, rid + RETRY_SUFFIX: None}, create=False)

    async def _mark(self, workflow: str, name: str, rid: str, marked: bool) -> None:
        """Set or clear the retry mark (a mark left by a record deleted meanwhile is never read)."""
        await self._patch(workflow, DEAD_LETTER, name, {rid + RETRY_SUFFIX: "true" if marked else None},
                          create=False)

    # -- AsyncDeadLetterStore (the worker) -------------------------------------------------------
    async def adead_letter(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                           error: str, *, resource: str = "", key_field: str = "", deleted: bool = False) -> None:
        """``AsyncDeadLetterStore.adead_letter`` (see the module's text)."""
        name, rid = record_shard(workflow, DEAD_LETTER, stream, key)
        old = await self._read(name, rid)
        now = time.time()
        doc = {"stream": stream, "key": key, "resource": resource, "keyField": key_field,
               "payload": redact(payload), "deleted": deleted, "status": status, "error": error,
               "firstSeen": old["firstSeen"] if old else now, "lastSeen": now,
               "attempts": int(old["attempts"]) + 1 if old else 1}
        await self._write(workflow, DEAD_LETTER, name, rid, doc)
        self._letters.setdefault(workflow, set()).add((name, rid))

    async def adead_letter_count(self, workflow: str) -> int:
        """``AsyncDeadLetterStore.adead_letter_count`` (see the module's text)."""
        return len(await self.list_letters(workflow))

    async def amarked_for_retry(self, workflow: str, stream: str) -> list[DeadLetter]:
        """``AsyncDeadLetterStore.amarked_for_retry`` (see the module's text)."""
        rows = await self._list(workflow, DEAD_LETTER)
        self._letters[workflow] = {(name, rid) for name, rid, _, _ in rows}
        return sorted((letter_of(doc, True) for _, _, doc, marked in rows if marked and doc.get("stream") == stream),
                      key=lambda d: d.key)

    async def asettle_retry(self, workflow: str, stream: str, delivered: Iterable[str],
                            rejected: Iterable[tuple[str, int, str]], sent: Iterable[str]) -> None:
        """``AsyncDeadLetterStore.asettle_retry`` (see the module's text)."""
        known = self._letters.setdefault(workflow, set())
        for key in delivered:
            where = record_shard(workflow, DEAD_LETTER, stream, key)
            if where in known:
                await self._delete(workflow, DEAD_LETTER, *where)
                known.discard(where)
        again = set()
        for key, status, error in rejected:
            name, rid = record_shard(workflow, DEAD_LETTER, stream, key)
            old = await self._read(name, rid)
            if old is not None:
                old.update(status=status, error=error, lastSeen=time.time(), attempts=int(old["attempts"]) + 1)
                await self._write(workflow, DEAD_LETTER, name, rid, old)
                again.add(key)
        for key in sent:
            where = record_shard(workflow, DEAD_LETTER, stream, key)
            if key not in again and where in known:
                await self._mark(workflow, *where, False)

    # -- AsyncHeldStore (the worker) -------------------------------------------------------------
    async def ahold(self, workflow: str, stream: str, key: str, payload: dict[str, Any], status: int,
                    error: str) -> None:
        """``AsyncHeldStore.ahold`` (see the module's text)."""
        name, rid = record_shard(workflow, HELD, stream, key)
        old = await self._read(name, rid)
        doc = {"stream": stream, "key": key, "payload": redact(payload), "status": status, "error": error,
               "attempts": int(old["attempts"]) + 1 if old else 1}
        await self._write(workflow, HELD, name, rid, doc)

    async def arelease(self, workflow: str, stream: str, key: str) -> None:
        """``AsyncHeldStore.arelease`` (see the module's text)."""
        await self._delete(workflow, HELD, *record_shard(workflow, HELD, stream, key))

    async def aall(self, workflow: str, stream: str) -> list[Held]:
        """``AsyncHeldStore.aall`` (see the module's text)."""
        rows = await self._list(workflow, HELD)
        return sorted((held_of(doc) for _, _, doc, _ in rows if doc.get("stream") == stream), key=lambda h: h.key)

    # -- AsyncRepairQueue (the verify Job queues, the worker sends) -------------------------------
    async def aqueue_repairs(self, workflow: str, stream: str, records: Sequence[Record]) -> int:
        """Queue records for the stream's next pass (a newer queueing of a key replaces the older);
        the payload is the source record as read (no secret: source values only). One patch per
        shard touched. Returns how many."""
        now = time.time()
        shards: dict[str, dict[str, str | None]] = {}
        for r in records:
            name, rid = record_shard(workflow, REPAIR, stream, r.key)
            doc = {"stream": stream, "key": r.key, "payload": {} if r.deleted else r.values,
                   "deleted": r.deleted, "queued": now}
            shards.setdefault(name, {})[rid] = json.dumps(doc, sort_keys=True, default=str)
        for name in sorted(shards):
            await self._patch(workflow, REPAIR, name, shards[name], create=True)
        return len(records)

    async def arepairs(self, workflow: str, stream: str) -> list[Record]:
        """The stream's queued repairs, oldest queueing first (then by key)."""
        rows = [doc for _, _, doc, _ in await self._list(workflow, REPAIR) if doc.get("stream") == stream]
        rows.sort(key=lambda d: (float(d.get("queued") or 0), str(d["key"])))
        return [Record(str(d["key"]), {} if d.get("deleted") else dict(d.get("payload") or {}),
                       deleted=bool(d.get("deleted"))) for d in rows]

    async def arepaired(self, workflow: str, stream: str, keys: Iterable[str]) -> None:
        """Remove these keys' repairs (sent): one patch per shard touched."""
        shards: dict[str, dict[str, str | None]] = {}
        for key in keys:
            name, rid = record_shard(workflow, REPAIR, stream, key)
            shards.setdefault(name, {})[rid] = None
        for name in sorted(shards):
            await self._patch(workflow, REPAIR, name, shards[name], create=False)

    # -- the API server's side (DeadLetterStore) -------------------------------------------------
    async def list_letters(self, workflow: str) -> list[DeadLetter]:
        """Every dead letter of a workflow, ordered by (stream, key)."""
        rows = await self._list(workflow, DEAD_LETTER)
        self._letters[workflow] = {(name, rid) for name, rid, _, _ in rows}
        return sorted((letter_of(doc, marked) for _, _, doc, marked in rows), key=lambda d: (d.stream, d.key))

    async def page(self, workflow: str, after: tuple[str, str] | None, limit: int) -> tuple[list[DeadLetter], int]:
        """One reading gives both the page and the total."""
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
            await self._mark(workflow, *record_shard(workflow, DEAD_LETTER, d.stream, d.key), True)
        return len(letters), []
