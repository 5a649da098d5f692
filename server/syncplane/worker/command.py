"""`syncplane worker`: the command every worker process runs (a local worker of `syncplane up`, a pod's
container). It lives apart from the rest of the command line (:mod:`syncplane.cli`, which registers it
too) so that :mod:`syncplane.entry` can run it without importing that module's gRPC client, service
stubs and YAML, none of which a worker uses: each worker start paid their import (measured in
benchmarks/start_timeline.py)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click


@click.command(hidden=True)
@click.option("--workflow", required=True)
@click.option("--index", type=int, default=0)
@click.option("--generation", type=int, required=True)
@click.option("--spec-file", type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--state-dir", type=click.Path(path_type=Path), default=None)
@click.option("--orphan-timeout", type=float, default=0.0)
@click.option("--platform", type=click.Choice(["embedded", "kubernetes"]), default="embedded", show_default=True,
              help="Where secrets, state and heartbeat are (syncplane.worker.platform): embedded: secret files, "
                   "the state SQLite file, polled on /status; kubernetes: mounted Secrets, ConfigMaps, a Lease.")
@click.option("--namespace", envvar="POD_NAMESPACE", default="")
@click.option("--pod-name", envvar="POD_NAME", default="")
@click.option("--workflow-uid", default="", help="Kubernetes: the Workflow's uid, owner of what the worker creates.")
@click.option("--listen", default="127.0.0.1:0", help="Address of /status, /healthz and /metrics.")
@click.option("--secrets-dir", type=click.Path(path_type=Path), default=None,
              help="Embedded: a <name>.json file per secret reference.")
@click.option("--state-db", type=click.Path(path_type=Path), default=None,
              help="SQLite file for checkpoints and dead letters (default: in --state-dir).")
@click.option("--drain-timeout", type=float, default=20.0, show_default=True,
              help="Seconds the batch in flight may take after SIGTERM before it is abandoned.")
@click.option("--memory-limit", type=int, default=None,
              help="Bytes: this process's data segment limit (RLIMIT_DATA), set before anything else.")
@click.option("--log-file", type=click.Path(path_type=Path), default=None,
              help="Log here, rotated (LOG_MAX_BYTES each, LOG_BACKUPS kept), instead of to stderr.")
def worker(workflow: str, index: int, generation: int, spec_file: Path, state_dir: Path | None,
           orphan_timeout: float, platform: str, namespace: str, pod_name: str, workflow_uid: str, listen: str,
           secrets_dir: Path | None, state_db: Path | None, drain_timeout: float, memory_limit: int | None,
           log_file: Path | None) -> None:
    """Run one worker replica (started by the supervisor or a Deployment)."""
    if memory_limit is not None:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, memory_limit))
    from syncplane.worker.main import WorkerOptions, run

    host, _, port = listen.rpartition(":")
    sys.exit(run(WorkerOptions(workflow=workflow, index=index, generation=generation, spec_file=spec_file,
                               state_dir=state_dir or Path(tempfile.gettempdir()), orphan_timeout=orphan_timeout,
                               platform=platform, namespace=namespace, pod_name=pod_name,
                               workflow_uid=workflow_uid, host=host,
                               port=int(port), secrets_dir=secrets_dir, state_db=state_db,
                               drain_timeout=drain_timeout), log_file=log_file))
