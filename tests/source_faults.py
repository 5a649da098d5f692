"""A Dataverse source that stops answering, each way a status test provokes it, on either backend:
``"503"`` (every request, the token endpoint included, answered 503) or ``"refused"`` (connections
refused). Shared by tests/integration/test_status.py and tests/k8s/test_status.py."""

from __future__ import annotations

from syncplane_sandbox import Sandbox

SOURCE_FAULTS = ["503", "refused"]


async def break_source(sb: Sandbox, fault: str) -> None:
    if fault == "503":
        sb.faults.d365.set(rate_503=1.0, include_auth=True)
    else:
        await sb.refuse_connections("d365")


async def heal_source(sb: Sandbox, fault: str) -> None:
    """End ``fault``, then change one contact, so that records flow again."""
    if fault == "503":
        sb.faults.d365.reset()
    else:
        await sb.accept_connections("d365")
    contacts = sb.d365.table("contacts")
    contacts.upsert(next(iter(contacts.rows)), lastname="Flowing")
