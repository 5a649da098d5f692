"""A worker's stores for its platform (:func:`worker_stores`), and the embedded set (:func:`embedded_stores`).

=============  ==========================================  ==========================================
Platform       checkpoints                                 dead letters, held records, repairs
=============  ==========================================  ==========================================
embedded       the worker-state SQLite file                the same file
kubernetes     ConfigMap ``<workflow>-checkpoints``        16 fixed ConfigMap shards per kind (kube_records)
=============  ==========================================  ==========================================

The opt-in/out echo memory is in the SQLite file on both: on Kubernetes a pod-local one (losing
it costs one pass that sees no echo to skip, while both sides already agree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from syncplane.state.sqlite import SqliteWorkerState
from syncplane.state.stores import Stores

Platform = Literal["embedded", "kubernetes"]


def embedded_stores(db: SqliteWorkerState, *, owned: bool = False) -> Stores:
    """Every store in the one SQLite database ``db``; closed with the set when ``owned``."""
    return Stores(checkpoints=db, letters=db, held=db, memory=db, repairs=db, owned=(db,) if owned else ())


def worker_stores(platform: Platform, *, state_db: Path, namespace: str = "", owner_uid: str = "") -> Stores:
    """The stores of a worker on ``platform``, owned by the set (close it with ``Stores.aclose``).

    ``state_db``: the worker's SQLite file (embedded: all its state; kubernetes: the echo memory).
    ``namespace``/``owner_uid`` (kubernetes): where the ConfigMaps are, and the Workflow's uid that
    owns those the worker creates. Raises ``ValueError`` for an unknown platform or, on kubernetes,
    an empty namespace; ``sqlite3.Error`` when the file cannot be opened.
    """
    if platform == "embedded":
        return embedded_stores(SqliteWorkerState(state_db), owned=True)
    if platform == "kubernetes":
        # Cursors in <workflow>-checkpoints, dead letters, held records and repairs in a ConfigMap
        # each: they survive the pod (its state dir does not).
        from syncplane.state.kube_checkpoints import ConfigMapCheckpoints
        from syncplane.state.kube_records import ConfigMapRecords

        checkpoints = ConfigMapCheckpoints(namespace, owner_uid=owner_uid)
        records = ConfigMapRecords(namespace, owner_uid=owner_uid)
        local = SqliteWorkerState(state_db)
        return Stores(checkpoints=checkpoints, letters=records, held=records, memory=local, repairs=records,
                      owned=(checkpoints, records, local))
    raise ValueError(f"unknown platform {platform!r}")
