"""The embedded store's bounds: what would otherwise grow without limit while it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.errors import Unavailable
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.store.sqlite import WATCH_QUEUE, SqliteStore
from tests.factories import workflow
from tests.sqlite_lock import waits_for_the_lock_without_stalling


async def test_a_slow_watcher_is_dropped_with_a_revision_to_resume_from(tmp_path: Path) -> None:
    """A watcher that stops reading while changes keep coming holds at most WATCH_QUEUE of them;
    past that it ends with WATCH_FELL_BEHIND and a revision; watching again from it yields every
    later change, none lost, none repeated."""
    store = SqliteStore(tmp_path / "syncplane.db")
    try:
        names = [f"wf-{i}" for i in range(WATCH_QUEUE + 50)]
        await store.create(workflow(name="wf-zero"))
        since = store.revision()
        first = await store.create(workflow(name="wf-first"))
        slow = store.watch(start_revision=since)
        got = [(await anext(slow)).workflow.name]        # subscribed, then stops reading
        names = [(await store.create(workflow(name=name))).name for name in names]
        with pytest.raises(Unavailable) as exc:
            async for change in slow:
                got.append(change.workflow.name)
        assert exc.value.reason == "WATCH_FELL_BEHIND"
        assert len(got) <= WATCH_QUEUE + 1
        resume = int(exc.value.metadata["resume_revision"])
        async for change in store.watch(start_revision=resume):
            got.append(change.workflow.name)
            if change.workflow.name == names[-1]:
                break
        assert got == [first.name, *names]
    finally:
        store.close()


async def test_request_ids_are_remembered_for_the_retention_then_pruned(tmp_path: Path) -> None:
    """Within the retention a retried create gets the first workflow back; past it the request_id
    is forgotten (pruned by the next create carrying one), so the table does not grow forever."""
    from syncplane.errors import AlreadyExists

    kept = SqliteStore(tmp_path / "kept.db")
    try:
        first = await kept.create(workflow(name="wf-a"), request_id="r-1")
        assert (await kept.create(workflow(name="wf-a"), request_id="r-1")).uid == first.uid
    finally:
        kept.close()
    pruned = SqliteStore(tmp_path / "pruned.db", request_retention=-1.0)  # everything is already too old
    try:
        await pruned.create(workflow(name="wf-a"), request_id="r-1")
        await pruned.create(workflow(name="wf-b"), request_id="r-2")
        assert pruned._db.execute("SELECT request_id FROM requests").fetchall() == [("r-2",)]
        with pytest.raises(AlreadyExists):
            await pruned.create(workflow(name="wf-a"), request_id="r-1")
    finally:
        pruned.close()


def test_spec_files_keep_those_in_use_and_the_newest_few(tmp_path: Path) -> None:
    """Embedded, the supervisor writes one spec file per generation: only the generations in use
    and the newest KEEP_SPEC_SNAPSHOTS stay; another workflow's files (even one whose name starts the
    same) are untouched."""
    from syncplane.contract.names import KEEP_SPEC_SNAPSHOTS
    from syncplane.runtime.processes import prune_spec_files, spec_file

    for g in range(1, 11):
        spec_file(tmp_path, "wf", g).write_text("{}")
        spec_file(tmp_path, "wf.g1", g).write_text("{}")
    gone = prune_spec_files(tmp_path, "wf", in_use={2, 10})
    left = sorted(p.name for p in tmp_path.glob("wf.g*.json") if not p.name.startswith("wf.g1.g"))
    newest = [f"wf.g{g}.json" for g in range(11 - KEEP_SPEC_SNAPSHOTS, 11)]
    assert left == sorted({"wf.g2.json", *newest})
    assert len(gone) == 10 - len(left)
    assert len(list(tmp_path.glob("wf.g1.g*.json"))) == 10


def test_spec_snapshots_keep_those_in_use_and_the_newest_few() -> None:
    """On Kubernetes, the operator makes one spec snapshot ConfigMap per run: the same rule as the
    embedded spec files (KEEP_SPEC_SNAPSHOTS newest, by generation, and those in use, here the applied
    run's and an earlier operator's per-spec one), and nothing that is not this workflow's snapshot:
    another workflow's (one whose name starts the same, too), checkpoints, dead letters."""
    from syncplane.contract.names import (
        KEEP_SPEC_SNAPSHOTS,
        checkpoint_configmap_name,
        spec_configmap_name,
        stale_spec_snapshots,
    )

    runs = {spec_configmap_name("wf", f"{g:x}" * 10, g): g for g in range(1, 11)}
    per_spec = spec_configmap_name("wf", "ab" * 20)
    others = {spec_configmap_name("wf-spec", "cd" * 20, 3): 3, spec_configmap_name("other", "cd" * 20, 1): 1,
              checkpoint_configmap_name("wf"): 0, "wf-dl-0123456789abcdef": 0, "wf-spec-notahash": 0}
    applied = spec_configmap_name("wf", "2" * 10, 2)
    gone = stale_spec_snapshots("wf", {**runs, per_spec: 0, **others}, in_use=[applied])
    newest = sorted(runs, key=runs.__getitem__)[-KEEP_SPEC_SNAPSHOTS:]
    assert gone == sorted({*runs, per_spec} - {applied, *newest})
    assert stale_spec_snapshots("wf", {**runs, per_spec: 0}, in_use=[per_spec, applied]) == sorted(
        set(runs) - {applied, *newest})
    assert stale_spec_snapshots("wf", others, in_use=[]) == []


