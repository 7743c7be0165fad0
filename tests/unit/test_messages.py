"""The message contract as pure functions."""

from __future__ import annotations

import json

import pytest
from autoreduce_common.messages import (
    MessageError,
    bound_text,
    decode_body,
    echo,
    parse_run,
    rerun,
    validate,
)


def legacy(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "data": r"\\isis\inst$\NDXWISH\Instrument\data\cycle_23_4\WISH00012345.nxs",
        "facility": "ISIS",
        "instrument": "wish",
        "rb_number": 1234567,
        "run_number": "00012345",
        "run_version": 0,
        "reduction_script": "def main(input_file, output_dir):\n    pass\n",
        "reduction_arguments": {"standard_vars": {"a": 1}, "advanced_vars": {}},
        "started_by": 0,
        "some_future_field": {"kept": True},
    }
    base.update(overrides)
    return base


def test_legacy_message_is_normalised_but_raw_is_kept() -> None:
    raw, message = parse_run(json.dumps(legacy()).encode())
    assert message.instrument == "WISH"
    assert message.rb_number == "1234567"
    assert message.run_number == 12345  # leading zeros are insignificant
    assert raw["rb_number"] == 1234567  # the producer's own type survives
    assert raw["some_future_field"] == {"kept": True}


def test_echo_keeps_unknown_fields_and_adds_outcome() -> None:
    raw, _ = parse_run(json.dumps(legacy()).encode())
    out = echo(raw, message="boom", reduction_log="log")
    assert out["some_future_field"] == {"kept": True}
    assert out["message"] == "boom"
    assert "message" not in raw


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'"text"', "not an object"),
    ],
)
def test_undecodable_bodies(body: bytes, fragment: str) -> None:
    with pytest.raises(MessageError, match=fragment):
        decode_body(body)


@pytest.mark.parametrize("missing", ["data", "instrument", "rb_number", "run_number",
                                     "reduction_script", "reduction_arguments"])
def test_missing_required_field(missing: str) -> None:
    body = legacy()
    del body[missing]
    with pytest.raises(MessageError, match=missing):
        parse_run(json.dumps(body))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rb_number", "12 34"),
        ("rb_number", "1234\nkind: Secret"),
        ("rb_number", "x" * 64),
        ("rb_number", True),
        ("instrument", "WI SH"),
        ("instrument", "{{ evil }}"),
        ("instrument", "W" * 41),
        ("run_number", -1),
        ("run_number", "12a"),
        ("run_number", True),
        ("run_number", []),
        ("run_version", "1"),
        ("run_version", -1),
        ("facility", "IS IS"),
    ],
)
def test_hostile_identity_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(MessageError, match=field):
        validate(legacy(**{field: value}))


def test_batch_runs() -> None:
    _, message = parse_run(json.dumps(legacy(run_number=[12347, "12345", 12346])))
    assert message.run_number == [12347, 12345, 12346]
    assert message.first_run == 12345


def test_cancel_needs_only_identity() -> None:
    body = {"cancel": True, "instrument": "WISH", "rb_number": 1, "run_number": 5}
    _, message = parse_run(json.dumps(body))
    assert message.cancel


def test_bound_text_keeps_head_and_tail() -> None:
    text = "HEAD" + "x" * 10_000 + "TAIL"
    bounded = bound_text(text, limit=500)
    assert len(bounded) <= 500
    assert bounded.startswith("HEAD") and bounded.endswith("TAIL")
    assert "characters cut" in bounded
    assert bound_text("short", limit=500) == "short"


def test_a_rerun_drops_the_outcome_fields_and_keeps_the_rest() -> None:
    raw = {"instrument": "WISH", "run_number": 1, "run_version": 0, "message": "boom",
           "retry_in": 60, "reduction_log": "x", "admin_log": "y", "reduction_data": ["/o"],
           "cancel": False, "custom": {"kept": True}, "description": "old"}
    again = rerun(raw, version=3, description="again")
    assert again == {"instrument": "WISH", "run_number": 1, "run_version": 3,
                     "custom": {"kept": True}, "description": "again"}
    assert rerun(raw, version=1)["description"] == "old"
    assert raw["run_version"] == 0 and raw["message"] == "boom"  # the original is untouched


def test_a_rerun_of_a_valid_run_is_a_valid_run() -> None:
    original = echo(legacy(), message="boom", retry_in=60, reduction_data=["/o"],
                    reduction_log="x", admin_log="y")
    _, message = parse_run(json.dumps(rerun(original, version=1)))
    assert message.run_version == 1 and not message.cancel
    assert message.message is None and message.retry_in is None
