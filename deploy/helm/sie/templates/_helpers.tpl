{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "sie.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "sie.fullname" -}}
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

{{/* Name of one pool's Deployment, Service and ScaledObject. Call with (dict "root" $ "pool" $pool). */}}
{{- define "sie.poolName" -}}
{{- printf "%s-%s" (include "sie.fullname" .root) .pool.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sie.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "sie.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sie.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sie.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{/* Labels of one pool's objects; sie/pool tells the pools apart. Call with (dict "root" $ "pool" $pool). */}}
{{- define "sie.poolLabels" -}}
{{ include "sie.labels" .root }}
sie/pool: {{ .pool.name }}
{{- end }}

{{- define "sie.poolSelectorLabels" -}}
{{ include "sie.selectorLabels" .root }}
sie/pool: {{ .pool.name }}
{{- end }}

{{/* The URL of one pool's Service inside the cluster. Call with (dict "root" $ "pool" $pool). */}}
{{- define "sie.poolURL" -}}
{{- printf "http://%s.%s.svc:%v" (include "sie.poolName" .) .root.Release.Namespace .root.Values.service.port }}
{{- end }}

{{/* The pools, checked: each has a DNS-label name and models, and no model is in two pools. */}}
{{- define "sie.checkPools" -}}
{{- $seen := dict }}
{{- if not .Values.pools }}{{ fail "pools: declare at least one pool" }}{{ end }}
{{- range .Values.pools }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString .name)) }}
{{- fail (printf "pools: %q is not a valid pool name (lower-case letters, digits and '-')" (toString .name)) }}
{{- end }}
{{- if not .models }}{{ fail (printf "pools: pool %q lists no models" .name) }}{{ end }}
{{- $pool := .name }}
{{- range .models }}
{{- if hasKey $seen . }}
{{- fail (printf "pools: model %q is in pools %q and %q; a model belongs to one pool" . (get $seen .) $pool) }}
{{- end }}
{{- $_ := set $seen . $pool }}
{{- end }}
{{- end }}
{{- end }}
