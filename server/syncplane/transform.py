"""The transform contract: one source record in, one destination action out.

Shared by the generic pipeline (``worker/pipeline.py``, which drives a :class:`Transform`) and the
transforms of each direction (``ingress/transform.py``: Dynamics 365 contacts to Campaign
profiles; ``egress/transform.py``: Campaign events to Dynamics 365 activities), so that neither the
pipeline nor egress depends on ingress. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from syncplane.connectors.base import Record


class Action(Enum):
    """What a transformed record asks of the destination."""

    UPSERT = "upsert"   # write ``values`` to the record of ``key`` (created when absent)
    DELETE = "delete"   # delete the record of ``key``
    SKIP = "skip"       # nothing: filtered out (counted as filtered)


@dataclass(frozen=True)
class Transformed:
    """One record's destination action: ``key`` is the destination integration key's value,
    ``values`` the destination fields to write (by destination field name), ``truncated`` the
    destination fields cut to their length (each counted in the report)."""

    action: Action
    key: str
    values: dict[str, Any] = field(default_factory=dict)
    truncated: tuple[str, ...] = ()
    # Destination fields of mappings with applyUpdates: false: written when the destination
    # record is created (or on a replay), never over an existing record's value.
    create_only: frozenset[str] = frozenset()


class Transform(Protocol):
    """A source record in, a destination action out (ingress and egress each have one)."""

    def apply(self, record: Record, full: bool) -> Transformed:
        """The action for ``record``; ``full``: it comes from a full read (not a delta)."""
        ...

    def source_columns(self) -> list[str]:
        """The source columns to read (the ``$select`` of the source's reads)."""
        ...

    def filter_fingerprint(self) -> str:
        """A digest of the filter: a change of it makes the pipeline read the whole table again."""
        ...
