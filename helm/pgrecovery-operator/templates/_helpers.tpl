{{/* Names, labels and the decisions every template shares (scope, peering, namespaces). */}}

{{- define "pgrecovery.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pgrecovery.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pgrecovery.labels" -}}
{{ include "pgrecovery.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pgrecovery.serviceAccountName" -}}
{{- default (include "pgrecovery.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* Cluster-wide (`--all-namespaces`) only with cluster-scoped RBAC and no namespace list. */}}
{{- define "pgrecovery.clusterwide" -}}
{{- if and (eq .Values.rbac.scope "cluster") (empty .Values.watchNamespaces) -}}true{{- end -}}
{{- end -}}

{{/* The namespaces served in namespaced mode, as a JSON list (the release's by default). */}}
{{- define "pgrecovery.namespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- .Values.watchNamespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{- define "pgrecovery.peering" -}}
{{- if gt (int .Values.replicaCount) 1 -}}true{{- end -}}
{{- end -}}

{{- define "pgrecovery.peeringName" -}}
{{- default (include "pgrecovery.fullname" .) .Values.peering.name -}}
{{- end -}}

{{/*
The operator's rules: exactly the requests tests/e2e/test_rbac.py records from a real
`kopf run` through a whole recovery and a deletion (plus the Secret reads of the real plan and
kopf's peering when HA). `peeringResource` is kopfpeerings, clusterkopfpeerings or empty.
*/}}
{{- define "pgrecovery.rules" -}}
# PgRecovery objects: kopf lists and watches them, and patches finalizers and annotations.
- apiGroups: [pgrecovery.dev]
  resources: [pgrecoveries]
  verbs: [list, watch, patch]
# The status subresource: phase, conditions, progress.
- apiGroups: [pgrecovery.dev]
  resources: [pgrecoveries/status]
  verbs: [patch]
# One Event per step and phase (kopf.event posts core/v1 Events; it never updates them).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# The Secrets a PgRecovery names (encryption key, SSH key, known_hosts, store credentials),
# read by name when a step needs them: get only, never list or watch.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# One executor per recovery: the Lease `pgrecovery-<uid>` (engine/executor.py), taken, renewed
# and released by the replica that runs it; read by the others.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, create, update, delete]
{{- with .peeringResource }}
# kopf peering (replicaCount > 1): read and keep alive the peering object.
- apiGroups: [kopf.dev]
  resources: [{{ . }}]
  verbs: [list, watch, patch]
{{- end }}
{{- end -}}
