"""The API's protobuf model, the one source of truth (``proto/syncplane/v1/*.proto``).

- ``v1/``: the generated protobuf and gRPC stubs and the proto's comments (``make proto``,
  scripts/generate.py; never edited by hand).
- :mod:`syncplane.proto.enums`: enum values by their short names (``INGRESS``, ``RUNNING``).

Every layer may import this package; it imports nothing else of syncplane.
"""
