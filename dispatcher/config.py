"""The dispatcher's settings: one typed tree, built once in ``main()`` and passed down.

Sources, later wins: defaults < YAML/JSON file (``AUTOREDUCE_CONFIG_FILE`` or
``--config``) < environment (``AUTOREDUCE_`` prefix, ``__`` between levels, e.g.
``AUTOREDUCE_BROKER__HOSTS=amq-a:61613,amq-b:61613``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from autoreduce_common.broker_settings import BrokerSettings
from autoreduce_common.pod_contract import quantity_bytes
from autoreduce_common.settings_sources import EnvFirstSettings
from pydantic import BaseModel, Field, field_validator
from pydantic_settings import SettingsConfigDict

from dispatcher.faults import FaultPoint

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DEFAULT_TEMPLATE = Path(__file__).parent / "templates" / "job.yaml.j2"


class Resources(BaseModel):
    """Container resources. Requests make pending pods drive the cluster autoscaler."""

    requests: dict[str, str] = Field(default_factory=lambda: {"cpu": "1", "memory": "2Gi"})
    limits: dict[str, str] = Field(default_factory=lambda: {"memory": "8Gi"})


class Volume(BaseModel):
    """A volume for runner pods: ``source`` is a Kubernetes volume source object
    (e.g. ``{"persistentVolumeClaim": {"claimName": "archive"}}``)."""

    name: str
    mount_path: str
    source: dict[str, Any]
    read_only: bool = True


class OomRetry(BaseModel):
    """Out of memory, retried bigger (opt-in): a run killed for memory is retried as its
    next version with its memory limit and request ``factor`` times the last, up to
    ``max_memory``; at the ceiling it is not retried. Needs retries.mode "dispatcher",
    and counts against retries.max_attempts."""

    factor: float = Field(default=2.0, gt=1, le=16)
    max_memory: str  # a Kubernetes quantity, e.g. "32Gi"

    @field_validator("max_memory")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if not quantity_bytes(value):
            raise ValueError(f"max_memory must be a memory quantity like 32Gi, got {value!r}")
        return value


class RunnerSpec(BaseModel):
    """What a reduction pod looks like; every field can be overridden per instrument."""

    image: str = "autoreduce-runner:0.1.0"
    # The three policies Kubernetes knows: any other fails every Job create.
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    command: list[str] = Field(default_factory=lambda: ["python", "-m", "autoreduce_runner"])
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    # Seconds a reduction's pod may run before the kubelet ends it (legacy timeout:
    # 3600), counted from when the pod reaches a node: waiting for capacity is free.
    active_deadline_seconds: int = Field(default=4 * 3600, gt=0)
    # Archive volumes are mounted read-only, the output volume read-write.
    archive_volumes: list[Volume] = Field(default_factory=list)
    output_volumes: list[Volume] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    priority_class_name: str | None = None
    # Kubernetes rejects a negative uid or gid at Job create.
    run_as_user: int | None = Field(default=1000, ge=0)
    run_as_group: int | None = Field(default=1000, ge=0)
    oom_retry: OomRetry | None = None


class InstrumentOverrides(BaseModel):
    """Per-instrument differences from ``runner`` (unset fields inherit)."""

    image: str | None = None
    resources: Resources | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    active_deadline_seconds: int | None = Field(default=None, gt=0)
    archive_volumes: list[Volume] | None = None
    output_volumes: list[Volume] | None = None
    env: dict[str, str] | None = None
    oom_retry: OomRetry | None = None
    # At most this many runs of the instrument reduce at once (None: no cap).
    max_running: int | None = Field(default=None, ge=1)


class JobSettings(BaseModel):
    """Cluster-side naming and hygiene of reduction Jobs."""

    namespace: str = "autoreduce"
    template_path: Path = DEFAULT_TEMPLATE
    # Prefix of every label and annotation we own: one selector finds all our Jobs.
    label_prefix: str = "autoreduce.io"
    # Finished Jobs (and the ConfigMaps of large messages, by owner reference) vanish
    # after a day:
    # long enough for an operator to read logs the morning after.
    ttl_seconds_after_finished: int = Field(default=86_400, ge=0)
    # A cancellation that arrived before its run is kept as a suspended marker Job
    # (it never finishes, so no TTL applies); after this long we delete it, and the
    # run, should it still arrive, is reduced. 0 keeps markers forever.
    cancel_marker_ttl_seconds: int = Field(default=7 * 86_400, ge=0)
    # The broker identity of runner pods: its user (None: the dispatcher's own
    # broker.username) and the Secret holding its password, mounted into runner pods
    # (never in the spec). A user of its own that the broker lets write only the four
    # outcome queues (README "Broker security") bounds what a script that reads the
    # password can do with it.
    broker_username: str | None = None
    broker_secret_name: str = "autoreduce-broker"  # noqa: S105 - a name, not a secret
    broker_secret_key: str = "password"  # noqa: S105 - a key name
    # The broker credential in a poster sidecar of each reduction pod instead of the
    # runner's container, so reduce.py cannot read it (autoreduce_runner/sidecar.py).
    # Off: one container per pod, and the script can read the runners' password.
    poster_sidecar: bool = True
    # A run's message up to this many bytes travels in its Job (a pod-template
    # annotation the pod reads through the downward API): the Job is then the run's
    # only write before its message is acked. Larger ones, and all with 0, go in a
    # ConfigMap of their own, one more write. Each inline byte is held once per Job by
    # whatever watches Jobs (kube-controller-manager), waiting runs included.
    # Annotations are capped at 256 KiB per object.
    inline_message_max_bytes: int = Field(default=16_384, ge=0, le=200_000)
    # ConfigMap with the runner's own config file (directory templates, roots).
    runner_config_map: str | None = None
    # TLS from runner pods, when broker.tls is on: a ConfigMap holding the broker's CA
    # bundle under broker_ca_key (None: the runner image's system trust store), and a
    # kubernetes.io/tls Secret (tls.crt, tls.key) when the broker asks for a client
    # certificate.
    broker_ca_config_map: str | None = None
    broker_ca_key: str = "ca.crt"
    broker_client_cert_secret: str | None = None

    @field_validator("label_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if len(value) > 200 or not _DNS_SUBDOMAIN.match(value):
            raise ValueError(f"label_prefix must be a DNS subdomain, got {value!r}")
        return value


class Caps(BaseModel):
    """Bounds on a burst; runs beyond them wait in the cluster like RB-blocked runs."""

    max_running: int | None = Field(default=None, ge=1)


class RetrySettings(BaseModel):
    """Automatic retries of runs that failed for a transient reason."""

    # "dispatcher": we resubmit as run_version+1 after the delay; "upstream": we only
    # report (with retry_in) and the web app decides, as the legacy system did.
    mode: Literal["dispatcher", "upstream"] = "dispatcher"
    # Total attempts of a run, the first included.
    max_attempts: int = Field(default=3, ge=1, le=20)
    # Seconds before retrying a transient failure that did not say retry_in itself.
    delay_s: int = Field(default=300, ge=0)


class PriorityClasses(BaseModel):
    """PriorityClass of runner pods by run source (the message's JMS priority):
    run detection sends 9, manual submissions 1, reruns and retries 0."""

    run_detection: str | None = None
    manual: str | None = None
    rerun: str | None = None

    def for_priority(self, priority: int) -> str | None:
        if priority >= 5:
            return self.run_detection
        return self.manual if priority >= 1 else self.rerun


class DispatcherSettings(EnvFirstSettings):
    """Everything the dispatcher needs; see helm/autoreduce/values.yaml for the docs."""

    model_config = SettingsConfigDict(
        env_prefix="AUTOREDUCE_", env_nested_delimiter="__", extra="forbid"
    )

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    runner: RunnerSpec = Field(default_factory=RunnerSpec)
    instruments: dict[str, InstrumentOverrides] = Field(default_factory=dict)
    caps: Caps = Field(default_factory=Caps)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    priority_classes: PriorityClasses = Field(default_factory=PriorityClasses)
    # Seconds a pod may fail to pull its image before the run is failed and reported.
    image_pull_grace_s: float = Field(default=300.0, ge=0)
    # Messages handled at once (and so the broker prefetch). 1 by default: a message
    # is dispatched in about 20 ms (two creates), and several replicas share the
    # queue evenly. Raise it for faster bursts; each worker holds at most one unacked
    # message.
    concurrency: int = Field(default=1, ge=1, le=64)
    # A run whose RB is free on arrival takes the RB's Lease and is created running:
    # 4 API writes instead of 5, and no unsuspend round trip (dispatcher.direct).
    # Off: every run is created suspended and admitted by the controller. Caps set
    # (caps.max_running or an instrument's) turn it off too.
    direct_admission: bool = True
    # An explicit client-side API cap (requests/s sustained, and at once). None: paced
    # by the server when it runs API Priority and Fairness (429 + Retry-After waited
    # out), else 50/s and 100 at once (dispatcher.kube.pacing says why). Burst None
    # with qps set: twice qps.
    api_qps: float | None = Field(default=None, gt=0)
    api_burst: int | None = Field(default=None, ge=1)
    # Safety-net resync: every RB and finished Job is looked at again from the cache
    # (no re-list). Admission itself is driven by the watches, not by this.
    resync_seconds: float = Field(default=300.0, gt=0)
    # Where /healthz, /readyz and /metrics are served (0 disables).
    http_port: int = Field(default=8080, ge=0, le=65535)
    # Name of this replica (the pod name in a cluster): who took a Lease.
    identity: str = "dispatcher"
    # Run-identity-tagged JSON log lines instead of text.
    log_json: bool = False
    log_level: str = "INFO"
    # The fault suite's named fault points (dispatcher/faults.py); never set in
    # production, and not a chart value.
    fault_point: FaultPoint | None = None
    # Cap on the bytes of one run's message (ConfigMaps hold at most 1 MiB).
    max_message_bytes: int = Field(default=1_000_000, ge=1024, le=1_040_000)

    @field_validator("instruments")
    @classmethod
    def _upper(cls, value: dict[str, InstrumentOverrides]) -> dict[str, InstrumentOverrides]:
        return {name.upper(): overrides for name, overrides in value.items()}


def load_settings(*, config_file: Path | None) -> DispatcherSettings:
    """Build settings from an optional file plus the environment (env wins)."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        loaded = yaml.safe_load(config_file.read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: settings file must hold a mapping")
        file_values = loaded or {}
    env_only = DispatcherSettings()
    merged = _deep_merge(file_values, env_only.model_dump(exclude_unset=True))
    return DispatcherSettings.model_validate(merged)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _deep_merge(result[key], value)
        else:
            result[key] = value
    return result
