"""The linked children of a parent the integration removed from the destination.

When a pass deletes a parent record at the destination (a profile: a filter with
``deleteExcluded`` now excludes its contact, the contact was deleted at the source with
``applyDeletes``, or a full re-read no longer finds it), the records linked to it (loyalty cards)
cannot stay as they are. Campaign keeps them by default, linked to a profile that is gone, or
deletes them with it (the link's "Behavior if deleted or duplicated", Campaign Standard
"Defining links between resources"): either way the destination no longer equals the mapped
source. DOMAIN.md's rule for linked tables decides what they become: a child whose parent is not
at the destination is *held* until the parent is there again.

So, before the parent's page is committed, each child of a removed parent is read from the
source, its mapped values are held (as a 404 "parent not there" would have held it), and it is
deleted at the destination. The child stream re-sends held records after each pass's read: once
the parent is written again (re-included by the filter, created again at the source) the child
comes back with it; any newer change of the child supersedes the held copy, as for any held
record. A crash in between does no harm: the page is read again, the parent deleted again (a
delete of an absent record is done), its children found and held again (a hold is an upsert).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from syncplane.connectors.base import Record, Sink, Source
from syncplane.ingress.transform import EntityTransform
from syncplane.proto.v1 import workflow_pb2 as pb
from syncplane.state.stores import AsyncHeldStore
from syncplane.transform import Action
from syncplane.worker.pipeline import kept_payload

log = logging.getLogger(__name__)

#: The status a held child is kept with: what Campaign answers a link to a record that is not there.
PARENT_NOT_THERE = 404


@dataclass(frozen=True)
class ChildLink:
    """A mapped entity whose destination resource links to a parent resource."""

    entity: pb.EntityMapping
    lookup: str        # the source column holding the parent's key (e.g. ``new_contactid``)
    link_field: str    # the destination link field it is mapped to (e.g. ``profile``)


def child_links(spec: pb.WorkflowSpec, parent_resource: str,
                links: Mapping[str, Mapping[str, str]]) -> list[ChildLink]:
    """The mapped entities whose records link to ``parent_resource``, PURE.

    Args:
        links: destination resource → its link fields → the resource each points at (the
            destination schemas' ``links``).
    Returns:
        One ``ChildLink`` per (entity, mapped link field pointing at the parent), in spec order.
    """
    out = []
    for entity in spec.ingress.entities:
        targets = links.get(entity.destination_resource, {})
        for f in entity.fields:
            if targets.get(f.destination) == parent_resource and entity.destination_resource != parent_resource:
                out.append(ChildLink(entity, f.source, f.destination))
    return out


def linked_to(records: Sequence[Record], lookup: str, parents: Collection[str]) -> list[Record]:
    """The records whose ``lookup`` column holds one of ``parents`` (GUIDs compared case-blind), PURE."""
    wanted = {p.lower() for p in parents}
    return [r for r in records if not r.deleted and str(r.values.get(lookup) or "").lower() in wanted]


@dataclass
class Child:
    """One child stream as a removal needs it: its link, a transform bound like the stream's, and
    a source reading its table."""

    link: ChildLink
    transform: EntityTransform
    source: Source     # the worker's keyed source of the child table (lookups under their column names)
    table: str         # the entity set


class ParentRemoval:
    """Called by the parent stream's pipeline with the keys it deleted at the destination."""

    def __init__(self, workflow: str, parent_resource: str, children: Sequence[Child], sink: Sink,
                 held: AsyncHeldStore) -> None:
        self.workflow, self.parent_resource, self.children = workflow, parent_resource, list(children)
        self.sink, self.held = sink, held

    async def __call__(self, parents: Sequence[str]) -> None:
        """Hold, then delete at the destination, every child of ``parents``.

        Raises what the source read or the destination delete raises (the parent's page is then
        not committed: all of it happens again at the next pass)."""
        for child in self.children:
            entity = child.link.entity
            found: list[Record] = []
            # The whole child table, filtered here: a change-tracked read allows no $filter, and
            # one read per page of removed parents costs less than one query per parent.
            async for page in child.source.pages(child.table, child.transform.source_columns(), None):
                found.extend(linked_to(page.records, child.link.lookup, parents))
            held: list[str] = []
            for rec in found:
                out = child.transform.apply(rec, False)
                if out.action != Action.UPSERT:
                    continue  # filtered out or deleted: not the destination's, nothing to hold
                parent = rec.values.get(child.link.lookup)
                await self.held.ahold(self.workflow, entity.source_table, out.key,
                                      kept_payload(Record(out.key, out.values, create_only=out.create_only)),
                                      PARENT_NOT_THERE, f"its {self.parent_resource} {parent} was removed from the "
                                      "destination; held until it is there again")
                held.append(out.key)
            if not held:
                continue
            result = await self.sink.write(entity.destination_resource, entity.destination_key,
                                           [Record(k, deleted=True) for k in held])
            for bad in result.rejected:  # e.g. a record the integration did not create: never touched
                log.warning("%s: child %s of a removed %s not deleted: %s %s", entity.source_table, bad.key,
                            self.parent_resource, bad.status, bad.error)
            log.info("%s: %d record(s) held, their %s removed from the destination", entity.source_table,
                     len(held), self.parent_resource)
