"""The pure rules behind a parent removed from the destination: which mapped entities link to it,
which of their records are its children (worker/children.py), and which children verify
expects absent because their parent is not at the destination (verify/compare.py)."""

from __future__ import annotations

from syncplane.connectors.base import Record
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.verify.compare import Row, waiting_for_parent
from syncplane.worker.children import child_links, linked_to

P1, P2 = "AAAAAAAA-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"


def spec() -> pb.WorkflowSpec:
    s = pb.WorkflowSpec()
    contacts = s.ingress.entities.add(source_table="contact", destination_resource="profile")
    contacts.fields.add(source="contactid", destination="externalId")
    cards = s.ingress.entities.add(source_table="new_loyaltycard", destination_resource="cusLoyaltyCard")
    cards.fields.add(source="new_points", destination="points")
    cards.fields.add(source="new_contactid", destination="profile")
    notes = s.ingress.entities.add(source_table="new_note", destination_resource="cusNote")
    notes.fields.add(source="new_text", destination="text")  # links to profile, but the link is not mapped
    return s


LINKS = {"profile": {}, "cusLoyaltyCard": {"profile": "profile"}, "cusNote": {"profile": "profile"}}


def test_child_links_are_the_mapped_link_fields_pointing_at_the_parent() -> None:
    found = child_links(spec(), "profile", LINKS)
    assert [(c.entity.source_table, c.lookup, c.link_field) for c in found] == [
        ("new_loyaltycard", "new_contactid", "profile")]
    assert child_links(spec(), "cusLoyaltyCard", LINKS) == []   # nothing links to cards
    assert child_links(spec(), "profile", {}) == []             # no schema link: no child


def test_children_are_found_by_their_lookup_whatever_the_guid_case() -> None:
    records = [Record("c1", {"new_contactid": P1.lower()}), Record("c2", {"new_contactid": P2.upper()}),
               Record("c3", {"new_contactid": None}), Record("c4", {"new_contactid": "other"}),
               Record("c5", deleted=True)]
    assert [r.key for r in linked_to(records, "new_contactid", [P1, P2])] == ["c1", "c2"]
    assert linked_to(records, "new_contactid", []) == []


def test_a_child_whose_parent_is_not_at_the_destination_is_expected_absent() -> None:
    expected = {"c1": Row({"profile": P1.lower()}), "c2": Row({"profile": P2}), "c3": Row({"profile": None}),
                "c4": Row({"points": 3})}
    links = {"profile": "profile"}
    cases: list[tuple[dict[str, set[str]], set[str]]] = [  # (parents at the destination, expected absent)
        ({"profile": {P1.lower(), P2.lower()}}, set()),
        ({"profile": {P1.lower()}}, {"c2"}),
        ({"profile": set()}, {"c1", "c2"}),
        ({}, set()),                  # the parent resource is not compared: links not judged
    ]
    for parents, absent in cases:
        assert waiting_for_parent(expected, links, parents) == absent, parents
