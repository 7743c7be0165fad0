{{/*
Chart name, truncated to 63 characters (the DNS label limit of names and label values).
*/}}
{{- define "autoreduce.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: "<release>-<chart>", or just the release name when it
already contains the chart name. Truncated to 63 characters.
*/}}
{{- define "autoreduce.fullname" -}}
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

{{/*
"<fullname>-<suffix>", with the full name cut so the result still fits 63 characters.
Call with (list $ "suffix").
*/}}
{{- define "autoreduce.suffixed" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $room := sub 62 (len $suffix) | int }}
{{- printf "%s-%s" (include "autoreduce.fullname" $root | trunc $room | trimSuffix "-") $suffix }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "autoreduce.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "autoreduce.labels" -}}
helm.sh/chart: {{ include "autoreduce.chart" . }}
{{ include "autoreduce.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: autoreduce
{{- end }}

{{/*
Selector labels of the dispatcher (stable across upgrades: never add to these).
*/}}
{{- define "autoreduce.selectorLabels" -}}
app.kubernetes.io/name: {{ include "autoreduce.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: dispatcher
{{- end }}

{{/*
The dispatcher's ServiceAccount name.
*/}}
{{- define "autoreduce.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "autoreduce.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Broker password Secret name and key (created by the chart, or the operator's own).
*/}}
{{- define "autoreduce.brokerSecretName" -}}
{{- if .Values.broker.existingSecret }}
{{- .Values.broker.existingSecret }}
{{- else }}
{{- include "autoreduce.suffixed" (list . "broker") }}
{{- end }}
{{- end }}

{{/*
The reduction pods' broker password Secret and key: the runner identity's (created by
the chart, or the operator's own), or the dispatcher's while broker.runner.username is
empty.
*/}}
{{- define "autoreduce.runnerBrokerSecretName" -}}
{{- $r := .Values.broker.runner }}
{{- if not $r.username }}
{{- include "autoreduce.brokerSecretName" . }}
{{- else if $r.existingSecret }}
{{- $r.existingSecret }}
{{- else }}
{{- include "autoreduce.suffixed" (list . "broker-runner") }}
{{- end }}
{{- end }}

{{- define "autoreduce.runnerBrokerSecretKey" -}}
{{- if .Values.broker.runner.username }}
{{- .Values.broker.runner.secretKey }}
{{- else }}
{{- .Values.broker.secretKey }}
{{- end }}
{{- end }}

{{/*
TLS to the broker. Where the pods that connect with the dispatcher's settings (the
dispatcher, the CLI in it, the canary) mount the CA bundle and the client certificate:
the runner pods' paths too (autoreduce_common/pod_contract.py; a unit test keeps them
equal), so one layout serves every client.
*/}}
{{- define "autoreduce.brokerCaDir" -}}
/etc/autoreduce/broker-ca
{{- end }}
{{- define "autoreduce.brokerClientCertDir" -}}
/etc/autoreduce/broker-client
{{- end }}

{{/*
The CA bundle ConfigMap in effect: broker.tls.existingCaConfigMap, else the chart's own
when caBundle is set; empty when TLS is off or neither is set (then the images' system
trust store applies).
*/}}
{{- define "autoreduce.brokerCaConfigMapName" -}}
{{- $tls := .Values.broker.tls }}
{{- if and $tls.caBundle $tls.existingCaConfigMap }}
{{- fail "broker.tls: set caBundle (the chart makes the ConfigMap) or existingCaConfigMap (your own), not both" }}
{{- end }}
{{- if $tls.enabled }}
{{- if $tls.existingCaConfigMap }}
{{- $tls.existingCaConfigMap }}
{{- else if $tls.caBundle }}
{{- include "autoreduce.suffixed" (list . "broker-ca") }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Key of the bundle in that ConfigMap: caKey in the site's own, ca.crt in the chart's
(and the settings' default, with TLS off).
*/}}
{{- define "autoreduce.brokerCaKey" -}}
{{- if and .Values.broker.tls.enabled .Values.broker.tls.existingCaConfigMap }}
{{- .Values.broker.tls.caKey }}
{{- else -}}
ca.crt
{{- end }}
{{- end }}

{{/*
volumeMounts and volumes (YAML list items) of the broker's CA bundle and the client
certificate, for a pod that connects with the dispatcher's settings; empty when TLS is
off. Each mounts as its own directory, not by subPath, so a renewed certificate
reaches the running pods (the client reads the files on every connect).
*/}}
{{- define "autoreduce.brokerTlsVolumeMounts" -}}
{{- if include "autoreduce.brokerCaConfigMapName" . }}
- name: broker-ca
  mountPath: {{ include "autoreduce.brokerCaDir" . }}
  readOnly: true
{{- end }}
{{- if and .Values.broker.tls.enabled .Values.broker.tls.clientCertSecret }}
- name: broker-client-cert
  mountPath: {{ include "autoreduce.brokerClientCertDir" . }}
  readOnly: true
{{- end }}
{{- end }}
{{- define "autoreduce.brokerTlsVolumes" -}}
{{- with include "autoreduce.brokerCaConfigMapName" . }}
- name: broker-ca
  configMap:
    name: {{ . }}
    items:
      - key: {{ include "autoreduce.brokerCaKey" $ }}
        path: ca.crt
{{- end }}
{{- if and .Values.broker.tls.enabled .Values.broker.tls.clientCertSecret }}
- name: broker-client-cert
  secret:
    secretName: {{ .Values.broker.tls.clientCertSecret }}
    # As the broker Secret: readable whatever uid the operator picks.
    defaultMode: 0444
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}

{{/*
ConfigMap of the runner's config file; empty when runnerConfig is empty.
*/}}
{{- define "autoreduce.runnerConfigMapName" -}}
{{- if .Values.runnerConfig }}
{{- include "autoreduce.suffixed" (list . "runner") }}
{{- end }}
{{- end }}

{{/*
The reduction PriorityClass name runner pods use ("" for none).
*/}}
{{- define "autoreduce.runnerPriorityClassName" -}}
{{- if .Values.runner.priorityClassName }}
{{- .Values.runner.priorityClassName }}
{{- else if .Values.priorityClass.create }}
{{- default (include "autoreduce.suffixed" (list . "reduction")) .Values.priorityClass.name }}
{{- end }}
{{- end }}

{{/*
The PriorityClass of one run source: its name in priorityClasses, else the chart's
own when priorityClasses.create ("" for none). Args: (list . valueKey suffix).
*/}}
{{- define "autoreduce.sourcePriorityClass" -}}
{{- $root := index . 0 }}
{{- $named := index $root.Values.priorityClasses (index . 1) }}
{{- if $named }}
{{- $named }}
{{- else if $root.Values.priorityClasses.create }}
{{- include "autoreduce.suffixed" (list $root (index . 2)) }}
{{- end }}
{{- end }}

{{/*
Label selector of reduction pods (Jobs and pods carry <prefix>/managed: "true").
*/}}
{{- define "autoreduce.runnerSelectorLabels" -}}
{{ .Values.jobs.labelPrefix }}/managed: "true"
{{- end }}

{{/*
Runner image reference "<repository>:<tag>"; call with (list $ imageValues).
A missing tag falls back to runner.image.tag, then the chart's appVersion.
*/}}
{{- define "autoreduce.runnerImage" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- $repository := default $root.Values.runner.image.repository $image.repository }}
{{- $tag := default (default $root.Chart.AppVersion $root.Values.runner.image.tag) $image.tag }}
{{- printf "%s:%s" $repository (toString $tag) }}
{{- end }}

{{/*
A map with every value turned into a string (Kubernetes quantities, labels and env
values are strings; YAML would read `cpu: 1` as a number). Call with the map;
returns YAML (use with fromYaml).
*/}}
{{- define "autoreduce.stringMap" -}}
{{- $out := dict }}
{{- range $key, $value := . }}
{{- $_ := set $out (toString $key) (toString $value) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Container resources {requests, limits} with string quantities, as YAML.
*/}}
{{- define "autoreduce.resources" -}}
{{- $out := dict }}
{{- range $part := list "requests" "limits" }}
{{- $_ := set $out $part (fromYaml (include "autoreduce.stringMap" (get $ $part | default dict))) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
Volumes {name, mountPath, source} -> the settings' {name, mount_path, source}, as
a YAML list under the key "items" (fromYaml only returns maps).
*/}}
{{- define "autoreduce.volumes" -}}
{{- $items := list }}
{{- range . }}
{{- $items = append $items (dict "name" .name "mount_path" .mountPath "source" .source) }}
{{- end }}
{{- toYaml (dict "items" $items) }}
{{- end }}

{{/*
A runner spec (defaults, or one instrument's overrides) in the settings' snake_case,
as YAML. Call with (list $ valuesMap isOverride). Unset override fields are left out
so they inherit.
*/}}
{{- define "autoreduce.runnerFields" -}}
{{- $root := index . 0 }}
{{- $v := index . 1 }}
{{- $override := index . 2 }}
{{- $out := dict }}
{{- if hasKey $v "image" }}
{{- $_ := set $out "image" (include "autoreduce.runnerImage" (list $root $v.image)) }}
{{- end }}
{{- if hasKey $v "resources" }}
{{- $_ := set $out "resources" (fromYaml (include "autoreduce.resources" $v.resources)) }}
{{- end }}
{{- if hasKey $v "nodeSelector" }}
{{- $_ := set $out "node_selector" (fromYaml (include "autoreduce.stringMap" $v.nodeSelector)) }}
{{- end }}
{{- if hasKey $v "tolerations" }}
{{- $_ := set $out "tolerations" $v.tolerations }}
{{- end }}
{{- if hasKey $v "activeDeadlineSeconds" }}
{{- $_ := set $out "active_deadline_seconds" (int $v.activeDeadlineSeconds) }}
{{- end }}
{{- if hasKey $v "archiveVolumes" }}
{{- $_ := set $out "archive_volumes" (fromYaml (include "autoreduce.volumes" $v.archiveVolumes)).items }}
{{- end }}
{{- if hasKey $v "outputVolumes" }}
{{- $_ := set $out "output_volumes" (fromYaml (include "autoreduce.volumes" $v.outputVolumes)).items }}
{{- end }}
{{- if hasKey $v "env" }}
{{- $_ := set $out "env" (fromYaml (include "autoreduce.stringMap" $v.env)) }}
{{- end }}
{{- if $v.oomRetry }}
{{- $_ := set $out "oom_retry" (dict "factor" (float64 (default 2 $v.oomRetry.factor)) "max_memory" (toString $v.oomRetry.maxMemory)) }}
{{- else if not $override }}
{{- $_ := set $out "oom_retry" nil }}
{{- end }}
{{- if and $override (hasKey $v "maxRunning") }}
{{- $_ := set $out "max_running" (int $v.maxRunning) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
The settings' broker.tls (autoreduce_common/broker_settings.py TlsSettings), as YAML:
the files the pod mounts (autoreduce.brokerTlsVolumeMounts), null where none is.
*/}}
{{- define "autoreduce.brokerTlsSettings" -}}
{{- $tls := .Values.broker.tls }}
{{- $out := dict "enabled" $tls.enabled "ca_file" nil "cert_file" nil "key_file" nil }}
{{- if include "autoreduce.brokerCaConfigMapName" . }}
{{- $_ := set $out "ca_file" (printf "%s/ca.crt" (include "autoreduce.brokerCaDir" .)) }}
{{- end }}
{{- if and $tls.enabled $tls.clientCertSecret }}
{{- $dir := include "autoreduce.brokerClientCertDir" . }}
{{- $_ := set $out "cert_file" (printf "%s/tls.crt" $dir) }}
{{- $_ := set $out "key_file" (printf "%s/tls.key" $dir) }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/*
The dispatcher's settings file (dispatcher/config.py DispatcherSettings), as YAML.
Secrets never appear here: the password is a mounted file.
*/}}
{{- define "autoreduce.settings" -}}
{{- $v := .Values }}
{{- $q := $v.broker.queues }}
{{- $broker := dict
  "hosts" $v.broker.hosts
  "username" $v.broker.username
  "password_file" "/etc/autoreduce/broker/password"
  "heartbeat_ms" (int $v.broker.heartbeatMs)
  "receipt_timeout_s" $v.broker.receiptTimeoutSeconds
  "outcome_receipt_timeout_s" $v.broker.outcomeReceiptTimeoutSeconds
  "reconnect_initial_s" $v.broker.reconnectInitialSeconds
  "reconnect_max_s" $v.broker.reconnectMaxSeconds
  "queues" (dict "pending" $q.pending "started" $q.started "complete" $q.complete "error" $q.error "skipped" $q.skipped "dead_letter" $q.deadLetter)
  "tls" (include "autoreduce.brokerTlsSettings" . | fromYaml)
}}
{{- $jobs := dict
  "namespace" .Release.Namespace
  "label_prefix" $v.jobs.labelPrefix
  "ttl_seconds_after_finished" (int $v.jobs.ttlSecondsAfterFinished)
  "cancel_marker_ttl_seconds" (int $v.jobs.cancelMarkerTtlSeconds)
  "poster_sidecar" $v.jobs.posterSidecar
  "inline_message_max_bytes" (int $v.jobs.inlineMessageMaxBytes)
  "broker_username" ($v.broker.runner.username | default nil)
  "broker_secret_name" (include "autoreduce.runnerBrokerSecretName" .)
  "broker_secret_key" (include "autoreduce.runnerBrokerSecretKey" .)
  "runner_config_map" (include "autoreduce.runnerConfigMapName" . | default nil)
  "broker_ca_config_map" (include "autoreduce.brokerCaConfigMapName" . | default nil)
  "broker_ca_key" (include "autoreduce.brokerCaKey" .)
  "broker_client_cert_secret" (and $v.broker.tls.enabled $v.broker.tls.runnerClientCertSecret | default nil)
}}
{{- /* Without a site template the dispatcher uses the one built into its image, so
the chart carries no copy that could drift from it. */}}
{{- if .Values.jobTemplate }}
{{- $_ := set $jobs "template_path" (include "autoreduce.jobTemplatePath" .) }}
{{- end }}
{{- $runner := fromYaml (include "autoreduce.runnerFields" (list . $v.runner false)) }}
{{- $_ := set $runner "image_pull_policy" $v.runner.image.pullPolicy }}
{{- $_ := set $runner "command" $v.runner.command }}
{{- $_ := set $runner "priority_class_name" (include "autoreduce.runnerPriorityClassName" . | default nil) }}
{{- $_ := set $runner "run_as_user" $v.runner.runAsUser }}
{{- $_ := set $runner "run_as_group" $v.runner.runAsGroup }}
{{- $instruments := dict }}
{{- range $name, $overrides := $v.instruments }}
{{- $_ := set $instruments (upper $name) (fromYaml (include "autoreduce.runnerFields" (list $ $overrides true))) }}
{{- end }}
{{- $settings := dict
  "broker" $broker
  "jobs" $jobs
  "runner" $runner
  "instruments" $instruments
  "caps" (dict "max_running" $v.caps.maxRunning)
  "retries" (dict "mode" $v.retries.mode "max_attempts" (int $v.retries.maxAttempts) "delay_s" (int $v.retries.delaySeconds))
  "priority_classes" (dict "run_detection" (include "autoreduce.sourcePriorityClass" (list . "runDetection" "run-detection") | default nil) "manual" (include "autoreduce.sourcePriorityClass" (list . "manual" "manual") | default nil) "rerun" (include "autoreduce.sourcePriorityClass" (list . "rerun" "rerun") | default nil))
  "image_pull_grace_s" $v.imagePullGraceSeconds
  "concurrency" (int $v.concurrency)
  "direct_admission" $v.directAdmission
  "api_qps" $v.api.qps
  "api_burst" (ternary nil (int $v.api.burst) (kindIs "invalid" $v.api.burst))
  "resync_seconds" $v.resyncSeconds
  "http_port" (int $v.httpPort)
  "log_json" $v.logJson
  "log_level" $v.logLevel
  "max_message_bytes" (int $v.maxMessageBytes)
}}
{{- toYaml $settings }}
{{- end }}

{{/*
Where the dispatcher finds the site's own Job template (jobTemplate): its key in the
dispatcher ConfigMap, which the Deployment mounts at /etc/autoreduce/dispatcher.
*/}}
{{- define "autoreduce.jobTemplateKey" -}}
job.yaml.j2
{{- end }}
{{- define "autoreduce.jobTemplatePath" -}}
{{- printf "/etc/autoreduce/dispatcher/%s" (include "autoreduce.jobTemplateKey" .) }}
{{- end }}

{{/*
Broker ports, from broker.hosts ("host:port").
*/}}
{{- define "autoreduce.brokerPorts" -}}
{{- $ports := list }}
{{- range .Values.broker.hosts }}
{{- $ports = append $ports (regexFind "[0-9]+$" . | int) }}
{{- end }}
{{- toYaml (dict "items" ($ports | uniq)) }}
{{- end }}

{{/*
Egress rule for DNS to kube-dns in any namespace.
*/}}
{{- define "autoreduce.dnsEgress" -}}
# DNS, to resolve the broker's and the API server's names.
- to:
    - namespaceSelector: {}
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}
