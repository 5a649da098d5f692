"""One Campaign event in, one Dynamics activity upsert out (or a skip). Pure: no I/O.

The event id is the activity's alternate key (``new_eventid``), so writing an
event twice updates one activity: replays and crashes never duplicate. Event
types are switched on and off by the spec; bounces count only when hard.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from syncplane.connectors.base import Record
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.transform import Action, Transformed

ACTIVITY_SET = "new_emailevents"
ACTIVITY_KEY = "new_eventid"
EVENTS = "events"
EVENT_KEY = "eventId"
COLUMNS = ["eventId", "eventType", "bounceType", "externalId", "campaignId", "campaignName", "deliveryId",
           "deliveryName", "date", "trackingUrl", "mirrorPageUrl"]


def crm_time(acs_time: Any) -> str | None:
    """Campaign's ``2026-11-28 10:00:00.000Z`` as ISO 8601 UTC for Dataverse."""
    if not isinstance(acs_time, str) or not acs_time:
        return None
    text = acs_time.strip().replace(" ", "T", 1).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None


class EventTransform:
    def __init__(self, egress: pb.EgressSpec) -> None:
        self.enabled = {t for t, on in (("send", egress.send), ("open", egress.open), ("click", egress.click),
                                        ("bounce", egress.bounce)) if on}
        self.lengths: dict[str, int] = {}

    def source_columns(self) -> list[str]:
        return list(COLUMNS)

    def filter_fingerprint(self) -> str:
        # Switching a type on later does not fetch its past events: like the vendor, from now on.
        return "events"

    def apply(self, record: Record, full: bool) -> Transformed:
        v = record.values
        kind = str(v.get("eventType") or "")
        if record.deleted or kind not in self.enabled or (kind == "bounce" and v.get("bounceType") != "hard"):
            return Transformed(Action.SKIP, record.key)
        contact = v.get("externalId")
        out: dict[str, Any] = {
            ACTIVITY_KEY: record.key,
            "subject": f"{v.get('campaignId') or ''} {v.get('deliveryId') or ''}".strip(),
            "new_eventtype": kind,
            "new_campaignname": v.get("campaignName"),
            "new_deliveryname": v.get("deliveryName"),
            "new_eventdate": crm_time(v.get("date")),
            "new_trackingurl": v.get("trackingUrl") if kind == "click" else None,
            "new_mirrorpageurl": v.get("mirrorPageUrl"),
        }
        if contact:
            out["regardingobjectid_contact@odata.bind"] = f"/contacts({contact})"
        return Transformed(Action.UPSERT, record.key, out)
