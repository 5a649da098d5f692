"""Deletes that a full read cannot see.

A change-tracked read reports a deletion only as a ``$deletedEntity`` row of a delta; a full
read (the first load, the resync after an expired delta token, a replay, a filter change)
carries none: a row deleted meanwhile is simply not there (Dataverse, "Use change tracking to
synchronize data with external systems": an expired token means a full synchronisation). So
each full read ends by comparing keys: what the integration wrote at the destination
(``CampaignSink.owned_records``, the one definition of "owned") against what the source holds
now (``DynamicsSource.keys``).

Order matters: the source's keys are listed first, the destination's after. Only this stream
writes this resource's records, and it does nothing else meanwhile, so a record listed at the
destination and absent from the source list is gone from the source (or was deleted there
after the listing: deleting it is right too). A record created in the source after its listing
has not been written yet, so it is not listed at the destination either.

Memory: one set of the source's keys (about 100 bytes a key: ~1.5 GB at the 15M-record
guardrail; a sorted spill to disk would be the next step if that matters).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from syncplane.connectors.campaign import MAX_LINE_COUNT as CAMPAIGN_MAX_LINE_COUNT
from syncplane.connectors.campaign import CampaignSink, OwnedRecord
from syncplane.connectors.dynamics import DynamicsSource


def stale_keys(present: Iterable[str], owned: Iterable[str]) -> list[str]:
    """Keys in ``owned`` that ``present`` lacks, in ``owned`` order; compared case-insensitively
    (a GUID written in another case is the same row: never delete a live one)."""
    have = {k.casefold() for k in present}
    return [k for k in owned if k.casefold() not in have]


class DeleteReconciler:
    """For one ingress stream: the destination records the integration wrote whose source rows
    are gone. Raises what the connectors raise (``ConnectorError``, ``RetryableError``)."""

    def __init__(self, source: DynamicsSource, entity_set: str, source_key: str, sink: CampaignSink,
                 resource: str, destination_key: str) -> None:
        self.source, self.entity_set, self.source_key = source, entity_set, source_key
        self.sink, self.resource, self.destination_key = sink, resource, destination_key

    async def __call__(self) -> list[str]:
        present: set[str] = set()
        async for page in self.source.keys(self.entity_set, self.source_key):
            present.update(k.casefold() for k in page)
        stale: list[str] = []
        owned: AsyncIterator[list[OwnedRecord]] = self.sink.owned_records(
            self.resource, self.destination_key, line_count=CAMPAIGN_MAX_LINE_COUNT)
        async for records in owned:
            stale.extend(stale_keys(present, (r.key for r in records)))
        return stale
