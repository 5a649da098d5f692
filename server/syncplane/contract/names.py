"""Names, labels and annotations the operator, workers, API server and chart agree on.

Pure constants and name functions. The chart's templates (notably its
ValidatingAdmissionPolicy) spell the same labels and name prefixes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

PREFIX = "syncplane.io"

# -- labels -----------------------------------------------------------------------------------
#: On every object of a workflow's (worker pods, Leases, ConfigMaps): the workflow's name.
WORKFLOW_LABEL = f"{PREFIX}/workflow"
#: On dead-letter, held-record and repair ConfigMaps (shards): ``dead-letter``, ``held`` or ``repair``.
RECORD_LABEL = f"{PREFIX}/record"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = {MANAGED_BY_LABEL: "syncplane-operator", "app.kubernetes.io/part-of": "syncplane"}
COMPONENT_WORKER = {COMPONENT_LABEL: "worker"}
#: A verify Job and its pod (syncplane.verify.kube): the workflow's label, but not a worker.
COMPONENT_VERIFY = {COMPONENT_LABEL: "verify"}

#: On a Workflow whose workers the operator ever created: removed by the operator once they drained
#: after the Workflow's deletion (syncplane_operator.reconciler.finalize). A Workflow never started has none.
FINALIZER = f"{PREFIX}/finalizer"

# -- annotations ------------------------------------------------------------------------------
SPEC_HASH_ANNOTATION = f"{PREFIX}/spec-hash"
GENERATION_ANNOTATION = f"{PREFIX}/applied-generation"
#: On worker Deployments: a digest of the workers' identity (the operator's builders.identity_hash).
IDENTITY_ANNOTATION = f"{PREFIX}/worker-identity"
#: On heartbeat Leases: the worker's JSON report (:class:`syncplane.contract.report.WorkerReport`).
REPORT_ANNOTATION = f"{PREFIX}/report"
#: On a Workflow: the request_id of the last create/update made through the API server (idempotency).
REQUEST_ID_ANNOTATION = f"{PREFIX}/request-id"
#: On a Workflow: VerifyWorkflow's last summary, JSON of a VerifyResult (see store.kubernetes).
LAST_VERIFY_ANNOTATION = f"verify.{PREFIX}/last-result"
#: On a Workflow: a VerifyWorkflow waiting for its Job, JSON {id, samples, repair} (syncplane.verify.kube).
VERIFY_REQUEST_ANNOTATION = f"verify.{PREFIX}/request"
#: On a verify Job: the id of the request it runs.
VERIFY_REQUEST_ID_ANNOTATION = f"{PREFIX}/verify-request"

# -- ConfigMaps, mounts, ports ----------------------------------------------------------------
#: The data key of a `<workflow>-spec-<hash>` ConfigMap: the applied spec as JSON.
SPEC_KEY = "spec.json"
#: Where the worker pod mounts its spec ConfigMap.
SPEC_MOUNT = "/etc/syncplane"
# The referenced Secrets, mounted by the kubelet: a directory per Secret, a file per key (the worker's
# ServiceAccount has no access to Secrets at all).
SECRETS_MOUNT = "/etc/syncplane-secrets"
HEALTH_PORT = 8080
CHECKPOINTS_SUFFIX = "-checkpoints"

# -- exit codes -------------------------------------------------------------------------------
#: A worker that hit what retrying cannot help (EX_CONFIG): not a crash, the workflow goes to ERROR
#: with the reason in its report or, on Kubernetes, in the container's termination message.
EXIT_FATAL = 78


def spec_configmap_name(workflow: str, spec_hash: str, generation: int | None = None) -> str:
    """The ConfigMap holding the spec of the run that ``generation`` applied at ``spec_hash``:
    ``<workflow>-spec-<first 10 hex>-<generation>``. One per run, not per spec: it also carries the trace
    context of the Start or Restart that applied it. Without a generation: the name an operator before
    per-run snapshots gave (``<workflow>-spec-<first 10 hex>``), still read for the runs it started."""
    return f"{workflow}-spec-{spec_hash[:10]}" + ("" if generation is None else f"-{generation}")


#: Spec snapshots kept per workflow besides those in use: the newest, by the generation that applied them.
#: Both platforms: the operator's `<workflow>-spec-<hash>-<generation>` ConfigMaps and the embedded
#: supervisor's `<workflow>.g<generation>.json` spec files (:func:`stale_snapshots`).
KEEP_SPEC_SNAPSHOTS = 3
_SNAPSHOT_SUFFIX = re.compile(r"[0-9a-f]{10}(-[0-9]+)?")
Snapshot = TypeVar("Snapshot", str, int)


def stale_snapshots(snapshots: Mapping[Snapshot, int], in_use: Iterable[Snapshot],
                    keep: int = KEEP_SPEC_SNAPSHOTS) -> list[Snapshot]:
    """Pure, the keep rule of spec snapshots on both platforms: of ``snapshots`` (a snapshot, by name or
    generation → the generation that applied it), those to delete, sorted: all but those ``in_use`` and the
    ``keep`` newest (by generation, then by name). A snapshot is written per run, so they would otherwise
    pile up; ``in_use`` entries that are not in ``snapshots`` change nothing."""
    newest = sorted(snapshots, key=lambda s: (snapshots[s], s))[-keep:] if keep > 0 else []
    kept = set(in_use) | set(newest)
    return sorted(s for s in snapshots if s not in kept)


def stale_spec_snapshots(workflow: str, snapshots: Mapping[str, int], in_use: Iterable[str],
                         keep: int = KEEP_SPEC_SNAPSHOTS) -> list[str]:
    """Pure: the spec snapshot ConfigMaps of ``workflow`` to delete, sorted. ``snapshots``: ConfigMap name →
    the generation that applied it (0 when unknown: the per-spec name of an earlier operator). The rule of
    :func:`stale_snapshots` over ``workflow``'s own snapshots: a name that is not one of them
    (``spec_configmap_name``) is never returned."""
    prefix = f"{workflow}-spec-"
    own = {n: g for n, g in snapshots.items()
           if n.startswith(prefix) and _SNAPSHOT_SUFFIX.fullmatch(n[len(prefix):])}
    return stale_snapshots(own, in_use, keep)


def spec_configmap_names(workflow: str, spec_hash: str, generation: int) -> tuple[str, str]:
    """Where the applied spec of the run that ``generation`` started may be, in the order to try: its
    per-run name, then the per-spec name of an earlier operator."""
    return spec_configmap_name(workflow, spec_hash, generation), spec_configmap_name(workflow, spec_hash)


def checkpoint_configmap_name(workflow: str) -> str:
    """The ConfigMap holding a workflow's cursors: ``<workflow>-checkpoints``."""
    return f"{workflow}{CHECKPOINTS_SUFFIX}"


