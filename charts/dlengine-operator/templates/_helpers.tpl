{{- define "dlengine-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dlengine-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dlengine-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "dlengine-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dlengine-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dlengine-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "dlengine-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dlengine-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dlengine-operator.etcdName" -}}
{{- printf "%s-etcd" .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{- define "dlengine-operator.etcdScheme" -}}
{{- if .Values.etcd.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* Endpoints passed to the operator for deployments that name none. */}}
{{- define "dlengine-operator.defaultEtcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "%s://%s-client.%s.svc:2379" (include "dlengine-operator.etcdScheme" .) (include "dlengine-operator.etcdName" .) .Release.Namespace -}}
{{- else -}}
{{- join "," .Values.externalEtcd.endpoints -}}
{{- end -}}
{{- end -}}
