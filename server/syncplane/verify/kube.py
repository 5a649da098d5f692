"""``syncplane verify`` on Kubernetes: the comparison runs in a one-off Job, as the workflow's workers.

The API server reads no Secret (README, "Security model"), so it cannot compare itself. Instead:

1. the server records the request on the Workflow, as the annotation ``verify.syncplane.io/request``
   (JSON ``{"id", "samples", "repair"}``, a new id per call: `VerifyRequest`);
2. the operator's per-Workflow daemon (woken by that edit) creates the Job ``<workflow>-verify-<id>``
   from the worker pod template: the workflow's own ServiceAccount, the same Secrets mounted, the spec
   the workers run (the applied snapshot while they run, else the current spec), owned by the
   Workflow, cleaned up ``ttlSecondsAfterFinished`` after it ends (operator builders.build_verify_job);
3. the Job (`run_job`, ``syncplane verify-job``) runs the same comparison as embedded
   (syncplane.verify.run) against the workers' ConfigMap state (`ConfigMapWorkerState`: checkpoints;
   ``--repair`` queues into the ``<workflow>-repair-<0..f>`` ConfigMap shards the workers read at
   their next pass) and writes the answer, or the reason it could not, to the ConfigMap ``<workflow>-verify``
   (`outcome_data`): a name the admission policy lets the worker identity write;
4. the server watches that ConfigMap until it holds its request id, or the RPC's deadline nears
   (`KubernetesVerifyRunner`), and keeps the summary as ``status.lastVerify`` as embedded does.

Nothing here carries a secret: the request and the result hold keys and counts only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets as random_ids
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from syncplane.contract.names import (
    COMPONENT_LABEL,
    COMPONENT_VERIFY,
    MANAGED_BY_LABEL,
    VERIFY_REQUEST_ANNOTATION,
    WORKFLOW_LABEL,
    verify_configmap_name,
)
from syncplane.errors import FailedPrecondition, SyncplaneError, Unavailable
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.state.kube_checkpoints import ConfigMapCheckpoints
from syncplane.state.kube_records import ConfigMapRecords
from syncplane.verify.run import WorkerState

log = logging.getLogger(__name__)

REQUEST_ANNOTATION = VERIFY_REQUEST_ANNOTATION
REQUEST_KEY, RESULT_KEY, ERROR_KEY = "request", "result.json", "error.json"
VERIFY_COMPONENT = COMPONENT_VERIFY[COMPONENT_LABEL]
MAX_WAIT = 900.0          # seconds the server waits for a Job's result when the call has no deadline
DEADLINE_MARGIN = 1.0     # seconds kept before the caller's deadline to answer with the reason
JOB_TTL = 600             # seconds a finished verify Job (and its pod) stays for inspection


@dataclass(frozen=True)
class VerifyRequest:
    """One verify asked of the operator; ``id`` tells its result from an older one's."""

    id: str
    samples: int
    repair: bool

    @classmethod
    def new(cls, samples: int, repair: bool) -> VerifyRequest:
        return cls(random_ids.token_hex(8), samples, repair)

    def annotation(self) -> str:
        return json.dumps({"id": self.id, "samples": self.samples, "repair": self.repair}, sort_keys=True)

    @classmethod
    def parse(cls, raw: object) -> VerifyRequest | None:
        """The request an annotation holds; None when there is none or it is not one of ours (never guessed)."""
        if not isinstance(raw, str):
            return None
        try:
            doc = json.loads(raw)
            rid, samples, repair = doc["id"], doc["samples"], doc["repair"]
        except (ValueError, KeyError, TypeError):
            return None
        if not (isinstance(rid, str) and rid.isalnum() and rid.isascii() and 0 < len(rid) <= 32
                and isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0
                and isinstance(repair, bool)):
            return None
        return cls(rid.lower(), samples, repair)


#: ``<workflow>-verify`` (contract.names: the worker identity's Role and the admission policy name it too)
result_configmap_name = verify_configmap_name


def job_name(workflow: str, request_id: str) -> str:
    """``<workflow>-verify-<id>``, within the 63 characters a Job's name may have (its pods' label)."""
    return f"{workflow[:44]}-verify-{request_id[:8]}"


def result_labels(workflow: str) -> dict[str, str]:
    return {MANAGED_BY_LABEL: "syncplane", COMPONENT_LABEL: VERIFY_COMPONENT, WORKFLOW_LABEL: workflow}


