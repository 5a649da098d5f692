"""The lifecycle core: phases, user transitions, drift and the reconcile
decision. Pure code with no I/O, shared by the embedded supervisor and the
Kubernetes operator."""

from syncplane.lifecycle.drift import applied_view, changed_fields, spec_hash
from syncplane.lifecycle.reconcile import (
    DEFAULT_POLICY,
    Observed,
    Outcome,
    Policy,
    Trouble,
    WorkerFailure,
    reconcile,
    restartable,
)
from syncplane.lifecycle.transitions import (
    check_preconditions,
    check_replay,
    effective_phase,
    request_restart,
    request_start,
    request_stop,
)

__all__ = [
    "DEFAULT_POLICY",
    "Observed",
    "Outcome",
    "Policy",
    "Trouble",
    "WorkerFailure",
    "applied_view",
    "changed_fields",
    "check_preconditions",
    "check_replay",
    "effective_phase",
    "reconcile",
    "request_restart",
    "request_start",
    "request_stop",
    "restartable",
    "spec_hash",
]
