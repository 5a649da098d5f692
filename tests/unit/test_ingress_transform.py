from __future__ import annotations

from datetime import UTC, datetime

from syncplane.connectors.base import Record
from syncplane.ingress import EntityTransform
from syncplane.ingress.transform import FORMATTED, convert
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.transform import Action
from tests.factories import spec


def contact_entity() -> pb.EntityMapping:
    e = pb.EntityMapping()
    e.CopyFrom(spec().ingress.entities[0])
    return e


def rec(**values) -> Record:
    return Record(key="c-1", values={"contactid": "c-1", **values})


def test_maps_fields_and_key():
    out = EntityTransform(contact_entity()).apply(rec(emailaddress1="a@x.io", firstname="Ada", lastname="L"), True)
    assert out.action == Action.UPSERT
    assert out.values == {"externalId": "c-1", "email": "a@x.io", "firstName": "Ada", "lastName": "L"}


def test_truncates_to_campaign_lengths_and_counts():
    out = EntityTransform(contact_entity()).apply(rec(firstname="A" * 45, lastname="B"), True)
    assert out.values["firstName"] == "A" * 30 and out.truncated == ("firstName",)


def test_deletes_follow_the_switch():
    e = contact_entity()
    gone = Record(key="c-1", deleted=True)
    assert EntityTransform(e).apply(gone, False).action == Action.DELETE
    e.apply_deletes = False
    assert EntityTransform(e).apply(gone, False).action == Action.SKIP


def test_apply_updates_off_is_create_only_whatever_the_read():
    """The value always travels, marked create-only: the sink decides by key (issue 12, fault 2)."""
    e = contact_entity()
    e.fields[2].apply_updates = False  # firstname
    t = EntityTransform(e)
    for full in (True, False):
        out = t.apply(rec(firstname="Ada"), full)
        assert out.values["firstName"] == "Ada" and out.create_only == {"firstName"}


def test_replacements_then_filters_with_and_or_and_delete_excluded():
    e = contact_entity()
    e.replacements.add(field="lastname", value="?", replacement="Unknown")
    e.filter.combinator = pb.FILTER_COMBINATOR_AND
    e.filter.conditions.add(field="statecode", operator=pb.FILTER_OPERATOR_EQUALS, value="0")
    e.filter.conditions.add(field="emailaddress1", operator=pb.FILTER_OPERATOR_IS_NOT_NULL)
    t = EntityTransform(e)
    assert t.apply(rec(lastname="?", statecode=0, emailaddress1="a@x"), False).values["lastName"] == "Unknown"
    assert t.apply(rec(statecode=1, emailaddress1="a@x"), False).action == Action.SKIP
    e.filter.delete_excluded = True
    assert EntityTransform(e).apply(rec(statecode=1, emailaddress1="a@x"), False).action == Action.DELETE
    e.filter.combinator = pb.FILTER_COMBINATOR_OR
    assert EntityTransform(e).apply(rec(statecode=1, emailaddress1="a@x"), False).action == Action.UPSERT
    assert set(EntityTransform(e).source_columns()) >= {"statecode", "emailaddress1", "lastname", "contactid"}


def test_numeric_and_text_operators():
    e = contact_entity()
    e.filter.conditions.add(field="numberofchildren", operator=pb.FILTER_OPERATOR_GREATER_THAN, value="2")
    e.filter.conditions.add(field="lastname", operator=pb.FILTER_OPERATOR_CONTAINS, value="ov")
    t = EntityTransform(e)
    assert t.apply(rec(numberofchildren=10, lastname="Lovelace"), False).action == Action.UPSERT
    assert t.apply(rec(numberofchildren=1, lastname="Lovelace"), False).action == Action.SKIP


def test_picklists_technical_or_display():
    e = contact_entity()
    e.fields.add(source="gendercode", destination="gender")
    values = {"gendercode": 2, f"gendercode{FORMATTED}": "Female"}
    assert EntityTransform(e).apply(rec(**values), True).values["gender"] == "Female"
    e.technical_picklist_values = True
    assert EntityTransform(e).apply(rec(**values), True).values["gender"] == 2


def test_type_conversion_unknown_types_become_strings():
    assert convert(True) is True and convert(3) == 3 and convert(2.5) == 2.5
    assert convert(datetime(2026, 1, 2, tzinfo=UTC)) == "2026-01-02T00:00:00+00:00"
    assert convert({"b": 1, "a": [2]}) == '{"a":[2],"b":1}'
    assert convert(b"x") == "b'x'"


def test_mapping_problems_name_each_field_path():
    from syncplane.connectors.schema import Schema
    from syncplane.ingress.transform import mapping_problems

    e = contact_entity()
    e.fields.add(source="lastusedincampaign", destination="birthDate")
    e.filter.conditions.add(field="donotemail", operator=pb.FILTER_OPERATOR_GREATER_THAN, value="true")
    source = Schema("Dynamics 365 table", "contact", {"contactid": "Uniqueidentifier", "emailaddress1": "String",
                                                       "firstname": "String", "lastname": "String",
                                                       "lastusedincampaign": "DateTime", "donotemail": "Boolean"},
                    behaviours={"lastusedincampaign": "UserLocal"})
    destination = Schema("Campaign resource", "profile", {"externalId": "string", "email": "string",
                                                          "firstName": "string", "lastName": "string",
                                                          "birthDate": "date"})
    problems = mapping_problems(e, 2, source, destination)
    assert [p for p, _ in problems] == ["spec.ingress.entities[2].fields[4]",
                                        "spec.ingress.entities[2].filter.conditions[0]"]
    assert "time zone" in problems[0][1] and "no order" in problems[1][1]
    e.ClearField("filter")
    del e.fields[4]
    assert mapping_problems(e, 2, source, destination) == []
