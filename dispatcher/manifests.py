"""Rendering a run into its Job (and, for a large message, its ConfigMap); reading a
run's message back from them (pure: values in, dicts out).

Where a run's message is stored is decided here once: in the Job, as a pod-template
annotation the pod's ``message`` volume projects to the runner's message file
through the downward API, when it is at most ``jobs.inline_message_max_bytes``;
otherwise in a ConfigMap of the Job's name mounted at the same path. The runner reads
one file either way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from autoreduce_common import pod_contract
from autoreduce_common.messages import MessageError, decode_body, encode
from autoreduce_common.pod_contract import MESSAGE_KEY, PodEnv

from dispatcher.config import DispatcherSettings, RunnerSpec
from dispatcher.identity import Labels, RunKey, job_name
from dispatcher.oom_retry import Memory, next_memory

# libyaml's safe loader when present: parsing a rendered Job is most of the
# dispatcher's CPU per run (8.5 ms with the pure-Python loader, 4 ms with libyaml).
_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# The pod volume that holds the run's message; its source is the dispatcher's to set.
MESSAGE_VOLUME = "message"
# The annotation (under the label prefix) carrying an inline message.
MESSAGE_ANNOTATION = "message"


class TemplateError(ValueError):
    """The Job template is broken or renders something that is not a Job."""


@dataclass(frozen=True)
class Arrival:
    """How a message arrived: decides its place among the RB's waiting runs."""

    priority: int  # JMS priority, 0-9; higher first
    enqueued_ms: int  # broker timestamp; earlier first
    message_id: str
    attempt: int = 1  # 1 for the first run, +1 for each automatic retry
    # A retry after running out of memory: its bigger memory (``oom_retry``).
    memory: Memory | None = None


def effective_runner(settings: DispatcherSettings, instrument: str) -> RunnerSpec:
    """The instrument's runner spec: its overrides on top of the defaults."""
    overrides = settings.instruments.get(instrument.upper())
    if overrides is None:
        return settings.runner
    changes = overrides.model_dump(exclude_none=True, exclude={"max_running"})
    merged = settings.runner.model_dump() | changes
    if overrides.env is not None:
        merged["env"] = settings.runner.env | overrides.env
    return RunnerSpec.model_validate(merged)


# A JSON surrogate-pair escape, not preceded by an odd number of backslashes.
_SURROGATE_PAIR = re.compile(r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


def _yaml_escape(match: re.Match[str]) -> str:
    high, low = int(match.group(2), 16), int(match.group(3), 16)
    return f"{match.group(1)}\\U{0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00):08X}"


def yaml_safe_json(value: Any, **kwargs: Any) -> str:
    """``tojson`` for YAML: ASCII-only JSON (so no raw NEL/LS/PS can fold a YAML line),
    with characters beyond U+FFFF written as YAML's ``\\UXXXXXXXX`` escape. libyaml
    refuses JSON's surrogate-pair escapes and PyYAML decodes them as two lone
    surrogates, so an emoji in any value would otherwise break or corrupt the Job."""
    text = json.dumps(value, ensure_ascii=True, **kwargs)
    return _SURROGATE_PAIR.sub(_yaml_escape, text)


def load_template(path: Path) -> jinja2.Template:
    """Load a Job template once at start-up; StrictUndefined fails loudly."""
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - YAML, not HTML; values go through tojson
        keep_trailing_newline=True,
    )
    env.policies["json.dumps_function"] = yaml_safe_json
    env.policies["json.dumps_kwargs"] = {"sort_keys": True}
    try:
        return env.from_string(path.read_text(encoding="utf-8"))
    except (OSError, jinja2.TemplateError) as error:
        raise TemplateError(f"cannot load Job template {path}: {error}") from error


def annotations_for(labels: Labels, key: RunKey, arrival: Arrival) -> dict[str, str]:
    return {
        labels.key("priority"): str(arrival.priority),
        labels.key("enqueued-at"): str(arrival.enqueued_ms),
        labels.key("message-id"): arrival.message_id[:250],
        labels.key("run"): key.describe(),
        labels.key("runs"): ",".join(map(str, key.runs))[:4000],
        labels.key("attempt"): str(arrival.attempt),
    }


