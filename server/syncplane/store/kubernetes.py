"""The Kubernetes backend of the store: Workflow custom resources.

The operator owns `status`; this store never writes it. The one status field that is the
API server's, `status.last_verify` (VerifyWorkflow's summary), is kept in the annotation
`verify.syncplane.io/last-result` and shown as `status.lastVerify` by this store: a second
writer of the status subresource would race the operator's status patches (it computes
status from what it read and would drop or resurrect the field), while an annotation of
ours is never touched by the operator nor by kopf (its bookkeeping is `syncplane.io/*`),
and changes neither the generation nor the etag (generation + labels). Optimistic
concurrency uses resourceVersion; the user-facing etag is
syncplane.model.kube.etag_of (generation + labels). Watch revisions are
resourceVersions, so a client resumes a Kubernetes watch.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from syncplane.contract.names import LAST_VERIFY_ANNOTATION, REQUEST_ID_ANNOTATION, SPEC_KEY, spec_configmap_names
from syncplane.errors import AlreadyExists, FieldViolation, InvalidArgument, NotFound, OutOfRange, SyncplaneError
from syncplane.model.convert import spec_from_dict, to_resource
from syncplane.model.kube import last_verify_annotation, proto_path, workflow_from_body
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.store.base import CHANGE_ADDED, CHANGE_DELETED, CHANGE_MODIFIED, Change, Mutation

GROUP, VERSION, PLURAL = "syncplane.io", "v1", "workflows"
_CHANGE = {"ADDED": CHANGE_ADDED, "MODIFIED": CHANGE_MODIFIED, "DELETED": CHANGE_DELETED}
CONFLICT_RETRIES = 10


class KubernetesStore:
    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes_asyncio import client

        self.api_client = api_client
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)

    @staticmethod
    def _id(name: str) -> str:
        return name.split("/", 1)[-1]

    async def _get(self, name: str) -> dict[str, Any]:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self._id(name))
            return obj
        except ApiException as exc:
            if exc.status == 404:
                raise NotFound(f"workflow {name} not found", {"name": name}) from exc
            raise

    async def create(self, wf: pb.Workflow, request_id: str = "") -> pb.Workflow:
        from kubernetes_asyncio.client.exceptions import ApiException

        body = to_resource(wf)
        body.pop("status", None)
        body["metadata"] = {"name": self._id(wf.name), "labels": dict(wf.labels)}
        if request_id:
            body["metadata"]["annotations"] = {REQUEST_ID_ANNOTATION: request_id}
        try:
            created = await self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        except ApiException as exc:
            if exc.status == 409:
                existing = await self._get(wf.name)
                annotations = existing["metadata"].get("annotations") or {}
                if request_id and annotations.get(REQUEST_ID_ANNOTATION) == request_id:
                    return workflow_from_body(existing)
                raise AlreadyExists(f"workflow {wf.name} already exists", {"name": wf.name}) from exc
            if exc.status == 422:
                raise rejected(exc) from exc
            raise
        return workflow_from_body(created)

    async def get(self, name: str) -> pb.Workflow:
        return workflow_from_body(await self._get(name))

    async def list(self, *, types: Sequence[int] = (), phases: Sequence[int] = (), after: str = "",
                   limit: int = 50) -> list[pb.Workflow]:
        result = await self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        out = []
        for item in sorted(result.get("items", []), key=lambda i: str(i["metadata"]["name"])):
            wf = workflow_from_body(item)
            if wf.name <= after or (types and wf.spec.type not in types) or \
                    (phases and (wf.status.phase or pb.PHASE_STOPPED) not in phases):
                continue
            out.append(wf)
            if len(out) == limit:
                break
        return out

    def list_version(self) -> None:
        """The API server can change Workflows behind this process: lists are never reused."""
        return None

    async def update(self, name: str, mutate: Mutation) -> pb.Workflow:
        from kubernetes_asyncio.client.exceptions import ApiException

        for _ in range(CONFLICT_RETRIES):
            obj = await self._get(name)
            current = workflow_from_body(obj)
            draft = pb.Workflow()
            draft.CopyFrom(current)
            new = mutate(draft)
            if new.spec == current.spec and new.labels == current.labels:
                return current
            obj["spec"] = to_resource(new)["spec"]
            obj["metadata"]["labels"] = dict(new.labels)
            try:
                replaced = await self.custom.replace_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self._id(name), obj)
            except ApiException as exc:
                if exc.status == 409:
                    continue  # someone else wrote in between: re-read and re-check
                if exc.status == 422:
                    raise rejected(exc) from exc
                raise
            return workflow_from_body(replaced)
        raise SyncplaneError(f"workflow {name} kept changing; retry")

    async def delete(self, name: str, check: Callable[[pb.Workflow], None]) -> None:
        from kubernetes_asyncio.client.exceptions import ApiException

        for _ in range(CONFLICT_RETRIES):
            obj = await self._get(name)
            check(workflow_from_body(obj))
            try:
                await self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, self._id(name),
                    body={"preconditions": {"resourceVersion": obj["metadata"]["resourceVersion"]}},  # type: ignore[arg-type]
                )
                return
            except ApiException as exc:
                if exc.status == 409:
                    continue
                if exc.status == 404:
                    raise NotFound(f"workflow {name} not found", {"name": name}) from exc
                raise
        raise SyncplaneError(f"workflow {name} kept changing; retry")

    async def get_applied(self, name: str) -> pb.WorkflowSpec | None:
        """The spec the current run applied (its snapshot ConfigMap); None before any start.

        Raises:
            ApiException: the snapshot cannot be read (404 when it is gone under either name).
        """
        from kubernetes_asyncio.client.exceptions import ApiException

        wf = await self.get(name)
        if not wf.status.applied_spec_hash:
            return None
        missing: ApiException | None = None
        for candidate in spec_configmap_names(self._id(name), wf.status.applied_spec_hash,
                                              wf.status.applied_generation):
            try:
                cm = await self.core.read_namespaced_config_map(candidate, self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                missing = exc
                continue
            return spec_from_dict(json.loads(cm.data[SPEC_KEY]))
        assert missing is not None
        raise missing

    async def set_status(self, name: str, status: pb.WorkflowStatus,
                         applied: pb.WorkflowSpec | None = None) -> pb.Workflow:
        raise NotImplementedError("on Kubernetes the operator owns status")

    async def set_last_verify(self, name: str, result: pb.VerifyResult) -> None:
        """The annotation, by a replace conditional on the resourceVersion read (the ``update``
        verb the server already has for spec edits); re-read and retried on a conflict."""
        await self.set_annotation(name, LAST_VERIFY_ANNOTATION, last_verify_annotation(result))

    async def set_annotation(self, name: str, key: str, value: str | None, only_if: str | None = None) -> None:
        """Set (``value``) or remove (None) one of the server's annotations of a Workflow, by a replace
        conditional on the resourceVersion read, retried on a conflict; with ``only_if``, only while
        the annotation still holds that value (a removal leaves a newer caller's value alone)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        for _ in range(CONFLICT_RETRIES):
            obj = await self._get(name)
            annotations = obj["metadata"].setdefault("annotations", {}) or {}
            if only_if is not None and annotations.get(key) != only_if:
                return
            if value is None:
                if key not in annotations:
                    return
                del annotations[key]
            else:
                annotations[key] = value
            obj["metadata"]["annotations"] = annotations
            try:
                await self.custom.replace_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                                   self._id(name), obj)
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise
        raise SyncplaneError(f"workflow {name} kept changing; retry")

    async def watch(self, start_revision: int = 0, name: str = "") -> AsyncIterator[Change]:
        from kubernetes_asyncio import watch
        from kubernetes_asyncio.client.exceptions import ApiException

        version = str(start_revision) if start_revision else ""
        if not start_revision:
            listed = await self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
            version = listed["metadata"]["resourceVersion"]
            for item in sorted(listed.get("items", []), key=lambda i: str(i["metadata"]["name"])):
                wf = workflow_from_body(item)
                if not name or wf.name == name:
                    yield Change(int(version), CHANGE_ADDED, wf)
        while True:
            # `async with`: a watcher that stops early (a client cancelling, a settled mutation)
            # releases its connection here, not in a garbage collector's "Unclosed response".
            try:
                async with watch.Watch().stream(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                                self.namespace, PLURAL, resource_version=version,
                                                allow_watch_bookmarks=True, timeout_seconds=300) as stream:
                    async for event in stream:
                        obj = event["object"]
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] not in _CHANGE:
                            continue  # BOOKMARK: only moves the resume point
                        wf = workflow_from_body(obj)
                        if not name or wf.name == name:
                            yield Change(int(version), _CHANGE[event["type"]], wf)
            except ApiException as exc:
                if exc.status == 410:
                    raise OutOfRange(f"revision {version} is too old; restart from 0") from exc
                raise

def rejected(exc: Any) -> InvalidArgument:
    """The API server's 422 (the CRD's schema or CEL rules refused the object) as INVALID_ARGUMENT,
    one field violation per cause, with the proto's field names (``spec.batchSize`` ->
    ``spec.batch_size``)."""
    try:
        body = json.loads(exc.body)
        causes = (body.get("details") or {}).get("causes") or []
    except (ValueError, TypeError, AttributeError):
        body, causes = {}, []
    violations = [FieldViolation(proto_path(str(c.get("field") or "spec")), str(c.get("message") or "invalid"))
                  for c in causes if isinstance(c, dict)]
    return InvalidArgument(violations or [FieldViolation("spec", str(body.get("message") or "invalid"))])

