"""When a Workflow's daemon may wait for watch events alone (wakers.at_rest), and when the resync or a
due automatic restart must wake it (wakers.next_wake): pure tables, no cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from syncplane_operator.wakers import at_rest, next_wake

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SOON = (NOW + timedelta(seconds=5)).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(("body", "expected"), [
    ({"spec": {"desiredState": "STOPPED"}, "status": {"phase": "STOPPED"}}, True),
    ({"spec": {}, "status": {"phase": "STOPPED"}}, True),                      # STOPPED when not given
    ({"spec": {"desiredState": "STOPPED"}, "status": {}}, False),              # never reconciled: no phase yet
    ({"spec": {"desiredState": "RUNNING"}, "status": {"phase": "STOPPED"}}, False),   # a start to act on
    ({"spec": {"desiredState": "STOPPED"}, "status": {"phase": "STOPPING"}}, False),  # workers draining
    ({"spec": {"desiredState": "RUNNING"}, "status": {"phase": "RUNNING"}}, False),   # heartbeats can go stale
    ({"spec": {"desiredState": "RUNNING"}, "status": {"phase": "ERROR"}}, False),
    ({"spec": {"desiredState": "STOPPED"}, "status": {"phase": "STOPPED", "autoRestart": {"nextRestartTime": SOON}}},
     False),
    ({"spec": None, "status": None}, False),
    # being deleted: its workers' drain is what releases it (the resync, should a pod's event be missed)
    ({"metadata": {"deletionTimestamp": "2026-11-29T12:00:00Z"}, "spec": {"desiredState": "STOPPED"},
      "status": {"phase": "STOPPED"}}, False),
])
def test_only_a_stopped_workflow_with_nothing_due_waits_for_events_alone(body: dict[str, Any], expected: bool):
    assert at_rest(body) is expected


@pytest.mark.parametrize(("status", "expected"), [
    ({}, 60.0),
    ({"phase": "RUNNING"}, 60.0),
    ({"autoRestart": {"nextRestartTime": SOON}}, 5.1),                  # a due restart comes before the resync
    ({"autoRestart": {"nextRestartTime": "2026-11-29T11:00:00Z"}}, 0.1),   # overdue: at once
    ({"autoRestart": {"nextRestartTime": "not a time"}}, 60.0),
])
def test_the_resync_or_a_due_restart_wakes_the_daemon(status: dict[str, Any], expected: float):
    assert next_wake(status, 60.0, now=NOW) == pytest.approx(expected)
