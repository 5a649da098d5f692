"""issue 17 (scale): what the operator keeps of a watched body, and what kopf writes for it.

- ``kept``: every body the queue and the indexes hold drops the API server's managedFields and the
  annotations that copy the whole object (kubectl apply's, the old diff-base), and keeps the rest.
- ``NoDiffBase``: kopf sees no change of any Workflow (this operator has no on.create/on.update
  handler), so it writes no diff-base annotation: no PATCH per Workflow at its first sight or at
  each spec edit."""

from __future__ import annotations

import copy
from typing import Any

import kopf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncplane_operator.handlers import COPIES, NoDiffBase, kept

text = st.text(max_size=4)
annotation_maps = st.dictionaries(st.one_of(text, st.sampled_from(sorted(COPIES))), text, max_size=5)
bodies = st.fixed_dictionaries({
    "metadata": st.fixed_dictionaries({"name": text, "annotations": annotation_maps},
                                      optional={"managedFields": st.lists(st.dictionaries(text, text), max_size=2),
                                                "labels": st.dictionaries(text, text, max_size=3)}),
    "spec": st.dictionaries(text, st.one_of(text, st.integers()), max_size=4),
}, optional={"status": st.dictionaries(text, text, max_size=3)})


@given(bodies)
def test_a_kept_body_drops_managed_fields_and_whole_object_copies_and_keeps_the_rest(body: dict[str, Any]):
    before = copy.deepcopy(body)
    out = kept(body)
    assert body == before, "kopf's body is left as it is"
    assert "managedFields" not in out["metadata"]
    assert out["metadata"]["annotations"] == {k: v for k, v in body["metadata"]["annotations"].items()
                                              if k not in COPIES}
    assert {k: v for k, v in out["metadata"].items() if k != "annotations"} == {
        k: v for k, v in body["metadata"].items() if k not in ("annotations", "managedFields")}
    assert {k: v for k, v in out.items() if k != "metadata"} == {k: v for k, v in body.items() if k != "metadata"}


@settings(suppress_health_check=[HealthCheck.too_slow])  # two bodies per example; the machine is shared
@given(bodies, bodies)
def test_kopf_sees_no_change_of_any_workflow_and_stores_no_diff_base(old: dict[str, Any], new: dict[str, Any]):
    storage = NoDiffBase()
    patch = kopf.Patch()
    base = storage.fetch(body=kopf.Body(old))  # type: ignore[arg-type]
    assert base is not None, "None would be a creation: kopf would store a diff-base"
    body = kopf.Body(new)  # type: ignore[arg-type]
    assert base == storage.build(body=body), "an essence that differs is a change kopf writes down"
    storage.store(body=body, patch=patch, essence=storage.build(body=body))
    assert not patch
