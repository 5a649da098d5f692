"""The pure parts of checkpoints on Kubernetes: the ConfigMap the operator builds, and
how stream names become ConfigMap keys."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncplane.state.kube_checkpoints import ConfigMapCheckpoints, stream_key, stream_name, workflow_owner
from syncplane.state.sqlite import SqliteWorkerState
from syncplane.state.stores import AsyncCheckpointStore
from syncplane_operator.builders import build_checkpoint_configmap

CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def test_checkpoint_configmap_is_empty_and_labelled():
    cm = build_checkpoint_configmap("orders", "ns")
    assert cm["metadata"]["name"] == "orders-checkpoints" and cm["metadata"]["namespace"] == "ns"
    assert cm["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "syncplane",
                                        "app.kubernetes.io/component": "checkpoints",
                                        "syncplane.io/workflow": "orders"}
    assert cm["data"] == {} and "immutable" not in cm


def test_stream_keys():
    assert stream_key("contact") == "contact"
    assert stream_key("new_loyaltycard") == "new_loyaltycard"
    assert stream_key("optinout:crm") == "optinout.3acrm"
    assert stream_key("a.b") == "a.2eb"          # '.' is the escape, so it is escaped itself
    with pytest.raises(ValueError):
        stream_key("")
    with pytest.raises(ValueError):
        stream_key("x" * 254)


@given(st.text(min_size=1, max_size=21))   # 21 four-byte characters escape to 252
def test_stream_keys_are_valid_and_reversible(stream: str):
    key = stream_key(stream)
    assert CONFIGMAP_KEY.match(key) and key not in (".", "..")
    assert stream_name(key) == stream


def test_both_stores_satisfy_the_async_protocol(tmp_path):
    sqlite = SqliteWorkerState(tmp_path / "state.db")
    try:   # mypy checks the structural match; this checks the methods are really there
        stores: list[AsyncCheckpointStore] = [sqlite, ConfigMapCheckpoints("ns")]
        assert all(callable(s.aload) and callable(s.acommit) for s in stores)
    finally:
        sqlite.close()


async def test_sqlite_async_calls_are_the_sync_ones(tmp_path):
    state = SqliteWorkerState(tmp_path / "state.db")
    try:
        assert await state.aload("wf", "contact") is None
        await state.acommit("wf", "contact", "c1")
        assert state.load("wf", "contact") == "c1" and await state.aload("wf", "contact") == "c1"
    finally:
        state.close()


def test_a_configmap_the_worker_creates_is_owned_by_the_workflow_when_its_uid_is_known():
    assert workflow_owner("wf", "") == {}
    assert workflow_owner("wf", "u-1") == {"ownerReferences": [
        {"apiVersion": "syncplane.io/v1", "kind": "Workflow", "name": "wf", "uid": "u-1"}]}
