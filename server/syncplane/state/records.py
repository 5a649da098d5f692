"""The records a worker keeps between passes, and what is never kept of them.

- :class:`DeadLetter`: a poison record the destination rejected, with the reason; listed and
  marked for retry through the API, re-sent by the worker.
- :class:`Held`: a record held back because something it points at does not exist yet. An
  egress event whose contact is not in Dynamics 365 yet (a 404 on its ``regarding`` binding)
  is not an error of the event: the contact may arrive with the next ingress pass. It is held,
  durably, and re-sent at the start of each pass; after ``HoldPolicy.max_attempts`` passes it
  becomes a dead letter, with the reason. Never dropped silently. An ingress child (a loyalty
  card whose profile is not in Campaign) is held the same way, with no limit: until its parent
  is there.

The redaction rule (:func:`redact`) goes with both: a field whose name says it holds a
credential (:data:`SECRET_FIELD`) is stored as :data:`REDACTED`, whichever store keeps the
record (the worker's SQLite file, a ConfigMap), and is never shown nor re-sent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

REDACTED = "[REDACTED]"
#: Field names that hold credentials: their values are never stored (nor shown, nor re-sent).
SECRET_FIELD = re.compile(r"pass(word|wd)?$|secret|token|api_?key|authori[sz]ation|credential|private_?key",
                          re.IGNORECASE)


def redact(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with the value of every credential-named field (:data:`SECRET_FIELD`) replaced
    by :data:`REDACTED`; a new dict, the argument is left as it is."""
    return {k: (REDACTED if SECRET_FIELD.search(k) else v) for k, v in payload.items()}


@dataclass(frozen=True)
class DeadLetter:
    """A stored poison record (``payload`` already redacted).

    ``resource``/``key_field``: where it was written (empty: the stream's own), so a retry writes
    it there again; ``status``/``error``: the destination's last rejection (HTTP status, reason);
    ``first_seen``/``last_seen``: epoch seconds; ``attempts``: rejections counted; ``retry``:
    RetryDeadLetters marked it, the worker re-sends it at its next pass.
    """

    stream: str
    key: str
    resource: str
    key_field: str
    payload: dict[str, Any]
    deleted: bool
    status: int
    error: str
    first_seen: float
    last_seen: float
    attempts: int
    retry: bool

    def resend_values(self) -> dict[str, Any]:
        """What a retry sends: the payload without the redacted fields (never the marker)."""
        return {k: v for k, v in self.payload.items() if v != REDACTED}


@dataclass(frozen=True)
class HoldPolicy:
    """Which rejections hold a record rather than dead-letter it, and for how many passes."""

    statuses: frozenset[int] = frozenset({404})   # "what it points at does not exist"
    # Passes before it becomes a dead letter; None: held until what it points at is there (an
    # ingress child waits for its parent, DOMAIN.md "a child may arrive before its parent; order
    # or hold it", however long the parent is filtered out or absent).
    max_attempts: int | None = 20
    # A held child whose parents' landed signal has not changed (worker/pipeline.py) is still re-sent
    # after this many seconds since it was last tried: its parent may land by a route that signal
    # cannot see (another workflow writing the same profile, a marketer, an import into Campaign).
    recheck_seconds: float = 600.0


@dataclass(frozen=True)
class Held:
    """A held record: its key, its payload (redacted), the last rejection (HTTP status, reason)
    and the passes that tried it (``attempts``)."""

    key: str
    payload: dict[str, Any]
    status: int
    error: str
    attempts: int
