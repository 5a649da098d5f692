"""Valid specs for tests, built from the shipped default workflows."""

from __future__ import annotations

from pathlib import Path

import yaml

from syncplane.api.v1 import workflow_pb2 as pb
from syncplane.model.convert import from_resource
from syncplane.validation import apply_defaults

DEFAULTS = Path(__file__).resolve().parent.parent / "server" / "syncplane" / "defaults"
_FILES = {"ingress": "10-contacts-ingress.yaml", "egress": "20-email-events-egress.yaml",
          "opt_in_out": "30-opt-in-out.yaml"}


def spec(kind: str = "ingress") -> pb.WorkflowSpec:
    _, wf = from_resource(yaml.safe_load((DEFAULTS / _FILES[kind]).read_text()))
    apply_defaults(wf.spec)
    return wf.spec


def workflow(kind: str = "ingress", name: str = "wf") -> pb.Workflow:
    wf = pb.Workflow(name=f"workflows/{name}", generation=1, etag="1")
    wf.spec.CopyFrom(spec(kind))
    wf.status.phase = pb.PHASE_STOPPED
    return wf
