"""Issue 18 item 5: the API's read caches (SqliteStore's parsed rows, the service's
last page per query) never answer what the database no longer holds. Random sequences of creates,
spec and status writes and deletes, each followed by Gets and Lists (filters, page sizes, every
page), are answered exactly as a fresh store on the same file, which has no cache, answers them."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncplane.errors import AlreadyExists, NotFound
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.service import WorkflowService
from syncplane.store.sqlite import SqliteStore
from tests.factories import workflow

KINDS = ("ingress", "egress")
PHASES = (pb.PHASE_STOPPED, pb.PHASE_RUNNING, pb.PHASE_ERROR)
TYPES = (pb.WORKFLOW_TYPE_INGRESS, pb.WORKFLOW_TYPE_EGRESS)
ids = st.integers(0, 5)
ops = st.one_of(
    st.tuples(st.just("create"), ids, st.sampled_from(KINDS)),
    st.tuples(st.just("label"), ids, st.text("abc", min_size=1, max_size=3)),
    st.tuples(st.just("status"), ids, st.sampled_from(PHASES)),
    st.tuples(st.just("delete"), ids),
    st.tuples(st.just("read"), st.lists(st.sampled_from(TYPES), max_size=2),
              st.lists(st.sampled_from(PHASES), max_size=2), st.integers(1, 4)),
)


async def _pages(service: WorkflowService, req: svc.ListWorkflowsRequest) -> list[list[bytes]]:
    pages, token = [], ""
    while True:
        page = svc.ListWorkflowsRequest()
        page.CopyFrom(req)
        page.page_token = token
        resp = await service.list(page)
        pages.append([wf.SerializeToString() for wf in resp.workflows])
        token = resp.next_page_token
        if not token:
            return pages


async def _get(service: WorkflowService, name: str) -> bytes | None:
    try:
        return (await service.get(name)).SerializeToString()
    except NotFound:
        return None


async def _run(path: Path, steps: list[tuple]) -> None:
    store = SqliteStore(path)
    service = WorkflowService(store, settle_timeout=0)
    try:
        for step in steps:
            name = f"workflows/wf-{step[1]}" if step[0] != "read" else ""
            try:
                if step[0] == "create":
                    await store.create(workflow(step[2], name=f"wf-{step[1]}"))
                elif step[0] == "label":
                    def label(wf: pb.Workflow, value: str = step[2]) -> pb.Workflow:
                        wf.labels["team"] = value
                        return wf
                    await store.update(name, label)
                elif step[0] == "status":
                    await store.set_status(name, pb.WorkflowStatus(phase=step[2]))
                elif step[0] == "delete":
                    await store.delete(name, lambda wf: None)
            except (NotFound, AlreadyExists):  # a name that is not (or already) there
                pass
            # Read through the caches, then from a fresh store on the same file (no cache).
            fresh = SqliteStore(path)
            try:
                truth = WorkflowService(fresh, settle_timeout=0)
                reqs = [svc.ListWorkflowsRequest(page_size=2)]
                if step[0] == "read":
                    reqs.append(svc.ListWorkflowsRequest(types=step[1], phases=step[2], page_size=step[3]))
                for req in reqs:
                    for _ in range(2):  # the second answer comes from the caches
                        assert await _pages(service, req) == await _pages(truth, req)
                for i in range(6):
                    assert await _get(service, f"workflows/wf-{i}") == await _get(truth, f"workflows/wf-{i}")
            finally:
                fresh.close()
    finally:
        store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ops, min_size=1, max_size=25))
def test_cached_reads_answer_what_the_database_holds(steps: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(Path(tmp) / "syncplane.db", steps))
