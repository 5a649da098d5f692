"""The accounting both runners share: the pipeline (ingress, egress: ``worker/pipeline.py``) and
the opt-in/out sync (``optinout/sync.py``) count into the same worker report the same way.

- A record the destination rejects for good is a dead letter, kept with its reason (HTTP status
  and error) in the worker's dead-letter store; the report then carries the workflow's dead-letter
  count and the store's location (workers sharing one store count its rows once).
- The backlog is the records read and not yet accounted for (written, deleted, filtered,
  dead-lettered, held or failed).
- At the end of a pass what is left of the backlog either stays the backlog (a stop: read again at
  the next start) or is counted ``failed`` (the pass failed: the next pass reads it again).

The per-record outcomes themselves are :meth:`syncplane.contract.report.WorkerReport.done`.
"""

from __future__ import annotations

from typing import Any

from syncplane.contract.report import WorkerReport
from syncplane.state.stores import AsyncDeadLetterStore


class Accounting:
    """The dead letters, backlog and end-of-pass counts of one workflow's runner."""

    def __init__(self, workflow: str, report: WorkerReport, letters: AsyncDeadLetterStore) -> None:
        self.workflow, self.report, self.letters = workflow, report, letters

    async def dead_letter(self, stream: str, key: str, payload: dict[str, Any], status: int, error: str, *,
                          resource: str = "", key_field: str = "", deleted: bool = False) -> None:
        """Keep a rejected record (``payload``: the values to re-send, redacted by the store) as a
        dead letter of ``stream`` with the destination's answer (``status``: HTTP status, ``error``:
        its message), and where it was going (``resource``, ``key_field``; ``deleted``: a delete).
        The report's count follows at :meth:`count_letters`. Raises what the store raises."""
        await self.letters.adead_letter(self.workflow, stream, key, payload, status, error,
                                        resource=resource, key_field=key_field, deleted=deleted)

    async def count_letters(self) -> None:
        """The report's dead letters: the workflow's count in the store, and the store's location."""
        self.report.dead_letters = await self.letters.adead_letter_count(self.workflow)
        self.report.dead_letter_store = self.letters.location

    def backlog(self, records: int) -> None:
        """The report's backlog: ``records`` read and not yet accounted for."""
        self.report.set_backlog(records)

    def end_pass(self, stopped: bool, left: int) -> None:
        """The end of a pass with ``left`` records read and not accounted for: on a stop they stay
        the backlog (the next start reads them again); after a failure they are counted ``failed``
        (the next pass reads them again) and the backlog is empty."""
        if stopped:
            self.report.set_backlog(left)
        else:
            self.report.done("failed", left)
            self.report.set_backlog(0)
