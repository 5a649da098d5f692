"""Dead letters, the pure parts: request validation with field paths, opaque page tokens,
pagination over a store, the count summed from worker reports, kept in status while stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

from syncplane.errors import FailedPrecondition, InvalidArgument, NotFound
from syncplane.lifecycle import Observed, reconcile
from syncplane.lifecycle.reports import totals
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.proto.v1 import workflow_service_pb2 as svc
from syncplane.service.dead_letters import (
    MAX_KEYS,
    DeadLetterService,
    decode_token,
    encode_token,
    page_size,
    to_proto,
    validate_keys,
)
from syncplane.state.records import DeadLetter
from tests.factories import workflow

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def letter(stream: str, key: str, **kw: object) -> DeadLetter:
    base: dict[str, object] = dict(resource="profile", key_field="externalId", payload={"email": f"{key}@x"},
                                   deleted=False, status=400, error="rejected", first_seen=1.5, last_seen=2.25,
                                   attempts=1, retry=False)
    base.update(kw)
    return DeadLetter(stream, key, **base)  # type: ignore[arg-type]


class FakeWorkflows:
    def __init__(self, *names: str) -> None:
        self.names = set(names)

    async def get(self, name: str) -> pb.Workflow:
        if name not in self.names:
            raise NotFound(f"workflow {name} not found")
        wf = workflow()
        wf.name = name
        return wf


class FakeLetters:
    def __init__(self, rows: list[DeadLetter]) -> None:
        self.rows = sorted(rows, key=lambda d: (d.stream, d.key))
        self.marked: list[str] = []

    async def page(self, workflow_id: str, after: tuple[str, str] | None,
                   limit: int) -> tuple[list[DeadLetter], int]:
        return [d for d in self.rows if after is None or (d.stream, d.key) > after][:limit], len(self.rows)

    async def mark(self, workflow_id: str, keys: Sequence[str]) -> tuple[int, list[str]]:
        known = {d.key for d in self.rows}
        unknown = [k for k in keys if k not in known]
        if unknown:
            return 0, unknown
        self.marked = list(keys) or sorted(known)
        return len(self.marked), []


def service(rows: list[DeadLetter] | None = None) -> tuple[DeadLetterService, FakeLetters]:
    letters = FakeLetters(rows or [])
    return DeadLetterService(FakeWorkflows("workflows/wf"), letters), letters  # type: ignore[arg-type]


def violations(exc: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in exc.value.violations]


@pytest.mark.parametrize(("requested", "size"), [(0, 50), (1, 1), (1000, 1000), (5000, 1000)])
def test_page_size_defaults_and_caps(requested: int, size: int) -> None:
    assert page_size(requested) == size


def test_page_tokens_are_opaque_and_bound_to_their_parent() -> None:
    token = encode_token("workflows/wf", ("contact", "c/1"))
    assert decode_token(token, "workflows/wf") == ("contact", "c/1")
    assert decode_token(token, "wf") == ("contact", "c/1"), "a bare id names the same workflow"
    with pytest.raises(InvalidArgument) as other:
        decode_token(token, "workflows/other")
    assert violations(other) == ["page_token"]
    for garbage in ("x", "e30=", encode_token("workflows/wf", ("a", "b"))[:-4]):
        with pytest.raises(InvalidArgument) as bad:
            decode_token(garbage, "workflows/wf")
        assert violations(bad) == ["page_token"]


def test_keys_are_checked_one_by_one() -> None:
    assert validate_keys([]) == []
    with pytest.raises(InvalidArgument) as exc:
        validate_keys(["a", " ", "b", "a"])
    assert violations(exc) == ["keys[1]", "keys[3]"]
    with pytest.raises(InvalidArgument) as many:
        validate_keys([f"k{i}" for i in range(MAX_KEYS + 1)])
    assert violations(many) == ["keys"]


def test_list_pages_through_every_letter_once() -> None:
    rows = [letter(s, f"k{i}") for s in ("card", "contact") for i in range(7)]
    svc_, _ = service(rows)
    seen: list[tuple[str, str]] = []
    req = svc.ListDeadLettersRequest(parent="workflows/wf", page_size=4)
    pages = 0
    while True:
        resp = asyncio.run(svc_.list(req))
        pages += 1
        assert resp.total_size == 14 and len(resp.dead_letters) <= 4
        seen.extend((d.stream, d.key) for d in resp.dead_letters)
        if not resp.next_page_token:
            break
        req.page_token = resp.next_page_token
    assert pages == 4 and seen == [(d.stream, d.key) for d in sorted(rows, key=lambda d: (d.stream, d.key))]


def test_list_reports_every_bad_field_at_once_before_looking_the_workflow_up() -> None:
    svc_, _ = service()
    with pytest.raises(InvalidArgument) as exc:
        asyncio.run(svc_.list(svc.ListDeadLettersRequest(parent="Not A Name", page_size=-3, page_token="?")))
    assert violations(exc) == ["parent", "page_size", "page_token"]
    with pytest.raises(NotFound):
        asyncio.run(svc_.list(svc.ListDeadLettersRequest(parent="workflows/missing")))


def test_retry_marks_all_or_the_selected_keys_and_names_unknown_ones() -> None:
    svc_, letters = service([letter("contact", "a"), letter("contact", "b")])
    assert asyncio.run(svc_.retry(svc.RetryDeadLettersRequest(parent="workflows/wf"))).marked_count == 2
    assert asyncio.run(svc_.retry(svc.RetryDeadLettersRequest(parent="wf", keys=["b"]))).marked_count == 1
    assert letters.marked == ["b"]
    with pytest.raises(InvalidArgument) as exc:
        asyncio.run(svc_.retry(svc.RetryDeadLettersRequest(parent="workflows/wf", keys=["b", "zz"])))
    assert violations(exc) == ["keys[1]"]
    with pytest.raises(NotFound):
        asyncio.run(svc_.retry(svc.RetryDeadLettersRequest(parent="workflows/missing")))


def test_without_a_store_the_calls_say_why() -> None:
    svc_ = DeadLetterService(FakeWorkflows("workflows/wf"), None, "kept by embedded workers only")  # type: ignore[arg-type]
    with pytest.raises(FailedPrecondition) as exc:
        asyncio.run(svc_.list(svc.ListDeadLettersRequest(parent="workflows/wf")))
    assert exc.value.reason == "DEAD_LETTERS_UNAVAILABLE" and "embedded workers only" in exc.value.message
    with pytest.raises(NotFound):  # an unknown workflow is still NOT_FOUND
        asyncio.run(svc_.retry(svc.RetryDeadLettersRequest(parent="workflows/missing")))


def test_a_letter_in_the_api() -> None:
    d = to_proto(letter("contact", "c-1", payload={"email": "a@b", "n": 3, "tags": ["x"]}, retry=True))
    assert (d.stream, d.key, d.resource, d.key_field, d.http_status, d.attempts) == (
        "contact", "c-1", "profile", "externalId", 400, 1)
    assert d.retry_pending and d.payload["email"] == "a@b" and d.payload["n"] == 3
    assert d.first_seen_time.ToNanoseconds() == 1_500_000_000 and d.last_seen_time.ToNanoseconds() == 2_250_000_000


def test_reports_sharing_a_store_count_its_rows_once() -> None:
    reports: list[dict[str, object]] = [
        {"dead_letters": 3, "dead_letter_store": "host:/data/worker-state.db"},
        {"dead_letters": 3, "dead_letter_store": "host:/data/worker-state.db"},
        {"dead_letters": 2, "dead_letter_store": "pod-b:/tmp/worker-state.db"},
        {"dead_letters": -1, "dead_letter_store": "pod-c:/tmp/worker-state.db"},  # not counted yet
        {"backlog": 4},                                                            # an older worker
    ]
    assert totals(reports).dead_letters == 5
    assert totals([{"dead_letters": -1}, {}]).dead_letters is None


def test_the_count_shows_in_status_and_survives_a_stop() -> None:
    wf = workflow()
    wf.status.phase = pb.PHASE_STOPPED
    wf.spec.desired_state = pb.DESIRED_STATE_STOPPED
    wf.status.dead_letters = 7
    assert reconcile(wf, None, Observed(), NOW).status.dead_letters == 7, "unknown: kept"
    wf.status.phase = pb.PHASE_RUNNING
    wf.spec.desired_state = pb.DESIRED_STATE_RUNNING
    spec = pb.WorkflowSpec()
    spec.CopyFrom(wf.spec)
    assert reconcile(wf, spec, Observed(live=1, ready=1, dead_letters=0), NOW).status.dead_letters == 0
