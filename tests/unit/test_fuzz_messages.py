"""Property-based tests of the pure core against hostile input (issue 9).

Whatever a producer sends: ``parse_run`` raises MessageError or returns a message;
an accepted message always yields a valid DNS-1123 Job name and valid label values;
the rendered Job is valid YAML carrying exactly the values it was given (nothing
injected through quotes, newlines, ``{{ }}`` or unicode).
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from autoreduce_common.messages import MessageError, parse_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.config import DispatcherSettings
from dispatcher.identity import Labels, RunKey, job_name, lease_name, run_key
from dispatcher.manifests import (
    Arrival,
    load_template,
    owned_by,
    render_config_map,
    render_job,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
NASTY = [
    "", " ", "\n", "\r\n", "\x00", '"', "'", "{{ 7*7 }}", "{% raw %}", "${HOME}", "$(HOME)",
    "a: b", "- x", "#", "&anchor", "*alias", "!!python/object", "\u202e", "😀", "ü",
    "../", "\\\\isis\\", "x" * 300, "1e9", "-1", "0x10", "  12  ", "007", "true", "null",
]
REQUIRED = {
    "data": "/isis/NDXWISH/x.nxs",
    "facility": "ISIS",
    "instrument": "WISH",
    "rb_number": "1234567",
    "run_number": 12345,
    "reduction_script": "def main(input_file, output_dir): pass",
    "reduction_arguments": {"standard_vars": {}, "advanced_vars": {}},
}

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars | st.sampled_from(NASTY),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
hostile_text = st.sampled_from(NASTY) | st.text(max_size=80) | st.builds(
    lambda a, b: a + b, st.sampled_from(NASTY), st.text(max_size=20)
)
field_value = json_values | hostile_text | st.integers(min_value=-(10**15), max_value=10**15)


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """A run message with some fields replaced, dropped or added at random."""
    message: dict[str, Any] = dict(REQUIRED)
    for name in draw(st.lists(st.sampled_from([*REQUIRED, "run_version", "cancel", "software",
                                               "started_by", "description"]),
                              max_size=4, unique=True)):
        if draw(st.booleans()):
            message[name] = draw(field_value)
        else:
            message.pop(name, None)
    extra = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3))
    return {**extra, **message}


def _accepts(body: bytes) -> Any:
    try:
        return parse_run(body)
    except MessageError as error:
        assert error.reason  # a reason fit for the DLQ header
        return None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_message_error(body: bytes) -> None:
    _accepts(body)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_parses_or_raises_message_error(value: Any) -> None:
    _accepts(json.dumps(value).encode())


SETTINGS = DispatcherSettings.model_validate({"jobs": {"namespace": "fuzz"}})
TEMPLATE = load_template(SETTINGS.jobs.template_path)


def _check_identity(key: RunKey) -> None:
    name = job_name(key)
    assert len(name) <= 63 and DNS_LABEL.match(name), name
    lease = lease_name(key.rb_number)
    assert len(lease) <= 63 and DNS_LABEL.match(lease), lease
    for value in Labels("autoreduce.io").for_run(key).values():
        assert len(value) <= 63 and LABEL_VALUE.match(value), value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages())
def test_accepted_messages_give_valid_names_and_exact_manifests(message: dict[str, Any]) -> None:
    parsed = _accepts(json.dumps(message).encode())
    if parsed is None or parsed[1].cancel:
        return
    raw, validated = parsed
    key = run_key(validated)
    _check_identity(key)
    job = render_job(settings=SETTINGS, template=TEMPLATE, key=key,
                     arrival=Arrival(priority=4, enqueued_ms=0, message_id="ID:x"))
    assert job["metadata"]["name"] == job_name(key)
    assert job["metadata"]["labels"] == Labels("autoreduce.io").for_run(key)
    assert job["metadata"]["annotations"]["autoreduce.io/run"] == key.describe()
    config_map = owned_by(render_config_map(settings=SETTINGS, key=key, raw=raw),
                          job_uid="uid", job=job_name(key))
    # The ConfigMap carries the message byte for byte (as JSON), nothing else.
    assert json.loads(config_map["data"]["message.json"]) == raw
    # Round trip through YAML (what kubectl/the API would see) changes nothing.
    assert yaml.safe_load(yaml.safe_dump(job)) == job


run_keys = st.builds(
    RunKey,
    facility=st.text(max_size=30),
    instrument=st.text(max_size=80),
    runs=st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=5).map(
        lambda runs: tuple(sorted(set(runs)))),
    version=st.integers(min_value=0, max_value=10_000),
    rb_number=st.text(max_size=80),
)


@settings(max_examples=300, deadline=None)
@given(run_keys, st.text(max_size=300), st.integers(), st.text(max_size=40))
def test_render_never_injects_even_from_unvalidated_keys(
    key: RunKey, message_id: str, enqueued: int, description: str,
) -> None:
    """Defence in depth: even values validation would refuse render as plain values."""
    job = render_job(settings=SETTINGS, template=TEMPLATE, key=key,
                     arrival=Arrival(priority=9, enqueued_ms=enqueued, message_id=message_id))
    assert job["kind"] == "Job" and job["spec"]["suspend"] is True
    labels = job["metadata"]["labels"]
    assert labels["autoreduce.io/rb-number"] == key.rb_number
    assert labels["autoreduce.io/instrument"] == key.instrument
    annotations = job["metadata"]["annotations"]
    assert annotations["autoreduce.io/message-id"] == message_id[:250]
    assert annotations["autoreduce.io/enqueued-at"] == str(enqueued)
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(job["spec"]["template"]["spec"]) == {
        "restartPolicy", "activeDeadlineSeconds", "automountServiceAccountToken",
        "enableServiceLinks", "securityContext", "nodeSelector", "tolerations", "containers",
        "initContainers", "volumes"}
    name = job_name(key)
    assert len(name) <= 63 and DNS_LABEL.match(name), name


INJECTIONS = [
    "1234567\nkind: Pod", '12"34', "{{ job.name }}", "12: 34", "1" * 41, "١٢٣", "12 34",
    "rb\u202e", "12/34", "-1", "0x1F", "",
]


def test_hostile_names_are_refused_at_validation() -> None:
    for field in ("rb_number", "instrument", "run_number", "facility"):
        for value in INJECTIONS:
            body = json.dumps({**REQUIRED, field: value}).encode()
            if field == "instrument" and value == "":
                continue  # empty instrument: "missing required field", tested below
            try:
                _, message = parse_run(body)
            except MessageError as error:
                assert field in error.reason or "missing" in error.reason, error.reason
                continue
            # Accepted: it must be a plain, safe value (e.g. "-1" as a label is refused).
            key = run_key(message)
            _check_identity(key)


def test_empty_required_fields_are_missing() -> None:
    for field in REQUIRED:
        body = json.dumps({**REQUIRED, field: ""}).encode()
        try:
            parse_run(body)
        except MessageError as error:
            assert field in error.reason, error.reason
        else:
            assert field == "facility"  # an empty facility means the default, ISIS