@dataclass(frozen=True)
class Outcome:
    """What a verify Job wrote: the response, or the error it answered (a SyncplaneError's fields)."""

    response: svc.VerifyWorkflowResponse | None = None
    code: str = ""       # FAILED_PRECONDITION | UNAVAILABLE | INTERNAL
    reason: str = ""
    message: str = ""

    def raise_error(self, phase: str) -> None:
        """Raise the error this outcome carries (nothing when it holds a response)."""
        if self.response is not None:
            return
        if self.code == "UNAVAILABLE":
            raise Unavailable(self.message, self.reason or "UNAVAILABLE")
        raise FailedPrecondition(self.message, phase, self.reason or "VERIFY_FAILED")


def outcome_data(request_id: str, response: svc.VerifyWorkflowResponse | None = None,
                 error: SyncplaneError | None = None) -> dict[str, str]:
    """The ``<workflow>-verify`` ConfigMap's data for a request: its id and the response or the error."""
    if response is not None:
        return {REQUEST_KEY: request_id, RESULT_KEY: json_format.MessageToJson(response, indent=None)}
    assert error is not None
    code = "UNAVAILABLE" if isinstance(error, Unavailable) else (
        "FAILED_PRECONDITION" if isinstance(error, FailedPrecondition) else "INTERNAL")
    return {REQUEST_KEY: request_id,
            ERROR_KEY: json.dumps({"code": code, "reason": error.reason, "message": str(error)}, sort_keys=True)}


def parse_outcome(data: dict[str, str] | None, request_id: str) -> Outcome | None:
    """The outcome of ``request_id`` in a ConfigMap's data; None while it holds another request's
    (an older one, or none yet)."""
    data = data or {}
    if data.get(REQUEST_KEY) != request_id:
        return None
    if RESULT_KEY in data:
        try:
            return Outcome(response=json_format.Parse(data[RESULT_KEY], svc.VerifyWorkflowResponse()))
        except json_format.ParseError:
            return Outcome(code="INTERNAL", reason="VERIFY_FAILED", message="the verify Job wrote an unreadable result")
    try:
        doc = json.loads(data.get(ERROR_KEY, ""))
        return Outcome(code=str(doc["code"]), reason=str(doc["reason"]), message=str(doc["message"]))
    except (ValueError, KeyError, TypeError):
        return Outcome(code="INTERNAL", reason="VERIFY_FAILED", message="the verify Job wrote an unreadable error")


class ConfigMapWorkerState(WorkerState):
    """verify's WorkerState over the workers' ConfigMaps: checkpoints (and when each was committed)
    in ``<workflow>-checkpoints``, repairs queued in the ``<workflow>-repair-<0..f>`` shards
    (kube_records), which the workers send at their next pass. A commit with no time (written
    before times were kept) makes a running workflow's differences all in flight, never hidden."""

    def __init__(self, checkpoints: ConfigMapCheckpoints, records: ConfigMapRecords) -> None:
        self.checkpoints, self.records = checkpoints, records

    async def committed(self, workflow: str, stream: str) -> tuple[str | None, float | None]:
        return await self.checkpoints.acommitted(workflow, stream)

    async def queue_repairs(self, workflow: str, stream: str, records: Any) -> int:
        return await self.records.aqueue_repairs(workflow, stream, records)


async def write_outcome(store: ConfigMapCheckpoints, workflow: str, data: dict[str, str]) -> None:
    """Create ``<workflow>-verify`` (owned by the Workflow), or replace its data (a merge PATCH that
    also drops the other of result/error)."""
    patch = {"data": {REQUEST_KEY: None, RESULT_KEY: None, ERROR_KEY: None, **data}}
    await store.merge_patch(f"write the verify result of {workflow}", result_configmap_name(workflow), patch,
                            workflow=workflow, labels=result_labels(workflow))