@settings(max_examples=300, deadline=None)
@given(generations=st.dictionaries(st.integers(0, 40), st.integers(0, 20), max_size=15),
       in_use=st.sets(st.integers(0, 50), max_size=5), keep=st.integers(-1, 6))
def test_the_snapshot_keep_rule_deletes_all_but_those_in_use_and_the_newest(
        generations: dict[int, int], in_use: set[int], keep: int) -> None:
    """The one keep rule both platforms prune by (contract.names.stale_snapshots): what it deletes is
    exactly what is neither in use nor among the ``keep`` newest by generation (ties by name), sorted;
    it never names a snapshot it was not given."""
    from syncplane.contract.names import stale_snapshots

    gone = stale_snapshots(generations, in_use, keep)
    def newer(s: int) -> int:  # how many snapshots are newer than s
        return sum((generations[o], o) > (generations[s], s) for o in generations)

    assert gone == sorted(s for s in generations if s not in in_use and newer(s) >= keep)
    assert len(generations) - len(gone) >= min(len(generations), max(keep, 0))


# Every write of the API server's store (the embedded control plane's syncplane.db): none may hold
# up the event loop the API, the console and the supervisor share while another connection has the
# write lock. (Reads never wait for a writer in WAL mode.)
STORE_WRITES = [
    ("create a workflow", lambda s: s.create(workflow(name="wf-new"), "request-1")),
    ("update a workflow", lambda s: s.update("workflows/wf", lambda wf: _labelled(wf))),
    ("delete a workflow", lambda s: s.delete("workflows/wf", lambda wf: None)),
    ("write a status", lambda s: s.set_status("workflows/wf", pb.WorkflowStatus(phase=pb.PHASE_RUNNING))),
    ("record a verify", lambda s: s.set_last_verify("workflows/wf", pb.VerifyResult(repair_requested=True))),
]


def _labelled(wf: pb.Workflow) -> pb.Workflow:
    wf.labels["team"] = "crm"
    return wf


@pytest.mark.parametrize(("what", "call"), STORE_WRITES, ids=[w for w, _ in STORE_WRITES])
async def test_a_held_write_lock_never_stalls_the_servers_loop(tmp_path: Path, what: str, call: Any) -> None:
    """Another connection holds syncplane.db's write lock: the store's write waits for it while
    an endpoint on the same loop answers within the supervisor's poll timeout; then it completes
    and its change reaches a watcher."""
    path = tmp_path / "syncplane.db"
    store = SqliteStore(path)
    try:
        await store.create(workflow(name="wf"))
        since = store.revision()
        await waits_for_the_lock_without_stalling(path, lambda: call(store), what)
        change = await anext(store.watch(start_revision=since))
        assert change.revision == since + 1
    finally:
        store.close()
