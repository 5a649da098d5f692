"""Where worker state lives: everything a worker keeps between passes.

- :mod:`.records`: the record types (dead letters, held records) and the redaction rule that
  goes with them;
- :mod:`.stores`: the small async interfaces (checkpoints, dead letters, held records, verify's
  repairs, the opt-in/out echo memory) and :class:`~.stores.Stores`, the set a worker runs with;
- :mod:`.sqlite`: the embedded platform's store, one SQLite database for all of them, never
  blocking the event loop;
- :mod:`.kube_checkpoints`, :mod:`.kube_records`: the Kubernetes platform's stores, ConfigMaps
  in the workflow's namespace (they outlive the pod);
- :mod:`.factory`: :func:`~.factory.worker_stores`, a worker's stores for its platform.
"""