def _pod_values() -> dict[str, dict[str, str]]:
    """The pod contract for the template: ``pod.env.<name>`` (the runner's env names)
    and ``pod.paths.<name>`` (where the runner finds its files), so a template never
    spells the paths and names the runner reads."""
    paths = {
        "message_dir": pod_contract.MESSAGE_DIR,
        "message_file": pod_contract.MESSAGE_FILE,
        "broker_dir": pod_contract.BROKER_DIR,
        "broker_password_key": pod_contract.BROKER_PASSWORD_KEY,
        "broker_password_file": pod_contract.BROKER_PASSWORD_FILE,
        "runner_config_dir": pod_contract.RUNNER_CONFIG_DIR,
        "runner_config_file": pod_contract.RUNNER_CONFIG_FILE,
        "scratch_dir": pod_contract.SCRATCH_DIR,
        "termination_log": pod_contract.TERMINATION_LOG,
        "broker_ca_dir": pod_contract.BROKER_CA_DIR,
        "broker_ca_key": pod_contract.BROKER_CA_KEY,
        "broker_ca_file": pod_contract.BROKER_CA_FILE,
        "broker_client_cert_dir": pod_contract.BROKER_CLIENT_CERT_DIR,
        "broker_client_cert_file": pod_contract.BROKER_CLIENT_CERT_FILE,
        "broker_client_key_file": pod_contract.BROKER_CLIENT_KEY_FILE,
        "poster_socket_dir": pod_contract.POSTER_SOCKET_DIR,
        "poster_socket": pod_contract.POSTER_SOCKET,
        "poster_state_dir": pod_contract.POSTER_STATE_DIR,
    }
    return {"env": {env.name.lower(): env.value for env in PodEnv}, "paths": paths}


def _runner_values(settings: DispatcherSettings, key: RunKey, arrival: Arrival) -> dict[str, Any]:
    runner = effective_runner(settings, key.instrument).model_dump()
    by_source = settings.priority_classes.for_priority(arrival.priority)
    if by_source is not None:
        runner["priority_class_name"] = by_source
    if arrival.memory is not None:
        runner["resources"] = arrival.memory.apply(runner["resources"])
    return runner


def oom_retry_limit(settings: DispatcherSettings, key: RunKey, *, resources: dict[str, Any],
                    attempt: int) -> str | None:
    """The memory limit this run is retried with if it runs out of memory; None when it
    would not be (no ``oom_retry``, at the ceiling, or no attempt left)."""
    retries = settings.retries
    if retries.mode != "dispatcher" or attempt >= retries.max_attempts:
        return None
    memory = next_memory(resources, effective_runner(settings, key.instrument).oom_retry)
    return memory.limit if memory is not None else None


def inline_message(settings: DispatcherSettings, raw: dict[str, Any]) -> str | None:
    """The run's message as its Job carries it, or None when it is too large for that
    and goes in a ConfigMap (``render_config_map``)."""
    text = encode(raw).decode("utf-8")
    return text if len(text.encode("utf-8")) <= settings.jobs.inline_message_max_bytes else None


def render_job(
    *,
    settings: DispatcherSettings,
    template: jinja2.Template,
    key: RunKey,
    arrival: Arrival,
    message: str | None = None,
) -> dict[str, Any]:
    """The Job manifest for a run, as a dict ready for the API. ``message`` (from
    ``inline_message``) travels in the Job; None: the pod reads the run's ConfigMap."""
    labels = Labels(settings.jobs.label_prefix)
    name = job_name(key)
    run_labels = labels.for_run(key)
    runner = _runner_values(settings, key, arrival)
    context = {
        "job": {
            "name": name,
            "namespace": settings.jobs.namespace,
            "labels": run_labels,
            "annotations": annotations_for(labels, key, arrival),
            "pod_labels": run_labels,
            "pod_annotations": {
                # Scale-down must not kill a reduction half way through.
                "cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                # `kubectl logs job/<name>` picks the runner without -c.
                "kubectl.kubernetes.io/default-container": "runner",
            },
            "config_map": name,
        },
        "runner": runner,
        "jobs": settings.jobs.model_dump(mode="json"),
        "broker": {
            "hosts": settings.broker.hosts,
            # The user reduction pods connect as, which is not the dispatcher's when
            # the site gives runners an identity of their own.
            "username": settings.jobs.broker_username or settings.broker.username,
            "outcome_receipt_timeout_s": settings.broker.outcome_receipt_timeout_s,
            "queues": settings.broker.queues.model_dump(),
            "tls_enabled": settings.broker.tls.enabled,
        },
        "pod": _pod_values(),
    }
    try:
        text = template.render(**context)
        manifest = yaml.load(text, Loader=_SAFE_LOADER)  # noqa: S506 - a safe loader
    except (jinja2.TemplateError, yaml.YAMLError) as error:
        raise TemplateError(f"Job template failed to render: {error}") from error
    _check_job(manifest, name=name)
    env = {PodEnv.OUTCOME_ID: name}
    retry_limit = oom_retry_limit(settings, key, resources=runner["resources"],
                                  attempt=arrival.attempt)
    if retry_limit is not None:
        env[PodEnv.OOM_RETRY_LIMIT] = retry_limit
    _add_pod_contract(manifest, env=env, finalizer=labels.pod_finalizer)
    _add_message(manifest, labels=labels, message=message)
    return manifest  # type: ignore[no-any-return]


