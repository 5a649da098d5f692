"""The Workflow resource model at the edges: the protobuf messages (:mod:`syncplane.proto`) are
the one source of truth; this package converts them to and from YAML/CRD dicts (``convert``),
Kubernetes objects (``kube``) and the CRD's schema (``crd``)."""
