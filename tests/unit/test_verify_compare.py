"""The verify comparison (pure): missing, extra and different by a digest of the mapped fields,
and which differences are in flight."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from syncplane.verify.compare import Difference, Row, compare, digest, in_flight, lookup_binds, normalise

values = st.dictionaries(st.sampled_from(["email", "firstName", "lastName", "points"]),
                         st.one_of(st.none(), st.text(max_size=5), st.integers(-5, 5), st.booleans()), max_size=4)
sides = st.dictionaries(st.sampled_from([f"k{i}" for i in range(12)]), values, max_size=12)


def _typed(value: object) -> tuple[type, object]:
    return type(value), value


@settings(deadline=None)  # pure, but the machine is shared: no wall-clock limit per example
@given(sides, sides)
def test_every_key_is_counted_once_and_matches_a_set_comparison(source: dict, destination: dict) -> None:
    expected = {k: Row(v) for k, v in source.items()}
    actual = {k: Row(v) for k, v in destination.items()}
    d = compare(expected, actual)
    assert set(d.missing) == source.keys() - destination.keys()
    assert set(d.extra) == destination.keys() - source.keys()
    # different: the mapped fields differ, by type too (false is not 0); fields the destination has beyond
    # them are not the workflow's
    assert set(d.different) == {k for k in source.keys() & destination.keys()
                                if any(_typed(destination[k].get(f)) != _typed(v) for f, v in source[k].items())}
    assert d.compared == len(source.keys() | destination.keys())


@settings(deadline=None)  # pure, but the machine is shared: no wall-clock limit per example
@given(sides)
def test_a_side_compared_with_itself_has_no_difference(side: dict) -> None:
    rows = {k: Row(v) for k, v in side.items()}
    assert compare(rows, rows).keys == []


def test_ignored_source_keys_are_neither_expected_nor_extra() -> None:
    d = compare({"a": Row({"x": 1})}, {"a": Row({"x": 1}), "b": Row({"x": 2}), "c": Row({})}, ignored={"b"})
    assert (d.missing, d.extra, d.different, d.compared) == ([], ["c"], [], 2)


def test_values_are_compared_by_their_destination_type() -> None:
    types = {"when": "datetime", "n": "double", "id": "Lookup"}
    a = {"when": "2026-11-28T10:00:00Z", "n": 3, "id": "ABC"}
    b = {"when": "2026-11-28 10:00:00.000Z", "n": 3.0, "id": "abc"}
    assert digest(a, types) == digest(b, types)
    assert digest(a, types) != digest({**b, "n": 4}, types)
    assert normalise(True, "double") is True  # a boolean is not a number


def test_in_flight_after_the_last_checkpoint_at_whole_seconds() -> None:
    expected = {"old": Row({"x": 1}, 100.0), "new": Row({"x": 1}, 200.2), "gone": Row({"x": 1}, 150.0)}
    actual = {"old": Row({"x": 2}, 300.0), "new": Row({"x": 2}), "extra": Row({"x": 3})}
    d = compare(expected, actual)
    assert d.keys == ["gone", "extra", "new", "old"]
    assert in_flight(d, [expected], running=True, loading=False, committed=200.9) == {"new"}
    # the destination's own change (old, at 300) is a real difference unless the workers read that side
    assert in_flight(d, [expected, actual], running=True, loading=False, committed=200.9) == {"new", "old"}
    assert in_flight(d, [expected], running=True, loading=True, committed=200.9) == set(d.keys)
    assert in_flight(d, [expected], running=False, loading=True, committed=None) == set()


def test_a_lookup_bind_reads_back_as_its_lookup_column() -> None:
    assert lookup_binds({"subject": "s", "regardingobjectid_contact@odata.bind": "/contacts(abc-1)"}) == \
        {"subject": "s", "regardingobjectid": "abc-1"}
    assert isinstance(Difference().keys, list)
