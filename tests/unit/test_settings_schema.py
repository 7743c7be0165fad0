"""dispatcher/config.py is the one definition of the dispatcher's settings; the chart's
three views of them are checked against it here:

- values.schema.json (what a site may set): every value under a settings-backed
  section maps to a settings field, with the same type, nullability, enum and bounds;
- values.yaml (the chart's defaults): rendered, they give the models' defaults but
  for the differences listed below with their reasons;
- templates/_helpers.tpl (``autoreduce.settings``, values -> settings.yaml): rendered
  under the defaults and under values that set everything, it names only fields of
  the models, every field the chart can set, and each value lands in its own field.

A failure names the field and the file to fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from annotated_types import Ge, Gt, Le, Lt
from autoreduce_common import pod_contract
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from dispatcher.config import DEFAULT_TEMPLATE, DispatcherSettings, JobSettings, load_settings
from tests.unit.test_chart_render import (
    CHART,
    RELEASE,
    config_mount,
    dispatcher_config_map,
    load_rendered_settings,
    render,
)

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
HELPERS = "helm/autoreduce/templates/_helpers.tpl (autoreduce.settings)"
HERE = "tests/unit/test_settings_schema.py"

# Chart value (camelCase path, "*" for any instrument) -> the setting it becomes.
SETTING_OF_VALUE = {
    "broker.hosts": "broker.hosts",
    "broker.username": "broker.username",
    "broker.runner.username": "jobs.broker_username",  # null: the dispatcher's user
    "broker.heartbeatMs": "broker.heartbeat_ms",
    "broker.receiptTimeoutSeconds": "broker.receipt_timeout_s",
    "broker.outcomeReceiptTimeoutSeconds": "broker.outcome_receipt_timeout_s",
    "broker.reconnectInitialSeconds": "broker.reconnect_initial_s",
    "broker.reconnectMaxSeconds": "broker.reconnect_max_s",
    "broker.queues.pending": "broker.queues.pending",
    "broker.queues.started": "broker.queues.started",
    "broker.queues.complete": "broker.queues.complete",
    "broker.queues.error": "broker.queues.error",
    "broker.queues.skipped": "broker.queues.skipped",
    "broker.queues.deadLetter": "broker.queues.dead_letter",
    "broker.tls.enabled": "broker.tls.enabled",
    "broker.tls.runnerClientCertSecret": "jobs.broker_client_cert_secret",  # null: TLS off
    "jobs.labelPrefix": "jobs.label_prefix",
    "jobs.ttlSecondsAfterFinished": "jobs.ttl_seconds_after_finished",
    "jobs.cancelMarkerTtlSeconds": "jobs.cancel_marker_ttl_seconds",
    "jobs.posterSidecar": "jobs.poster_sidecar",
    "jobs.inlineMessageMaxBytes": "jobs.inline_message_max_bytes",
    "runner.image.pullPolicy": "runner.image_pull_policy",
    "runner.command": "runner.command",
    "runner.resources.requests": "runner.resources.requests",
    "runner.resources.limits": "runner.resources.limits",
    "runner.nodeSelector": "runner.node_selector",
    "runner.tolerations": "runner.tolerations",
    "runner.activeDeadlineSeconds": "runner.active_deadline_seconds",
    "runner.archiveVolumes": "runner.archive_volumes",
    "runner.outputVolumes": "runner.output_volumes",
    "runner.env": "runner.env",
    "runner.priorityClassName": "runner.priority_class_name",
    "runner.runAsUser": "runner.run_as_user",
    "runner.runAsGroup": "runner.run_as_group",
    "instruments.*.resources.requests": "instruments.*.resources.requests",
    "instruments.*.resources.limits": "instruments.*.resources.limits",
    "instruments.*.nodeSelector": "instruments.*.node_selector",
    "instruments.*.tolerations": "instruments.*.tolerations",
    "instruments.*.activeDeadlineSeconds": "instruments.*.active_deadline_seconds",
    "instruments.*.archiveVolumes": "instruments.*.archive_volumes",
    "instruments.*.outputVolumes": "instruments.*.output_volumes",
    "instruments.*.env": "instruments.*.env",
    "instruments.*.maxRunning": "instruments.*.max_running",
    "caps.maxRunning": "caps.max_running",
    "retries.mode": "retries.mode",
    "retries.maxAttempts": "retries.max_attempts",
    "retries.delaySeconds": "retries.delay_s",
    "priorityClasses.runDetection": "priority_classes.run_detection",
    "priorityClasses.manual": "priority_classes.manual",
    "priorityClasses.rerun": "priority_classes.rerun",
    "imagePullGraceSeconds": "image_pull_grace_s",
    "concurrency": "concurrency",
    "directAdmission": "direct_admission",
    "api.qps": "api_qps",
    "api.burst": "api_burst",
    "resyncSeconds": "resync_seconds",
    "httpPort": "http_port",
    "logJson": "log_json",
    "logLevel": "log_level",
    "maxMessageBytes": "max_message_bytes",
}

# Values that make a setting with other values, so not one to one (the value covers
# everything under it in the schema).
DERIVED = {
    "runner.image.repository": "runner.image",  # "repository:tag"
    "runner.image.tag": "runner.image",  # empty: the chart's appVersion
    "instruments.*.image.repository": "instruments.*.image",
    "instruments.*.image.tag": "instruments.*.image",
    "jobTemplate": "jobs.template_path",  # the ConfigMap's copy; empty: the image's own
    "runnerConfig": "jobs.runner_config_map",  # non-empty: the runner ConfigMap's name
    "priorityClass.create": "runner.priority_class_name",  # unless runner.priorityClassName
    "priorityClass.name": "runner.priority_class_name",
    # {} (off) renders null; {factor, maxMemory} the model (maxMemory -> max_memory).
    "runner.oomRetry": "runner.oom_retry",
    "instruments.*.oomRetry": "instruments.*.oom_retry",
    # The chart's own class of each run source, where its name above is empty.
    "priorityClasses.create": "priority_classes",
    # TLS on: the CA ConfigMap in effect (the site's, or the chart's made of caBundle),
    # and the files the dispatcher's pod mounts from it and from clientCertSecret.
    "broker.tls.existingCaConfigMap": "jobs.broker_ca_config_map",  # and broker.tls.ca_file
    "broker.tls.caBundle": "jobs.broker_ca_config_map",  # <fullname>-broker-ca; and ca_file
    "broker.tls.caKey": "jobs.broker_ca_key",  # with existingCaConfigMap; else ca.crt
    "broker.tls.clientCertSecret": "broker.tls.cert_file",  # and key_file: the mounted pair
    # The runners' password Secret and key: broker.runner's when it names a user, else
    # the dispatcher's own (which the dispatcher's pod mounts as broker.password_file).
    "broker.runner.existingSecret": "jobs.broker_secret_name",  # else <fullname>-broker-runner
    "broker.runner.secretKey": "jobs.broker_secret_key",
    "broker.existingSecret": "jobs.broker_secret_name",  # while broker.runner.username is ""
    "broker.secretKey": "jobs.broker_secret_key",  # likewise
}

# Values in settings-backed sections that are no setting at all.
NOT_SETTINGS = {
    "broker.password": "goes into the Secret; the dispatcher reads the mounted file",
    "broker.runner.password": "goes into the runners' Secret; reduction pods mount it",
    "priorityClass.value": "a field of the PriorityClass object the chart creates",
    "priorityClass.preemptionPolicy": "a field of the PriorityClass object",
    "priorityClass.description": "a field of the PriorityClass object",
    "priorityClasses.values": "the value fields of the PriorityClasses the chart creates",
}

# Settings fields the chart never renders.
NOT_RENDERED = {
    "identity": "the pod name, from the Deployment's env (AUTOREDUCE_IDENTITY)",
    "fault_point": "the fault suite's alone; never something a chart can switch on",
    "broker.password": "only ever a mounted file (broker.password_file)",
    # The Job template mounts archive volumes read-only and output volumes read-write
    # whatever this field says, so the chart offers no value for it.
    "runner.archive_volumes.*.read_only": "ignored by the Job template",
    "runner.output_volumes.*.read_only": "ignored by the Job template",
    "instruments.*.archive_volumes.*.read_only": "ignored by the Job template",
    "instruments.*.output_volumes.*.read_only": "ignored by the Job template",
}

# (value, what differs) -> why the chart's schema deliberately differs from the model.
DELIBERATE_CONSTRAINTS = {
    ("httpPort", "lower bound"): (
        "0 disables the http server in the model; the chart's probes and Service need "
        "the port, so the schema starts at 1"
    ),
    ("logLevel", "enum"): (
        "main() upper-cases any name logging knows (so `debug` works in the environment); "
        "the chart offers the five standard names as written"
    ),
}

# Settings whose chart default deliberately differs from the model's, and why.
DELIBERATE_DEFAULTS = {
    "broker.hosts": "the chart names the in-cluster broker Service; the model's "
    "127.0.0.1 suits a dispatcher run by hand next to a local broker",
    "broker.username": "the site's user; the model's is ActiveMQ's out-of-the-box one",
    "broker.password_file": "in a cluster the password is always the mounted Secret",
    "broker.password": "read from that file",
    "jobs.namespace": "the release namespace, which values cannot know",
    "jobs.broker_secret_name": "the Secret the release creates, named after the release",
    "log_json": "log collectors in a cluster read JSON lines; a terminal wants text",
}

# Volume entries in values use camelCase keys; everything else keeps its shape.
VOLUME_KEYS = {"name": "name", "mountPath": "mount_path", "source": "source"}


def _volumes(value: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{VOLUME_KEYS[k]: v for k, v in volume.items()} for volume in value]


def _instrument(suffix: str) -> dict[str, Any]:
    return {
        "image": {"repository": f"registry.example/runner-{suffix}", "tag": "6.11"},
        "resources": {"requests": {"cpu": "8", "memory": "32Gi"}, "limits": {"memory": "64Gi"}},
        "nodeSelector": {"pool": f"large-{suffix}"},
        "tolerations": [{"key": "big", "operator": "Exists", "effect": "NoSchedule"}],
        "activeDeadlineSeconds": 28800,
        "archiveVolumes": [
            {"name": f"{suffix}-raw", "mountPath": "/raw", "source": {"emptyDir": {}}}
        ],
        "outputVolumes": [
            {
                "name": f"{suffix}-out",
                "mountPath": "/out",
                "source": {"persistentVolumeClaim": {"claimName": f"{suffix}-out"}},
            }
        ],
        "env": {"MANTID_THREADS": "8"},
        "maxRunning": 2,
        "oomRetry": {"factor": 1.5, "maxMemory": "128Gi"},
    }


# Every value that feeds a setting, each different from its default in values.yaml so
# that seeing it in settings.yaml proves it went where the map says.
EVERY_VALUE: dict[str, Any] = {
    "broker": {
        "hosts": ["amq-a.example:61613", "amq-b.example:61614"],
        "username": "reducer",
        "existingSecret": "site-broker",
        "secretKey": "stomp-password",
        "runner": {"username": "reducer-runner", "existingSecret": "site-broker-runner",
                   "secretKey": "runner-password"},
        "heartbeatMs": 4000,
        "receiptTimeoutSeconds": 7.5,
        "outcomeReceiptTimeoutSeconds": 90,
        "reconnectInitialSeconds": 0.25,
        "reconnectMaxSeconds": 12,
        "queues": {
            "pending": "/queue/Site.Pending",
            "started": "/queue/Site.Started",
            "complete": "/queue/Site.Complete",
            "error": "/queue/Site.Error",
            "skipped": "/queue/Site.Skipped",
            "deadLetter": "/queue/Site.Pending.DLQ",
        },
        # One CA source (the chart refuses both); test_chart_render.py renders caBundle.
        "tls": {
            "enabled": True,
            "existingCaConfigMap": "site-broker-ca",
            "caKey": "bundle.pem",
            "clientCertSecret": "dispatcher-tls",
            "runnerClientCertSecret": "runner-tls",
        },
    },
    "jobs": {
        "labelPrefix": "reduction.example.org",
        "ttlSecondsAfterFinished": 3600,
        "cancelMarkerTtlSeconds": 0,
        "posterSidecar": False,
        "inlineMessageMaxBytes": 4096,
    },
    "jobTemplate": DEFAULT_TEMPLATE.read_text(),
    "runner": {
        "image": {"repository": "registry.example/runner", "tag": "7.1", "pullPolicy": "Always"},
        "command": ["python", "-m", "site_runner"],
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "16Gi"}},
        "nodeSelector": {"pool": "reduction"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "reduction"}],
        "activeDeadlineSeconds": 7200,
        "archiveVolumes": [
            {
                "name": "archive",
                "mountPath": "/archive",
                "source": {"nfs": {"server": "nfs.example", "path": "/archive"}},
            }
        ],
        "outputVolumes": [
            {
                "name": "output",
                "mountPath": "/output",
                "source": {"persistentVolumeClaim": {"claimName": "output"}},
            }
        ],
        "env": {"SITE": "example"},
        "priorityClassName": "reduction-high",
        "runAsUser": 2000,
        "runAsGroup": 3000,
        "oomRetry": {"factor": 3, "maxMemory": "48Gi"},
    },
    "instruments": {"wish": _instrument("wish")},
    "caps": {"maxRunning": 12},
    "retries": {"mode": "upstream", "maxAttempts": 5, "delaySeconds": 60},
    "priorityClasses": {"runDetection": "pc-detect", "manual": "pc-manual", "rerun": "pc-rerun"},
    "imagePullGraceSeconds": 120,
    "concurrency": 4,
    "directAdmission": False,
    "api": {"qps": 25.5, "burst": 40},
    "resyncSeconds": 120,
    "httpPort": 9102,
    "logJson": False,
    "logLevel": "DEBUG",
    "maxMessageBytes": 500000,
    "runnerConfig": {"timeout_s": 60},
}


# -- walking the schema and the models -------------------------------------------------


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].removeprefix("#/definitions/")]
    return node


def schema_node(values_path: str) -> dict[str, Any]:
    node = SCHEMA
    for part in values_path.split("."):
        node = _resolve(node)
        node = node["additionalProperties"] if part == "*" else node["properties"][part]
    return _resolve(node)


def schema_leaves(node: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted paths of the schema's values, "*" for the instruments' names."""
    node = _resolve(node)
    extra = node.get("additionalProperties")
    if "properties" in node:
        for name, child in node["properties"].items():
            yield from schema_leaves(child, f"{prefix}{name}.")
    elif isinstance(extra, dict) and "properties" in _resolve(extra):
        yield from schema_leaves(extra, f"{prefix}*.")
    else:
        yield prefix.rstrip(".")


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without None, whether None is allowed)."""
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return annotation, False


def _model(annotation: Any) -> type[BaseModel] | None:
    inner, _ = _unwrap(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def settings_field(settings_path: str) -> FieldInfo:
    """The pydantic field at a dotted settings path ("*": any key or item)."""
    annotation: Any = DispatcherSettings
    field: FieldInfo | None = None
    for part in settings_path.split("."):
        if part == "*":
            annotation = get_args(_unwrap(annotation)[0])[-1]
            continue
        model = _model(annotation)
        if model is None or part not in model.model_fields:
            raise AssertionError(
                f"setting {settings_path} is no field of dispatcher/config.py "
                f"DispatcherSettings: fix the map in {HERE} (or the field in config.py)"
            )
        field = model.model_fields[part]
        annotation = field.annotation
    assert field is not None
    return field


def key_problems(
    data: Any, annotation: Any, path: str = ""
) -> Iterator[tuple[Literal["unknown", "missing"], str]]:
    """Keys of rendered settings that are no model field, and fields left out, at
    every level (the nested models ignore unknown keys, so loading alone misses a typo
    below the top level)."""
    inner, _ = _unwrap(annotation)
    if data is None:
        return
    if get_origin(inner) is list:
        for item in data:
            yield from key_problems(item, get_args(inner)[0], f"{path}*.")
    elif get_origin(inner) is dict:
        for item in data.values():
            yield from key_problems(item, get_args(inner)[1], f"{path}*.")
    elif (model := _model(inner)) is not None:
        for key in data:
            if key not in model.model_fields:
                yield "unknown", f"{path}{key}"
        for name, field in model.model_fields.items():
            if name in data:
                yield from key_problems(data[name], field.annotation, f"{path}{name}.")
            else:
                yield "missing", f"{path}{name}"


def lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if part == "*":
            (data,) = data.values()
        else:
            data = data[part]
    return data


def covered(values_path: str, entries: dict[str, Any]) -> bool:
    return any(values_path == e or values_path.startswith(e + ".") for e in entries)


# -- values.schema.json ----------------------------------------------------------------


def test_every_settings_value_in_the_schema_maps_to_a_setting() -> None:
    """A value added to a settings-backed section of the schema fails here until this
    map says which setting it feeds; a stale map entry fails too."""
    sections = {path.split(".")[0] for path in {**SETTING_OF_VALUE, **DERIVED}}
    leaves = [p for p in schema_leaves(SCHEMA) if p.split(".")[0] in sections]
    known = {**SETTING_OF_VALUE, **DERIVED, **NOT_SETTINGS}
    unmapped = [p for p in leaves if not covered(p, known)]
    assert not unmapped, (
        f"helm/autoreduce/values.schema.json values {unmapped} feed no known setting: "
        f"add each to SETTING_OF_VALUE, DERIVED or NOT_SETTINGS in {HERE}"
    )
    stale = [e for e in known if not any(p == e or p.startswith(e + ".") for p in leaves)]
    assert not stale, f"{HERE} maps values the schema does not have: {stale}"
    for settings_path in {**SETTING_OF_VALUE, **DERIVED}.values():
        settings_field(settings_path)


def _schema_facts(node: dict[str, Any]) -> tuple[set[str], bool]:
    types = node.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    return types - {"null"}, "null" in types


def _json_type(annotation: Any) -> str:
    if annotation is bool:
        return "boolean"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number"
    if annotation in (str, Path) or get_origin(annotation) is Literal:
        return "string"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "string"
    if get_origin(annotation) is list:
        return "array"
    if get_origin(annotation) is dict or _model(annotation) is not None:
        return "object"
    raise AssertionError(f"{HERE} does not know the JSON type of {annotation!r}")


def _model_enum(annotation: Any) -> set[Any] | None:
    if get_origin(annotation) is Literal:
        return set(get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return {member.value for member in annotation}
    return None


Bound = tuple[float, bool]  # (limit, inclusive)


def _bound(
    inclusive: float | None, exclusive: float | None, *, integer: bool, step: int
) -> Bound | None:
    """One side of a range; for integers an exclusive limit is the next inclusive one."""
    if exclusive is not None:
        return (exclusive + step, True) if integer else (exclusive, False)
    return None if inclusive is None else (inclusive, True)


def _model_bounds(field: FieldInfo, *, integer: bool) -> tuple[Bound | None, Bound | None]:
    limits: dict[str, float] = {}
    for item in field.metadata:
        for cls, name in ((Ge, "ge"), (Gt, "gt"), (Le, "le"), (Lt, "lt")):
            if isinstance(item, cls):
                limits[name] = getattr(item, name)
    return (
        _bound(limits.get("ge"), limits.get("gt"), integer=integer, step=1),
        _bound(limits.get("le"), limits.get("lt"), integer=integer, step=-1),
    )


def _schema_bounds(node: dict[str, Any], *, integer: bool) -> tuple[Bound | None, Bound | None]:
    return (
        _bound(node.get("minimum"), node.get("exclusiveMinimum"), integer=integer, step=1),
        _bound(node.get("maximum"), node.get("exclusiveMaximum"), integer=integer, step=-1),
    )


def constraint_mismatches(values_path: str) -> Iterator[tuple[str, Any, Any]]:
    """(what differs, the schema's, the model's) for one mapped value."""
    node = schema_node(values_path)
    field = settings_field(SETTING_OF_VALUE[values_path])
    annotation, model_nullable = _unwrap(field.annotation)
    types, schema_nullable = _schema_facts(node)
    if types != {_json_type(annotation)}:
        yield "type", sorted(types), _json_type(annotation)
    if schema_nullable and not model_nullable:
        yield "null", "allowed", "rejected"
    schema_enum = set(node["enum"]) if "enum" in node else None
    if schema_enum != _model_enum(annotation):
        yield "enum", schema_enum, _model_enum(annotation)
    integer = annotation is int
    schema_lower, schema_upper = _schema_bounds(node, integer=integer)
    model_lower, model_upper = _model_bounds(field, integer=integer)
    if schema_lower != model_lower:
        yield "lower bound", _show(schema_lower, ">"), _show(model_lower, ">")
    if schema_upper != model_upper:
        yield "upper bound", _show(schema_upper, "<"), _show(model_upper, "<")


def _show(bound: Bound | None, side: str) -> str:
    if bound is None:
        return "no limit"
    limit, inclusive = bound
    return f"{side}{'=' if inclusive else ''} {limit}"


@pytest.mark.parametrize("values_path", sorted(SETTING_OF_VALUE))
def test_schema_states_the_settings_models_types_and_limits(values_path: str) -> None:
    settings_path = SETTING_OF_VALUE[values_path]
    problems = []
    for aspect, schema_says, model_says in constraint_mismatches(values_path):
        if (values_path, aspect) in DELIBERATE_CONSTRAINTS:
            continue
        problems.append(
            f"{aspect}: helm/autoreduce/values.schema.json {values_path} says {schema_says}, "
            f"dispatcher/config.py {settings_path} says {model_says}"
        )
    assert not problems, (
        "\n".join(problems) + "\nfix values.schema.json (or config.py, if the chart is "
        f"right), or list ({values_path!r}, aspect) in DELIBERATE_CONSTRAINTS in {HERE}"
    )


def test_deliberate_constraint_differences_are_still_differences() -> None:
    for (values_path, aspect), why in DELIBERATE_CONSTRAINTS.items():
        aspects = {a for a, _, _ in constraint_mismatches(values_path)}
        assert aspect in aspects, (
            f"{values_path}: schema and model now agree on {aspect} ({why}): "
            f"drop it from DELIBERATE_CONSTRAINTS in {HERE}"
        )


def test_label_prefix_rule_is_the_models() -> None:
    node = schema_node("jobs.labelPrefix")
    limit = node["maxLength"]
    # The model's rule is a validator, not a field constraint: try it at the edges.
    JobSettings(label_prefix="a" * limit)
    with pytest.raises(ValidationError):
        JobSettings(label_prefix="a" * (limit + 1))
    for sample in ("autoreduce.io", "a-b.c", "Not_A_Domain", "-a", "a.", "a..b"):
        schema_accepts = re.fullmatch(node["pattern"], sample) is not None
        try:
            JobSettings(label_prefix=sample)
            model_accepts = True
        except ValidationError:
            model_accepts = False
        assert schema_accepts == model_accepts, (
            f"jobs.labelPrefix {sample!r}: values.schema.json "
            f"{'accepts' if schema_accepts else 'rejects'} it, dispatcher/config.py "
            f"JobSettings.label_prefix {'accepts' if model_accepts else 'rejects'} it"
        )


# -- values.yaml and _helpers.tpl, rendered --------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No AUTOREDUCE_* from the caller's environment: it would override the file."""
    for name in list(os.environ):
        if name.startswith("AUTOREDUCE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def _every_value_docs(tmp_path: Path) -> list[dict[str, Any]]:
    values_file = tmp_path / "every-value.yaml"
    values_file.write_text(yaml.safe_dump(EVERY_VALUE))
    return render(values_file)


def _leaf_differences(ours: Any, theirs: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in ours.keys() | theirs.keys():
            yield from _leaf_differences(ours.get(key), theirs.get(key), f"{prefix}{key}.")
    elif ours != theirs:
        yield prefix.rstrip(".")


def test_values_yaml_defaults_are_the_settings_models_defaults(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    model_defaults = load_settings(config_file=None).model_dump(mode="json")
    docs = render(CHART / "ci" / "default-values.yaml")
    chart_defaults = load_rendered_settings(docs, tmp_path, clean_env).model_dump(mode="json")
    differences = set(_leaf_differences(chart_defaults, model_defaults))
    unexpected = sorted(differences - set(DELIBERATE_DEFAULTS))
    assert not unexpected, "\n".join(
        f"helm/autoreduce/values.yaml gives {path} = {lookup(chart_defaults, path)!r}, "
        f"dispatcher/config.py defaults it to {lookup(model_defaults, path)!r}"
        for path in unexpected
    ) + (
        "\nchange the default in values.yaml (or config.py), or list the setting in "
        f"DELIBERATE_DEFAULTS in {HERE} with why"
    )
    stale = sorted(set(DELIBERATE_DEFAULTS) - differences)
    assert not stale, f"chart and model now agree on {stale}: drop them from DELIBERATE_DEFAULTS"


@pytest.mark.parametrize("values", ["defaults", "every-value"])
def test_rendered_settings_name_every_field_and_nothing_else(
    values: str, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    if values == "defaults":
        docs = render(CHART / "ci" / "default-values.yaml")
        # Without jobTemplate the dispatcher uses the template built into its image.
        allowed_missing = {**NOT_RENDERED, "jobs.template_path": "the image's own"}
    else:
        docs = _every_value_docs(tmp_path)
        allowed_missing = NOT_RENDERED
    rendered = yaml.safe_load(dispatcher_config_map(docs)["data"]["settings.yaml"])
    problems = list(key_problems(rendered, DispatcherSettings))
    unknown = [path for kind, path in problems if kind == "unknown"]
    assert not unknown, (
        f"settings.yaml keys {unknown} are no fields of dispatcher/config.py "
        f"DispatcherSettings: fix {HELPERS}"
    )
    missing = [path for kind, path in problems if kind == "missing"]
    unrendered = [path for path in missing if path not in allowed_missing]
    assert not unrendered, (
        f"dispatcher/config.py fields {unrendered} are not rendered by the chart: give them "
        f"a value (values.yaml, values.schema.json, {HELPERS}) or list them in NOT_RENDERED "
        f"in {HERE} with why"
    )
    # And the dispatcher's own loader takes the file (types, limits, validators).
    load_rendered_settings(docs, tmp_path, clean_env)


def test_every_value_lands_in_its_setting(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    docs = _every_value_docs(tmp_path)
    rendered = yaml.safe_load(dispatcher_config_map(docs)["data"]["settings.yaml"])
    wrong = []
    for values_path, settings_path in SETTING_OF_VALUE.items():
        value = lookup(EVERY_VALUE, values_path)
        if "*" not in values_path:
            assert value != lookup(VALUES, values_path), (
                f"EVERY_VALUE in {HERE} sets {values_path} to its default: pick another value"
            )
        expected = _volumes(value) if values_path.endswith("Volumes") else value
        got = lookup(rendered, settings_path)
        if got != expected:
            wrong.append(f"{values_path} = {expected!r} rendered {settings_path} = {got!r}")
    assert not wrong, "\n".join(wrong) + f"\nfix {HELPERS} (or the map in {HERE})"
    settings = load_rendered_settings(docs, tmp_path, clean_env)
    assert settings.runner.image == "registry.example/runner:7.1"
    assert settings.instruments["WISH"].image == "registry.example/runner-wish:6.11"
    assert str(settings.jobs.template_path) == f"{config_mount(docs)}/job.yaml.j2"
    assert settings.jobs.runner_config_map == f"{RELEASE}-autoreduce-runner"
    assert (settings.jobs.broker_ca_config_map, settings.jobs.broker_ca_key) == (
        "site-broker-ca",
        "bundle.pem",
    )
    tls = settings.broker.tls
    assert tls.ca_file == Path(pod_contract.BROKER_CA_FILE)
    assert (tls.cert_file, tls.key_file) == (
        Path(pod_contract.BROKER_CLIENT_CERT_FILE),
        Path(pod_contract.BROKER_CLIENT_KEY_FILE),
    )
