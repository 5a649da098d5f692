{{/* The chart name, overridable. */}}
{{- define "syncplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or the release name when it already contains the chart name. */}}
{{- define "syncplane.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "syncplane.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "syncplane.labels" -}}
helm.sh/chart: {{ include "syncplane.chart" . }}
{{ include "syncplane.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: syncplane
{{- end }}

{{/* Selector labels; callers add app.kubernetes.io/component. */}}
{{- define "syncplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "syncplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount name of a component: (dict "root" $ "component" "operator"). */}}
{{- define "syncplane.serviceAccountName" -}}
{{- $values := index .root.Values .component }}
{{- if $values.serviceAccount.create }}
{{- default (printf "%s-%s" (include "syncplane.fullname" .root) .component) $values.serviceAccount.name }}
{{- else }}
{{- default "default" $values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "syncplane.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Cluster-wide only when asked for (clusterWide: true). */}}
{{- define "syncplane.clusterWide" -}}
{{- if .Values.clusterWide }}true{{ end }}
{{- end }}

{{/* The watched namespaces, rendered with tpl, as a JSON list. */}}
{{- define "syncplane.watchNamespaces" -}}
{{- $out := list }}
{{- range .Values.watchNamespaces }}
{{- $out = append $out (tpl . $) }}
{{- end }}
{{- if and (not $out) (not .Values.clusterWide) }}
{{- $out = list .Release.Namespace }}
{{- end }}
{{- $out | uniq | toJson }}
{{- end }}

{{/* Where the workers' ServiceAccount and Role go, as a JSON list. */}}
{{- define "syncplane.workerNamespaces" -}}
{{- $out := list }}
{{- range .Values.worker.namespaces }}
{{- $out = append $out (tpl . $) }}
{{- end }}
{{- if not $out }}
{{- $out = include "syncplane.watchNamespaces" . | fromJsonArray }}
{{- end }}
{{- if not $out }}
{{- $out = list .Release.Namespace }}
{{- end }}
{{- $out | uniq | toJson }}
{{- end }}

{{- define "syncplane.serverNamespace" -}}
{{- default .Release.Namespace .Values.server.workflowNamespace }}
{{- end }}

{{- define "syncplane.leaseName" -}}
{{- printf "%s-operator-leader" (include "syncplane.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "syncplane.tlsSecretName" -}}
{{- default (printf "%s-server-tls" (include "syncplane.fullname" .)) .Values.server.tls.existingSecret }}
{{- end }}

{{- define "syncplane.tokenSecretName" -}}
{{- default (printf "%s-server-token" (include "syncplane.fullname" .)) .Values.server.auth.existingSecret }}
{{- end }}

{{/* The Service's in-cluster DNS names, for the certificate. */}}
{{- define "syncplane.serverDnsNames" -}}
{{- $svc := printf "%s-server" (include "syncplane.fullname" .) }}
{{- list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.cluster.local" $svc .Release.Namespace) | toJson }}
{{- end }}

{{/* Pod-level scheduling and security shared by the chart's pods: (dict "root" $ "values" .Values.server). */}}
{{- define "syncplane.podCommon" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The web console: it signs in as the API does (auth mode kubernetes: each user's own Kubernetes token;
token: the shared token). */}}
{{- define "syncplane.consoleEnabled" -}}
{{- if .Values.console.enabled }}true{{ end }}
{{- end }}
