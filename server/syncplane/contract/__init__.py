"""The contract between the processes of syncplane: what the operator, the workers, the API
server and the Helm chart agree on, in one place.

- :mod:`syncplane.contract.names`: Kubernetes labels, annotations, ConfigMap and Deployment
  names, the spec ConfigMap's key, mount paths and the worker's exit codes.
- :mod:`syncplane.contract.report`: the worker's report (its /status JSON, or its heartbeat
  Lease's annotation) and its typed parsing, read by the embedded supervisor and the operator.

Pure: no I/O. The chart's templates spell the same names (``charts/syncplane/templates/``).
"""