async def run_job(workflow: str, namespace: str, workflow_uid: str, spec_file: Path, secrets_dir: Path,
                  request: VerifyRequest, running: bool) -> int:
    """The verify Job's container: compare, write the outcome to ``<workflow>-verify``; exit code 0
    when an outcome (a result or the reason there is none) was written, 1 when even that failed."""
    from syncplane.model.convert import spec_from_dict
    from syncplane.service.verify import SecretFilesEnvironment, compare, response_of

    checkpoints = ConfigMapCheckpoints(namespace, owner_uid=workflow_uid)
    records = ConfigMapRecords(namespace, owner_uid=workflow_uid)
    try:
        try:
            spec = spec_from_dict(json.loads(await asyncio.to_thread(spec_file.read_text)))
            # The Secrets are mounted as the workers' are: one directory per Secret (syncplane.credentials).
            env = SecretFilesEnvironment(secrets_dir, ConfigMapWorkerState(checkpoints, records))
            report = await compare(workflow, spec, env, phase="RUNNING" if running else "STOPPED",
                                   running=running, repair=request.repair)
            response = response_of(report, request.repair, request.samples)
            c = response.result.counts
            log.info("verify %s of %s: %d compared, %d missing, %d extra, %d different, %d in flight",
                     request.id, workflow, c.compared, c.missing, c.extra, c.different, c.in_flight)
            data = outcome_data(request.id, response=response)
        except SyncplaneError as exc:
            log.warning("verify %s of %s could not run: %s: %s", request.id, workflow, exc.reason, exc)
            data = outcome_data(request.id, error=exc)
        except Exception as exc:  # an unexpected failure: its type only (a message might carry data)
            log.exception("verify %s of %s failed", request.id, workflow)
            data = outcome_data(request.id, error=SyncplaneError(f"the verify Job failed: {type(exc).__name__}"))
        await write_outcome(checkpoints, workflow, data)
        return 0
    except Exception:
        log.exception("verify %s of %s: the outcome could not be written", request.id, workflow)
        return 1
    finally:
        await checkpoints.close()
        await records.close()


class KubernetesVerifyRunner:
    """The server's side: records the request on the Workflow, waits for the Job's outcome."""

    def __init__(self, store: Any, max_wait: float = MAX_WAIT) -> None:
        """``store``: the server's store.kubernetes.KubernetesStore (its client and namespace)."""
        from kubernetes_asyncio import client

        self.store, self.namespace, self.max_wait = store, store.namespace, max_wait
        self.core = client.CoreV1Api(store.api_client)

    async def run(self, call: Any) -> svc.VerifyWorkflowResponse:
        """Raises FailedPrecondition or Unavailable with the Job's reason; Unavailable (VERIFY_TIMEOUT)
        when no outcome came before the caller's deadline (less DEADLINE_MARGIN) or ``max_wait``."""
        request = VerifyRequest.new(call.samples, call.repair)
        wait = self.max_wait if call.timeout is None else min(self.max_wait, call.timeout - DEADLINE_MARGIN)
        if wait <= 0:
            raise Unavailable(f"no time left to verify workflow {call.workflow_id} before the call's deadline",
                              "VERIFY_TIMEOUT")
        name = call.workflow.name
        await self.store.set_annotation(name, REQUEST_ANNOTATION, request.annotation())
        try:
            outcome = await asyncio.wait_for(self._outcome(call.workflow_id, request.id), wait)
        except TimeoutError:
            raise Unavailable(f"the verify Job of workflow {call.workflow_id} (request {request.id}) wrote no "
                              f"result within {wait:.0f}s: see `kubectl describe job "
                              f"{job_name(call.workflow_id, request.id)}` and the Workflow's Events",
                              "VERIFY_TIMEOUT") from None
        finally:
            # answered or abandoned: the operator starts no Job for it any more (a newer request stays)
            await asyncio.shield(self.store.set_annotation(name, REQUEST_ANNOTATION, None,
                                                           only_if=request.annotation()))
        outcome.raise_error(call.phase)
        assert outcome.response is not None
        return outcome.response

    async def _outcome(self, workflow: str, request_id: str) -> Outcome:
        """Watch ``<workflow>-verify`` (from a list, so no write between is missed) until it holds
        ``request_id``'s outcome."""
        from kubernetes_asyncio import watch

        selector = f"metadata.name={result_configmap_name(workflow)}"
        while True:
            listing = await self.core.list_namespaced_config_map(self.namespace, field_selector=selector)
            for cm in listing.items:
                if (found := parse_outcome(cm.data, request_id)) is not None:
                    return found
            async with watch.Watch() as w:
                async for event in w.stream(self.core.list_namespaced_config_map, self.namespace,
                                            field_selector=selector,
                                            resource_version=listing.metadata.resource_version,
                                            timeout_seconds=60):
                    obj = event["object"]
                    data = obj.get("data") if isinstance(obj, dict) else getattr(obj, "data", None)
                    if (found := parse_outcome(data, request_id)) is not None:
                        return found
