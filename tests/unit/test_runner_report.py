"""Outcome messages, bounded logs, termination messages and exit codes (pure)."""

from __future__ import annotations

import json

import pytest
from autoreduce_common.broker_settings import QueueNames
from autoreduce_common.messages import Outcome
from autoreduce_common.pod_contract import ExitCode, Stage
from autoreduce_runner.report import (
    RunResult,
    error,
    exit_code,
    outcome_message,
    termination_report,
)
from autoreduce_runner.supervise import BoundedCapture

RAW = {"run_number": 7, "rb_number": 1234567, "unknown": {"kept": True}, "retry_in": 600,
       "message": "stale", "reduction_data": ["/old"]}


def test_outcome_message_echoes_and_overwrites_stale_fields() -> None:
    result = RunResult(outcome=Outcome.COMPLETE, reduction_data=["/out/a"], reduction_log="log")
    body = outcome_message(RAW, result=result, admin_log="admin", reduction_log_cap=1000,
                           admin_log_cap=1000)
    assert body["unknown"] == {"kept": True} and body["rb_number"] == 1234567
    assert body["retry_in"] is None and body["message"] is None
    assert body["reduction_data"] == ["/out/a"]
    assert (body["reduction_log"], body["admin_log"]) == ("log", "admin")
    assert RAW["retry_in"] == 600  # the original is not modified


def test_error_keeps_retry_in_and_logs_are_bounded() -> None:
    result = error("Permission problem", retry_in=21600, reduction_log="x" * 10_000)
    body = outcome_message(RAW, result=result, admin_log="y" * 5000, reduction_log_cap=1000,
                           admin_log_cap=500)
    assert body["retry_in"] == 21600 and body["message"] == "Permission problem"
    assert body["reduction_data"] == []
    assert len(body["reduction_log"]) == 1000 and "characters cut" in body["reduction_log"]
    assert len(body["admin_log"]) == 500


@pytest.mark.parametrize(
    ("result", "posted", "code"),
    [
        (RunResult(outcome=Outcome.COMPLETE), True, ExitCode.POSTED_OK),
        (RunResult(outcome=Outcome.SKIPPED), True, ExitCode.POSTED_OK),
        (error("x"), True, ExitCode.POSTED_ERROR),
        (error("x", retry_in=60), True, ExitCode.POSTED_RETRY),
        (error("x"), False, ExitCode.NOT_POSTED),
        (None, False, ExitCode.NOT_POSTED),
    ],
)
def test_exit_codes(result: RunResult | None, posted: bool, code: ExitCode) -> None:
    assert exit_code(result, posted=posted) is code


def test_exit_code_values_are_the_documented_ones() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 4]


def test_each_outcome_has_its_own_queue() -> None:
    q = QueueNames(started="/queue/S", complete="/queue/C", error="/queue/E", skipped="/queue/K")
    assert q.for_outcome(Outcome.STARTED) == "/queue/S"
    assert q.for_outcome(Outcome.COMPLETE) == "/queue/C"
    assert q.for_outcome(Outcome.SKIPPED) == "/queue/K"
    assert q.for_outcome(Outcome.ERROR) == "/queue/E"
    assert len({q.for_outcome(o) for o in Outcome}) == len(Outcome)


@pytest.mark.parametrize("text", ["short", "é" * 50_000, "\U0001f600" * 50_000, "x\n" * 9999])
def test_termination_message_stays_under_4kb(text: str) -> None:
    encoded = termination_report(error(text, retry_in=21600), stage=Stage.POSTED).render()
    assert len(encoded.encode("utf-8")) < 4096
    decoded = json.loads(encoded)
    assert decoded["outcome"] == "Error" and decoded["posted"] is True
    assert decoded["retry_in"] == 21600


def test_termination_message_when_nothing_was_posted() -> None:
    decoded = json.loads(termination_report(None, stage=Stage.NONE).render())
    assert decoded == {"stage": "none", "outcome": "none", "posted": False, "retry_in": None,
                       "reason": "", "message": "", "reduction_data": []}


def test_the_report_of_a_run_being_sent_carries_its_output() -> None:
    result = RunResult(outcome=Outcome.COMPLETE, reduction_data=["/instrument/x/1"])
    report = termination_report(result, stage=Stage.SENDING, message="")
    assert (report.maybe_sent, report.posted, report.reduction_data, report.message) == (
        True, False, ["/instrument/x/1"], "")


def test_bounded_capture_keeps_head_and_tail() -> None:
    capture = BoundedCapture(limit=10)
    for chunk in (b"HEAD-", b"middle" * 100, b"-TAIL"):
        capture.add(chunk)
    text = capture.text(limit_chars=100)
    assert text.startswith("HEAD-middl") and text.endswith("dle-TAIL")
    assert "bytes cut" in text
    assert capture.total == 610


def test_bounded_capture_small_output_is_untouched() -> None:
    capture = BoundedCapture(limit=100)
    capture.add("héllo\n".encode())
    assert capture.text(limit_chars=100) == "héllo\n"


def test_bounded_capture_survives_split_utf8() -> None:
    capture = BoundedCapture(limit=3)
    capture.add("ééééé".encode())  # 10 bytes: head and tail cut inside characters
    assert "cut" in capture.text(limit_chars=100)
