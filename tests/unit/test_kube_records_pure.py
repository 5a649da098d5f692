"""The pure parts of dead letters, held records and repairs on Kubernetes: shard names, data keys, the record JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from syncplane.contract.names import (
    RECORD_KINDS,
    RECORD_SHARDS,
    REPAIR,
    record_id,
    record_shard,
    worker_configmap_names,
)
from syncplane.state.kube_records import held_of, letter_of, records_of

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")
WORKFLOWS = st.from_regex(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)


@given(WORKFLOWS, st.sampled_from(RECORD_KINDS), st.text(min_size=1), st.text())
def test_every_record_lives_in_a_configmap_named_in_advance(workflow, kind, stream, key):
    """Issue 13 item 2, the kind: whatever the record, the ConfigMap a worker reads or patches for it is
    one of `worker_configmap_names(workflow)`, the names the per-Workflow Role grants (no listing)."""
    name, rid = record_shard(workflow, kind, stream, key)
    assert name in worker_configmap_names(workflow)
    assert DNS_SUBDOMAIN.match(name) and len(name) <= 253
    assert CONFIGMAP_KEY.match(rid) and CONFIGMAP_KEY.match(rid + ".retry")
    assert record_shard(workflow, kind, stream, key) == (name, rid)


@given(WORKFLOWS, WORKFLOWS)
def test_no_two_workflows_share_a_name(a, b):
    """A Role naming one workflow's ConfigMaps never names another's."""
    if a != b:
        assert not set(worker_configmap_names(a)) & set(worker_configmap_names(b))


def test_the_names_are_the_checkpoints_and_each_shard_of_each_kind():
    names = worker_configmap_names("wf")
    assert len(names) == len(set(names)) == 2 + 3 * RECORD_SHARDS
    assert names[:2] == ["wf-checkpoints", "wf-verify"]   # a verify Job runs as the worker identity
    for prefix in ("dl", "held", "repair"):
        shards = {f"wf-{prefix}-{i:x}" for i in range(RECORD_SHARDS)}
        assert {n for n in names if n.startswith(f"wf-{prefix}-")} == shards
    assert {record_shard("wf", REPAIR, "contact", str(k))[0] for k in range(400)} == {
        f"wf-repair-{i:x}" for i in range(RECORD_SHARDS)}
    assert record_id("contact", "k") != record_id("contact", "k2") != record_id("events", "k")


def test_a_shard_reads_back_its_records_and_marks_only():
    doc = {"stream": "contact", "key": "k"}
    data = {"0123456789abcdef": json.dumps(doc), "0123456789abcdef.retry": "true",
            "0fffffffffffffff": "{damaged", "0aaaaaaaaaaaaaaa.retry": "true"}   # a mark left by a deleted record
    assert records_of(data) == [("0123456789abcdef", doc, True)]


def test_records_read_back():
    doc = {"stream": "contact", "key": "k", "resource": "profile", "keyField": "externalId",
           "payload": {"email": "a@example.com"}, "deleted": False, "status": 400, "error": "bad",
           "firstSeen": 1.0, "lastSeen": 2.0, "attempts": 3}
    d = letter_of(doc, retry=True)
    assert (d.stream, d.key, d.resource, d.key_field, d.payload, d.status, d.attempts, d.retry) == (
        "contact", "k", "profile", "externalId", {"email": "a@example.com"}, 400, 3, True)
    h = held_of({"stream": "events", "key": "e", "payload": {"x": 1}, "status": 404, "error": "no contact",
                 "attempts": 2})
    assert (h.key, h.payload, h.status, h.attempts) == ("e", {"x": 1}, 404, 2)


POLICY = Path(__file__).resolve().parents[2] / "charts/syncplane/templates/validatingadmissionpolicy.yaml"


@given(WORKFLOWS)
def test_the_admission_policy_lets_the_worker_create_exactly_its_names(workflow):
    """The chart's policy (what a worker may create; RBAC cannot narrow create) and
    `worker_configmap_names` (what its Role grants by name) describe the same ConfigMaps."""
    pattern = re.search(r"\.matches\('([^']+)'\)", POLICY.read_text())
    assert pattern, "the ConfigMap name pattern in validatingadmissionpolicy.yaml"
    allowed = re.compile(pattern.group(1))
    names = worker_configmap_names(workflow)
    assert all(allowed.search(n[len(workflow) + 1:]) for n in names)
    for other in ("spec-0123456789", "dl-0123456789abcdef", "held-10", "repair-g", "verify-1", "checkpoints-x"):
        assert not allowed.search(other), other
