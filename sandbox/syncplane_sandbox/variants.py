"""Documented protocol variants the Dataverse emulator can produce on demand.

The sandbox is a witness, not a mirror: where the vendor's documentation (or the OData
standard it follows) allows more than one form, the emulator can answer in each of them,
switched like the fault injection. ``PROTOCOL.md`` beside this module lists every element,
its documented forms, the switch that produces each one, and the test that covers it.

* :class:`PagingVariants` — the links of a change-tracked read. OData 4.0 (part 1 §11.2.5.7,
  §11.3) says a service SHOULD end the last page of a tracked read with ``@odata.deltaLink``
  and that ``@odata.nextLink`` is opaque; Dataverse has been seen ending a read with neither.
  Actions, applied page by page to change-tracked collection reads (full and delta):

  - ``keep``: the documented shape (next link, or the delta link on the last page);
  - ``no-link``: the last page carries neither link (a middle page is untouched: a service
    that dropped a next link mid-read would lose rows silently, nobody documents that);
  - ``repeat``: the page's next link is the URL just requested (the same page again, forever);
  - ``loop``: the page's next link goes back to the first page of the read.

* :class:`BatchVariants` — how a ``$batch`` answers when a request in it fails (Dataverse
  "Execute batch operations using the Web API", Handle errors; OData 4.0 part 1 §11.7.4 and
  §8.2.8.3 ``continue-on-error``):

  - ``continue_on_error``: ``"honour"`` (every request runs; 200 with
    ``Preference-Applied: odata.continue-on-error``), ``"ignore-400"`` (the preference is not
    in effect: processing stops at the first failure and the batch answers 400, Dataverse's
    documented shape) or ``"ignore-200"`` (stops at the first failure, answers 200: the
    OData 4.0 shape, where a batch that was processed is a 200);
  - ``content_ids``: echo ``Content-ID`` in each response part (``True``) or not (Dataverse
    echoes it only inside change sets: the parts are then matched by order).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

PAGE_ACTIONS = ("keep", "no-link", "repeat", "loop")
CONTINUE_ON_ERROR_FORMS = ("honour", "ignore-400", "ignore-200")


@dataclass
class PagingVariants:
    """Per-page link actions for change-tracked reads: ``script`` is consumed one action per
    page served, in arrival order; ``default`` applies once it is empty."""

    default: str = "keep"
    script: deque[str] = field(default_factory=deque)

    def set(self, default: str | None = None, script: list[str] | None = None) -> None:
        """Raises ``ValueError`` naming an unknown action."""
        for action in [*(script or []), *([default] if default is not None else [])]:
            if action not in PAGE_ACTIONS:
                raise ValueError(f"unknown page action {action!r}; use one of {', '.join(PAGE_ACTIONS)}")
        if default is not None:
            self.default = default
        if script is not None:
            self.script = deque(script)

    def reset(self) -> None:
        self.default, self.script = "keep", deque()

    def next_action(self) -> str:
        return self.script.popleft() if self.script else self.default

    def apply(self, body: dict[str, Any], request_url: str, first_url: str) -> dict[str, Any]:
        """Rewrite the links of one change-tracked page per the next action.
        ``request_url``: the URL this page answered; ``first_url``: the read's first page."""
        action = self.next_action()
        if action == "no-link":
            body.pop("@odata.deltaLink", None)
        elif action == "repeat":
            body.pop("@odata.deltaLink", None)
            body["@odata.nextLink"] = request_url
        elif action == "loop":
            body.pop("@odata.deltaLink", None)
            body["@odata.nextLink"] = first_url
        return body

    def snapshot(self) -> dict[str, Any]:
        return {"default": self.default, "script": list(self.script)}


@dataclass
class BatchVariants:
    continue_on_error: str = "honour"
    content_ids: bool = True

    def set(self, **changes: Any) -> None:
        """Raises ``ValueError`` for an unknown setting or form."""
        for name, value in changes.items():
            if name == "continue_on_error":
                if value not in CONTINUE_ON_ERROR_FORMS:
                    raise ValueError(f"continue_on_error must be one of {', '.join(CONTINUE_ON_ERROR_FORMS)}")
                self.continue_on_error = value
            elif name == "content_ids":
                self.content_ids = bool(value)
            else:
                raise ValueError(f"unknown batch setting {name!r}")

    def reset(self) -> None:
        self.continue_on_error, self.content_ids = "honour", True

    def snapshot(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProtocolVariants:
    """Every switchable variant of the Dataverse emulator (``/_sandbox/variants/...``)."""

    paging: PagingVariants = field(default_factory=PagingVariants)
    batch: BatchVariants = field(default_factory=BatchVariants)

    def reset(self) -> None:
        self.paging.reset()
        self.batch.reset()

    def snapshot(self) -> dict[str, Any]:
        return {"paging": self.paging.snapshot(), "batch": self.batch.snapshot()}
