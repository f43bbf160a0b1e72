{{/* Chart name, cut to the 63 characters a label value allows. */}}
{{- define "agent-block.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name of every object. */}}
{{- define "agent-block.fullname" -}}
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

{{- define "agent-block.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "agent-block.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Never change these after a release exists: a Deployment selector is immutable. */}}
{{- define "agent-block.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-block.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The worker's --name: NATS service name and default queue group. A
release name may hold dots, which a NATS name may not. */}}
{{- define "agent-block.workerName" -}}
{{- default (include "agent-block.fullname" . | replace "." "-") .Values.worker.name }}
{{- end }}

{{- define "agent-block.configMapName" -}}
{{- default (include "agent-block.fullname" .) .Values.existingConfigMap }}
{{- end }}

{{/* An autoscaler owns the replica count; both at once would fight over it. */}}
{{- define "agent-block.autoscaled" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are exclusive: KEDA creates its own HorizontalPodAutoscaler" }}
{{- end }}
{{- if or .Values.autoscaling.enabled .Values.keda.enabled }}true{{ end }}
{{- end }}
