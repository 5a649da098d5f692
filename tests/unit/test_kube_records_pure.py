"""The pure parts of dead letters and held records on Kubernetes: names, selectors, the record JSON."""

from __future__ import annotations

import re

from syncplane.state.kube_records import DEAD_LETTER, HELD, held_of, letter_of, record_name, record_selector

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def test_names_are_valid_stable_and_distinct_per_kind_stream_and_key():
    long_workflow = "w" * 63
    names = {record_name(long_workflow, kind, stream, key)
             for kind in (DEAD_LETTER, HELD) for stream in ("contact", "optinout:crm")
             for key in ("Key With Spaces/ünïcode", "k2")}
    assert len(names) == 8
    assert all(DNS_SUBDOMAIN.match(n) and len(n) <= 253 for n in names)
    assert record_name("wf", DEAD_LETTER, "contact", "k") == record_name("wf", DEAD_LETTER, "contact", "k")
    assert record_name("wf", DEAD_LETTER, "contact", "k").startswith("wf-dl-")
    assert record_name("wf", HELD, "events", "e").startswith("wf-held-")


def test_selectors():
    assert record_selector("wf", DEAD_LETTER) == "syncplane.io/workflow=wf,syncplane.io/record=dead-letter"
    assert record_selector("wf", DEAD_LETTER, retry=True).endswith(",syncplane.io/retry=true")


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
