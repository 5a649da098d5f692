"""The engine picks its runner from one table (engine.RUNNERS), every workflow type a plain import:
none is loaded behind `importlib` (which hid a package cycle), none is missing."""

from __future__ import annotations

import ast
from pathlib import Path

from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.worker import engine


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