def _add_pod_contract(manifest: dict[str, Any], *, env: dict[PodEnv, str],
                      finalizer: str) -> None:
    """What every reduction pod needs whatever the (site's own) template says: our
    finalizer, which keeps a stopped pod and its termination report until the run's
    outcome is settled, and the runner's per-run env: the run's outcome identity for
    its headers, and the memory of an out-of-memory retry for its error text."""
    template = manifest["spec"].get("template")
    if not isinstance(template, dict) or not (template.get("spec") or {}).get("containers"):
        raise TemplateError("Job template must define spec.template.spec.containers")
    metadata = template.setdefault("metadata", {}) or {}
    template["metadata"] = metadata
    finalizers = list(metadata.get("finalizers") or [])
    if finalizer not in finalizers:
        metadata["finalizers"] = [*finalizers, finalizer]
    for container in template["spec"]["containers"][:1]:  # the runner comes first
        kept = [e for e in container.get("env") or [] if e.get("name") not in env]
        container["env"] = [*kept, *({"name": k.value, "value": v} for k, v in env.items())]


def _add_message(manifest: dict[str, Any], *, labels: Labels, message: str | None) -> None:
    """Point the pod's message volume at where the message is stored. The template
    declares the volume (where it is mounted is the pod contract); its source is set
    here, so a site template written for the ConfigMap alone keeps working."""
    pod = manifest["spec"]["template"]
    volume = next((v for v in pod["spec"].get("volumes") or []
                   if isinstance(v, dict) and v.get("name") == MESSAGE_VOLUME), None)
    if volume is None:
        raise TemplateError(
            f"Job template must declare the pod volume {MESSAGE_VOLUME!r} (the run's message)")
    for source in [k for k in volume if k != "name"]:
        del volume[source]
    if message is None:
        volume["configMap"] = {"name": manifest["metadata"]["name"]}
        return
    annotation = labels.key(MESSAGE_ANNOTATION)
    pod["metadata"]["annotations"] = {**(pod["metadata"].get("annotations") or {}),
                                      annotation: message}
    volume["downwardAPI"] = {"items": [{
        "path": MESSAGE_KEY,
        "fieldRef": {"fieldPath": f"metadata.annotations['{annotation}']"},
    }]}


def carries_message(labels: Labels, job: dict[str, Any]) -> bool:
    """Whether the Job holds its run's message itself (else its ConfigMap does)."""
    return _inline_text(labels, job) is not None


def _inline_text(labels: Labels, job: dict[str, Any] | None) -> str | None:
    pod = ((job or {}).get("spec") or {}).get("template") or {}
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(
        labels.key(MESSAGE_ANNOTATION))
    return text if isinstance(text, str) else None


def stored_message(labels: Labels, job: dict[str, Any] | None,
                   config_map: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
    """The run's message as the dispatcher stored it: from the (full, not cached) Job
    when it carries it, else from its ConfigMap, read through ``config_map`` only then.
    None when neither holds a JSON object (gone with a finished Job)."""
    text = _inline_text(labels, job)
    if text is None:
        return message_of(config_map())
    try:
        return decode_body(text)
    except MessageError:
        return None


def _check_job(manifest: object, *, name: str) -> None:
    if not isinstance(manifest, dict) or manifest.get("kind") != "Job":
        raise TemplateError("Job template must render a single batch/v1 Job")
    if manifest.get("metadata", {}).get("name") != name:
        raise TemplateError("Job template must keep metadata.name = {{ job.name }}")
    if manifest.get("spec", {}).get("suspend") is not True:
        raise TemplateError("Job template must create the Job suspended (spec.suspend: true)")


def render_config_map(
    *, settings: DispatcherSettings, key: RunKey, raw: dict[str, Any]
) -> dict[str, Any]:
    """The ConfigMap carrying a run's message too large for its Job; owner reference
    added once the Job exists."""
    labels = Labels(settings.jobs.label_prefix)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": job_name(key),
            "namespace": settings.jobs.namespace,
            "labels": labels.for_run(key),
        },
        "data": {MESSAGE_KEY: encode(raw).decode("utf-8")},
    }


def message_of(config_map: dict[str, Any] | None) -> dict[str, Any] | None:
    """The message of a run, read back from the ConfigMap ``render_config_map`` made;
    None when the ConfigMap is gone or holds no JSON object."""
    if config_map is None:
        return None
    try:
        return decode_body((config_map.get("data") or {}).get(MESSAGE_KEY) or "")
    except MessageError:
        return None


def owned_by(config_map: dict[str, Any], *, job_uid: str, job: str) -> dict[str, Any]:
    """Make the ConfigMap garbage-collected with its Job."""
    meta = dict(config_map["metadata"])
    meta["ownerReferences"] = [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job,
            "uid": job_uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    return {**config_map, "metadata": meta}


def message_size(raw: dict[str, Any]) -> int:
    return len(json.dumps(raw, ensure_ascii=False).encode("utf-8"))
