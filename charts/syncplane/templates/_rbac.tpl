{{/*
The verbs of each component, in one place (scripts/chart-check.py compares them with the API calls in the code,
and tests/k8s/test_chart.py runs the lifecycle under exactly these grants).
*/}}

{{/* The operator, in each watched namespace (or cluster-wide). */}}
{{- define "syncplane.operatorRules" -}}
# Workflows: watched (kopf); the operator's finalizer (patch); status (patch on the subresource)
- apiGroups: ["syncplane.io"]
  resources: ["workflows"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["syncplane.io"]
  resources: ["workflows/status"]
  verbs: ["patch"]
# worker Deployments: indexed (list, watch), created, scaled (patch), replaced on a new spec (update)
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch", "update"]
# worker pods: indexed for crash loops and rejections
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# the workers' heartbeat Leases: indexed
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["list", "watch"]
# applied-spec snapshots: created on start (or for a verify), read back once after a restart, and the
# workflow's older ones listed and deleted then (all but the applied one and the newest few; the
# ValidatingAdmissionPolicy holds the operator's deletes to `<workflow>-spec-*` names); a verify's
# result read before its Job is created (an answered request runs no second Job); patch also because the
# operator grants get and patch, by name, in each Workflow's own worker Role (RBAC lets a Role grant only
# verbs its maker holds)
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "create", "patch", "delete"]
# `syncplane verify`: a one-off Job per request, run as the workflow's worker identity
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create"]
# Events on transitions (kopf.info / kopf.warn)
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# each Workflow's own worker identity: a ServiceAccount (annotated for workload identity), its RoleBinding to
# the worker Role, and its own Role of ConfigMap names with its RoleBinding (`bind` by name for the worker
# Role: the operator itself holds none of its verbs; its own Role grants ConfigMap verbs the operator holds).
# One that exists is read and brought back to what the operator builds (patch; a RoleBinding with another
# roleRef, which cannot be patched, is deleted and made again)
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles"]
  resourceNames: [{{ printf "%s-worker" (include "syncplane.fullname" .) | quote }}]
  verbs: ["bind"]
{{- end }}

{{/* The operator's leader election, in the release namespace. Create cannot be limited by name. */}}
{{- define "syncplane.leaderElectionRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create"]
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  resourceNames: [{{ include "syncplane.leaseName" . | quote }}]
  verbs: ["get", "update"]
{{- end }}

{{/* The API server: the spec of Workflows in its namespace (never status), and their dead letters. */}}
{{- define "syncplane.serverRules" -}}
- apiGroups: ["syncplane.io"]
  resources: ["workflows"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
# dead letters (fixed shards per workflow): ListDeadLetters reads them by name, RetryDeadLetters marks them;
# VerifyWorkflow watches `<workflow>-verify` (a metadata.name field selector) for its Job's result
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}

{{/* The workers (and their workflow's verify Jobs): their own heartbeat Lease, their checkpoints, dead letters,
held records, verify's repairs and result. No Secrets: the
operator mounts the ones a workflow references into its worker pods. Bound by the operator to each Workflow's
own ServiceAccount, which the operator also gives a Role of its own: get and patch on exactly its workflow's
ConfigMaps, by name (operator/syncplane_operator/builders.py, build_worker_identity). Here only what RBAC
cannot name: a Lease per pod, and create (never limited by name); the ValidatingAdmissionPolicy
(validatingadmissionpolicy.yaml) narrows those writes to the objects of that account's own workflow. */}}
{{- define "syncplane.workerRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["create", "patch", "delete"]
# the `<workflow>-checkpoints` ConfigMap (the operator creates it; a worker again if it was deleted), the
# first record of a dead-letter, held-record or repair shard, and a verify Job's first `<workflow>-verify`
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create"]
{{- end }}
