"""Names, labels and annotations the operator, workers and chart agree on."""

PREFIX = "syncplane.io"
WORKFLOW_LABEL = f"{PREFIX}/workflow"
MANAGED_BY = {"app.kubernetes.io/managed-by": "syncplane-operator", "app.kubernetes.io/part-of": "syncplane"}
COMPONENT_WORKER = {"app.kubernetes.io/component": "worker"}
SPEC_HASH_ANNOTATION = f"{PREFIX}/spec-hash"
GENERATION_ANNOTATION = f"{PREFIX}/applied-generation"
REPORT_ANNOTATION = f"{PREFIX}/report"           # on heartbeat Leases: the worker's JSON report
SPEC_KEY = "spec.json"
# The referenced Secrets, mounted by the kubelet: a directory per Secret, a file per key (the worker's
# ServiceAccount has no access to Secrets at all).
SECRETS_MOUNT = "/etc/syncplane-secrets"
HEALTH_PORT = 8080


def spec_configmap_name(workflow: str, spec_hash: str) -> str:
    return f"{workflow}-spec-{spec_hash[:10]}"


def worker_deployment_name(workflow: str) -> str:
    return f"{workflow}-worker"


# Each Workflow's workers run as a ServiceAccount of their own, `syncplane-worker-<workflow>`, which the
# operator creates and binds to the chart's worker Role. The fixed prefix is what the chart's
# ValidatingAdmissionPolicy reads the workflow from (templates/validatingadmissionpolicy.yaml): such an
# account may write only Leases and ConfigMaps labelled with, and named after, its own workflow.
WORKER_ACCOUNT_PREFIX = "syncplane-worker-"


def worker_service_account_name(workflow: str) -> str:
    return f"{WORKER_ACCOUNT_PREFIX}{workflow}"


def worker_labels(workflow: str) -> dict[str, str]:
    return {**MANAGED_BY, **COMPONENT_WORKER, WORKFLOW_LABEL: workflow}
