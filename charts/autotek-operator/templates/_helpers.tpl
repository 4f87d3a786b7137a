{{/* The chart's name, or nameOverride. */}}
{{- define "autotek-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of the objects: fullnameOverride, else the release name if it holds the chart name, else both. */}}
{{- define "autotek-operator.fullname" -}}
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

{{/* Labels on every object: those manifests/ sets, and Helm's. */}}
{{- define "autotek-operator.labels" -}}
app.kubernetes.io/name: {{ include "autotek-operator.name" . }}
app.kubernetes.io/part-of: autotek-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* What selects the operator's pods. */}}
{{- define "autotek-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "autotek-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "autotek-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "autotek-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image: repository[:tag][@digest]; the tag defaults to appVersion. */}}
{{- define "autotek-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- $image := printf "%s:%s" .Values.image.repository $tag }}
{{- if .Values.image.digest }}
{{- $image = printf "%s@%s" $image .Values.image.digest }}
{{- end }}
{{- $image }}
{{- end }}

{{/*
The operator's permissions on credentials, Secrets and Events: the rules of its ClusterRole, or of
the Role in each watched namespace. Exactly what the operator calls (manifests/base/rbac.yaml says why).
*/}}
{{- define "autotek-operator.rules" -}}
- apiGroups: ["autotek.io"]
  resources: ["autotekcredentials"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["autotek.io"]
  resources: ["autotekcredentials/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.rolloutRestart.enabled }}
# spec.rolloutRestartTargets: read a workload, patch its pod template's restartedAt annotation.
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets", "daemonsets"]
  verbs: ["get", "patch"]
{{- end }}
{{- end }}
