{{/* Names */}}
{{- define "tmc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tmc.fullname" -}}
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

{{- define "tmc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tmc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tmc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tmc.labels" -}}
helm.sh/chart: {{ include "tmc.chart" . }}
{{ include "tmc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Server pods: selector labels + component=server */}}
{{- define "tmc.serverSelectorLabels" -}}
{{ include "tmc.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "tmc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tmc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Server image: tag defaults to appVersion (+ gpu.imageTagSuffix when GPU is on). */}}
{{- define "tmc.image" -}}
{{- $tag := .Values.image.tag }}
{{- if not $tag }}
{{- $tag = .Chart.AppVersion }}
{{- if .Values.gpu.enabled }}{{- $tag = printf "%s%s" $tag .Values.gpu.imageTagSuffix }}{{- end }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "tmc.trainingImage" -}}
{{- $repo := default .Values.image.repository .Values.training.image.repository }}
{{- $tag := default (printf "%s-train" .Chart.AppVersion) .Values.training.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* Registry mode: "redis" (in-chart or external) or "embedded". */}}
{{- define "tmc.registryMode" -}}
{{- if or .Values.redis.enabled .Values.externalRedis.host }}redis{{ else }}embedded{{ end }}
{{- end }}

{{/* "true" when component bytes live outside the registry volume (Redis or object storage):
     each pod then keeps a local byte cache (TMC_BLOB_CACHE_DIR on an emptyDir). */}}
{{- define "tmc.remoteBytes" -}}
{{- if or (eq (include "tmc.registryMode" .) "redis") .Values.objectStorage.enabled }}true{{ end }}
{{- end }}

{{/* Object storage: TMC_BLOB_URL, and where the CA bundle is mounted. */}}
{{- define "tmc.blobUrl" -}}
{{- with .Values.objectStorage }}
{{- if .prefix }}{{ printf "s3://%s/%s" .bucket .prefix }}{{ else }}{{ printf "s3://%s" .bucket }}{{ end }}
{{- end }}
{{- end }}

{{- define "tmc.objectStorageCa" -}}
{{- with .Values.objectStorage }}{{ if and .enabled (or .caBundle.configMap .caBundle.secret) }}true{{ end }}{{ end }}
{{- end }}

{{- define "tmc.objectStorageCaDir" -}}/etc/tmc/object-storage-ca{{- end }}
{{- define "tmc.objectStorageCaFile" -}}{{ include "tmc.objectStorageCaDir" . }}/ca-bundle.pem{{- end }}

{{/* In-chart Redis sizing: the index-only block when the bytes are in object storage. */}}
{{- define "tmc.redisSizing" -}}
{{- if .Values.objectStorage.enabled }}{{ toYaml .Values.redis.indexOnly }}
{{- else }}{{ toYaml (dict "resources" .Values.redis.resources "maxmemory" .Values.redis.maxmemory) }}
{{- end }}
{{- end }}

{{/* Secrets */}}
{{- define "tmc.authSecretName" -}}
{{- printf "%s-auth" (include "tmc.fullname" .) }}
{{- end }}

{{- define "tmc.adminSecretName" -}}
{{- default (include "tmc.authSecretName" .) .Values.auth.adminToken.existingSecret }}
{{- end }}

{{- define "tmc.adminSecretKey" -}}
{{- if .Values.auth.adminToken.existingSecret }}{{ .Values.auth.adminToken.existingSecretKey }}{{ else }}admin-token{{ end }}
{{- end }}

{{- define "tmc.inferenceSecretName" -}}
{{- default (include "tmc.authSecretName" .) .Values.auth.inferenceToken.existingSecret }}
{{- end }}

{{- define "tmc.inferenceSecretKey" -}}
{{- if .Values.auth.inferenceToken.existingSecret }}{{ .Values.auth.inferenceToken.existingSecretKey }}{{ else }}inference-token{{ end }}
{{- end }}

{{- define "tmc.redisFullname" -}}
{{- printf "%s-redis" (include "tmc.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret + key holding the Redis password; empty name = no password. */}}
{{- define "tmc.redisPasswordSecretName" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.enabled }}{{ default (include "tmc.redisFullname" .) .Values.redis.auth.existingSecret }}{{ end }}
{{- else if .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecret }}
{{- else if .Values.externalRedis.password }}
{{- printf "%s-external-redis" (include "tmc.fullname" .) }}
{{- end }}
{{- end }}

{{- define "tmc.redisPasswordSecretKey" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}redis-password{{ end }}
{{- else if .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecretPasswordKey }}
{{- else }}redis-password
{{- end }}
{{- end }}

{{/* TMC_REDIS_URL; the password is spliced in by Kubernetes from $(REDIS_PASSWORD). */}}
{{- define "tmc.redisUrl" -}}
{{- $auth := "" }}
{{- if include "tmc.redisPasswordSecretName" . }}
{{- $user := "" }}
{{- if not .Values.redis.enabled }}{{ $user = .Values.externalRedis.username }}{{ end }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $user }}
{{- end }}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s%s:6379/0" $auth (include "tmc.redisFullname" .) }}
{{- else }}
{{- printf "%s://%s%s:%d/%d" (ternary "rediss" "redis" .Values.externalRedis.tls) $auth .Values.externalRedis.host (int .Values.externalRedis.port) (int .Values.externalRedis.db) }}
{{- end }}
{{- end }}

{{/* The URL training Jobs push to. */}}
{{- define "tmc.adminUrl" -}}
{{- if .Values.training.serverUrl }}
{{- .Values.training.serverUrl }}
{{- else if .Values.adminService.enabled }}
{{- printf "http://%s-admin:%d" (include "tmc.fullname" .) (int .Values.adminService.port) }}
{{- else }}
{{- printf "http://%s:%d" (include "tmc.fullname" .) (int .Values.service.port) }}
{{- end }}
{{- end }}

{{/* Effective minimum number of server replicas. */}}
{{- define "tmc.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ .Values.autoscaling.minReplicas }}{{ else }}{{ .Values.replicaCount }}{{ end }}
{{- end }}

{{/* terminationGracePeriodSeconds: preStop sleep + drain + margin (always > drain time). */}}
{{- define "tmc.terminationGracePeriodSeconds" -}}
{{- add (int .Values.server.preStopSleepSeconds) (int (ceil (float64 .Values.config.drainTimeoutS))) (int .Values.server.terminationGraceExtraSeconds) }}
{{- end }}

{{/* Volume + mount for the base model directory (shared by the server and training Jobs). */}}
{{- define "tmc.baseDir" -}}
{{- if eq .Values.base.source "init" }}
{{- printf "%s/%s" .Values.base.mountPath .Values.base.preset }}
{{- else }}
{{- .Values.base.mountPath }}
{{- end }}
{{- end }}

{{- define "tmc.baseVolume" -}}
- name: base
{{- if eq .Values.base.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.base.pvc.existingClaim }}
    readOnly: true
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "tmc.baseMount" -}}
- name: base
  mountPath: {{ .Values.base.mountPath }}
  readOnly: true
{{- if and (eq .Values.base.source "pvc") .Values.base.pvc.subPath }}
  subPath: {{ .Values.base.pvc.subPath }}
{{- end }}
{{- end }}

{{/* Init container that writes the base model (base.source=init). */}}
{{- define "tmc.baseInitContainer" -}}
{{- if eq .Values.base.source "init" }}
- name: base-init
  image: {{ include "tmc.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/sh", "-ec"]
  args:
    - rm -rf "$BASE_OUT" && exec tmc base init --preset "$BASE_PRESET" --out "$BASE_OUT"
  env:
    - name: BASE_PRESET
      value: {{ .Values.base.preset | quote }}
    - name: BASE_OUT
      value: {{ include "tmc.baseDir" . | quote }}
    - name: HOME
      value: /tmp
    - name: TMC_HOME
      value: /tmp/tmc
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.base.initResources | nindent 4 }}
  volumeMounts:
    - name: base
      mountPath: {{ .Values.base.mountPath }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* Rendering-time checks of combinations the schema cannot express. */}}
{{- define "tmc.validate" -}}
{{- if and .Values.redis.enabled .Values.externalRedis.host }}
{{- fail "tmc: set either redis.enabled=true (in-chart Redis) or externalRedis.host, not both" }}
{{- end }}
{{- if and (eq (include "tmc.registryMode" .) "embedded") (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "tmc: replicaCount > 1 or autoscaling.enabled requires a shared registry: the embedded SQLite registry is per pod, so replicas would serve different components. Set redis.enabled=true (in-chart Redis) or externalRedis.host" }}
{{- end }}
{{- if and .Values.gpu.enabled (eq .Values.config.device "cpu") }}
{{- fail "tmc: gpu.enabled=true with config.device=cpu would reserve a GPU and not use it; set config.device to auto or cuda" }}
{{- end }}
{{- if and (eq .Values.base.source "pvc") (not .Values.base.pvc.existingClaim) }}
{{- fail "tmc: base.source=pvc needs base.pvc.existingClaim (a volume holding a `tmc base init` directory)" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "tmc: autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.autoscaling.targetCPUUtilizationPercentage) (not .Values.autoscaling.customMetrics) }}
{{- fail "tmc: autoscaling.enabled needs targetCPUUtilizationPercentage or customMetrics" }}
{{- end }}
{{- with .Values.objectStorage }}{{ if .enabled }}
{{- if not .bucket }}
{{- fail "tmc: objectStorage.enabled=true needs objectStorage.bucket, an existing bucket (component bytes go to s3://<bucket>/<prefix>)" }}
{{- end }}
{{- if not .existingSecret }}
{{- fail "tmc: objectStorage.enabled=true needs objectStorage.existingSecret, a Secret holding the access key pair (keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or set accessKeyIdKey / secretAccessKeyKey); the chart never takes keys from values" }}
{{- end }}
{{- if and .caBundle.configMap .caBundle.secret }}
{{- fail "tmc: set objectStorage.caBundle.configMap or objectStorage.caBundle.secret, not both" }}
{{- end }}
{{- end }}{{ end }}
{{- if and .Values.training.enabled (not .Values.training.jobs) }}
{{- fail "tmc: training.enabled=true needs at least one entry in training.jobs" }}
{{- end }}
{{- end }}
