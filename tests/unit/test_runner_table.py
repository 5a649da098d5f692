"""The engine picks its runner from one table (engine.RUNNERS), every workflow type a plain import:
none is loaded behind `importlib` (which hid a package cycle), none is missing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from syncplane.contract.report import WorkerReport
from syncplane.credentials import ConnectionSecret
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.state.factory import embedded_stores
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.worker import engine
from tests import factories


def test_every_workflow_type_has_a_runner() -> None:
    types = {v.number for v in pb.WorkflowType.DESCRIPTOR.values if v.number != pb.WORKFLOW_TYPE_UNSPECIFIED}
    assert set(engine.RUNNERS) == types
    # Ingress splits its tables over the workers; an event feed and the contact table have one reader.
    assert {t: every for t, (_, every) in engine.RUNNERS.items()} == {
        pb.WORKFLOW_TYPE_INGRESS: True, pb.WORKFLOW_TYPE_EGRESS: False, pb.WORKFLOW_TYPE_OPT_IN_OUT: False}


def test_no_runner_is_imported_at_run_time() -> None:
    source = Path(engine.__file__).read_text()
    imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not [n for n in imports if n.col_offset > 0], "imports inside functions hide the layering"
    assert "importlib" not in source


# Who runs a single-reader type (egress, opt-in/out) with its workers: embedded workers have an
# index (worker 0 runs it, the others stand by); Kubernetes pods have none (every pod is worker 0),
# so each runs it only while holding the claim (ClaimedRunner), once there is more than one.
# (kind, workers, index, holder) -> "runs" | "claims" | "stands by"
PLACEMENT = [
    (kind, workers, index, holder, want)
    for kind in ("egress", "opt_in_out")
    for workers, index, holder, want in [
        (1, 0, "", "runs"), (2, 0, "", "runs"), (2, 1, "", "stands by"),             # embedded
        (1, 0, "pod-a", "runs"), (2, 0, "pod-a", "claims"), (3, 0, "pod-b", "claims"),  # Kubernetes
    ]
]


@pytest.mark.parametrize(("kind", "workers", "index", "holder", "want"), PLACEMENT)
async def test_a_single_reader_type_runs_on_one_worker_on_both_platforms(tmp_path: Path, kind: str, workers: int,
                                                                          index: int, holder: str, want: str) -> None:
    spec = factories.spec(kind)
    spec.workers = workers
    secrets = {name: ConnectionSecret.parse(name, name, data) for name, data in factories.UNREACHABLE_SECRETS.items()}
    db = SqliteWorkerState(tmp_path / "state.db")
    e = engine.Engine("wf", spec, secrets, embedded_stores(db), WorkerReport(workflow="wf", index=index, generation=1),
                      index=index, holder=holder)
    runner = e._runner()
    try:
        got = "stands by" if runner is None else "claims" if isinstance(runner, engine.ClaimedRunner) else "runs"
        assert got == want
    finally:
        if runner is not None:
            await runner.aclose()
        await db.aclose()