def checkpoint_labels(workflow: str) -> dict[str, str]:
    """The labels of a checkpoints ConfigMap, whoever creates it (operator or worker)."""
    return {MANAGED_BY_LABEL: "syncplane", COMPONENT_LABEL: "checkpoints", WORKFLOW_LABEL: workflow}


def worker_deployment_name(workflow: str) -> str:
    """The Deployment running a workflow's workers: ``<workflow>-worker``."""
    return f"{workflow}-worker"


# Each Workflow's workers run as a ServiceAccount of their own, `syncplane-worker-<workflow>`, which the
# operator creates and binds to the chart's worker Role. The fixed prefix is what the chart's
# ValidatingAdmissionPolicy reads the workflow from (templates/validatingadmissionpolicy.yaml): such an
# account may write only Leases and ConfigMaps labelled with, and named after, its own workflow.
WORKER_ACCOUNT_PREFIX = "syncplane-worker-"


def worker_service_account_name(workflow: str) -> str:
    """The ServiceAccount a workflow's workers run as: ``syncplane-worker-<workflow>``."""
    return f"{WORKER_ACCOUNT_PREFIX}{workflow}"


def worker_labels(workflow: str) -> dict[str, str]:
    """The labels of a workflow's worker pods, and of their heartbeat Leases."""
    return {**MANAGED_BY, **COMPONENT_WORKER, WORKFLOW_LABEL: workflow}


def state_file(state_dir: Path, workflow: str, index: int) -> Path:
    """Embedded: the file in which worker ``index`` of ``workflow`` announces its pid and /status
    port to the supervisor (JSON ``{workflow, index, generation, pid, port}``), removed when it stops."""
    return state_dir / f"{workflow}.{index}.worker.json"
# -- dead letters, held records, repairs: fixed shards, every name derivable from the workflow's ----------
DEAD_LETTER, HELD, REPAIR = "dead-letter", "held", "repair"
RECORD_KINDS = (DEAD_LETTER, HELD, REPAIR)
_RECORD_PREFIX = {DEAD_LETTER: "dl", HELD: "held", REPAIR: "repair"}
#: Shards per kind and workflow: `<workflow>-dl-<0..f>`, `<workflow>-held-<0..f>`, `<workflow>-repair-<0..f>`.
RECORD_SHARDS = 16
#: A record's retry mark is the data key ``<record id>.retry`` = ``"true"`` beside the record.
RETRY_SUFFIX = ".retry"
VERIFY_SUFFIX = "-verify"


def record_id(stream: str, key: str) -> str:
    """A record's data key in its shard: the first 16 hex digits of SHA-256 over ``stream NUL key``."""
    return hashlib.sha256(f"{stream}\0{key}".encode()).hexdigest()[:16]


def record_shard_name(workflow: str, kind: str, shard: int) -> str:
    """Shard ``shard`` (0..RECORD_SHARDS-1) of a workflow's ``kind`` (DEAD_LETTER, HELD or REPAIR) records."""
    return f"{workflow}-{_RECORD_PREFIX[kind]}-{shard:x}"


def record_shard(workflow: str, kind: str, stream: str, key: str) -> tuple[str, str]:
    """(ConfigMap name, data key) of a record: the shard of the id's first hex digit."""
    rid = record_id(stream, key)
    return record_shard_name(workflow, kind, int(rid[0], 16)), rid


def verify_configmap_name(workflow: str) -> str:
    """The ConfigMap a verify Job writes its outcome to: ``<workflow>-verify`` (syncplane.verify.kube)."""
    return f"{workflow}{VERIFY_SUFFIX}"


def worker_configmap_names(workflow: str) -> list[str]:
    """Every ConfigMap a workflow's worker identity (its workers and its verify Jobs) reads or patches: its
    checkpoints, its verify result and each shard of its dead letters, held records and repairs. The
    operator's per-Workflow worker Role grants exactly these, by name; the chart's admission policy lets
    that identity create exactly these names."""
    return [checkpoint_configmap_name(workflow), verify_configmap_name(workflow)] + [
        record_shard_name(workflow, kind, i) for kind in RECORD_KINDS for i in range(RECORD_SHARDS)]
