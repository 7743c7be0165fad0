"""Pacing our API calls: the server's pace when it runs APF, 429s waited out, an
explicit cap kept. Clock and sleep are stand-ins; the real apiserver's 429s are in
tests/integration/test_api_pacing.py."""

from __future__ import annotations

import logging

import pytest

from dispatcher.kube import pacing
from dispatcher.kube.errors import Throttled, Unavailable, _map_status
from dispatcher.kube.pacing import Pacer, retry_after_s, server_paces, throttle_delay

APF = {"X-Kubernetes-PF-FlowSchema-UID": "fs-1", "X-Kubernetes-PF-PriorityLevel-UID": "pl-1"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Seen:
    def __init__(self) -> None:
        self.waits: list[float] = []
        self.budgets: list[float | None] = []

    def api_throttled(self, wait_s: float) -> None:
        self.waits.append(wait_s)

    def api_client_budget(self, qps: float | None) -> None:
        self.budgets.append(qps)


def pacer(clock: Clock, *, qps: float | None = None, seen: Seen | None = None) -> Pacer:
    return Pacer(qps=qps, burst=None, observer=seen, clock=clock, sleep=clock.sleep,
                 jitter=lambda: 0.0)  # fmt: skip


def test_retry_after_is_read_in_seconds_and_nonsense_is_ignored() -> None:
    assert retry_after_s("1") == 1.0
    assert retry_after_s("2.5") == 2.5
    assert retry_after_s(None) is None
    assert retry_after_s("Wed, 21 Oct 2026 07:28:00 GMT") is None
    assert retry_after_s("-3") is None
    assert retry_after_s("99999") is None


def test_the_delay_honours_retry_after_doubles_per_attempt_and_jitters_only_upwards() -> None:
    assert throttle_delay(retry_after=1.0, attempt=0, jitter=0.0) == 1.0
    assert throttle_delay(retry_after=None, attempt=0, jitter=0.0) == pacing.BACKOFF_BASE_S
    assert throttle_delay(retry_after=None, attempt=3, jitter=0.0) == 8 * pacing.BACKOFF_BASE_S
    assert throttle_delay(retry_after=None, attempt=50, jitter=0.0) == pacing.BACKOFF_CAP_S
    assert throttle_delay(retry_after=1.0, attempt=0, jitter=0.999) < 1.5
    assert throttle_delay(retry_after=1.0, attempt=0, jitter=0.999) > 1.0


def test_apf_headers_mean_the_server_paces_us() -> None:
    assert server_paces(APF)
    assert not server_paces({"Content-Type": "application/json"})


def test_until_the_server_says_it_runs_apf_the_fallback_budget_holds() -> None:
    seen = Seen()
    p = pacer(Clock(), seen=seen)
    assert p.client_qps == pacing.FALLBACK_QPS
    p.answered(APF)
    assert p.client_qps is None
    p.answered({})  # an apiserver restarted without APF, or a proxy that strips it
    assert p.client_qps == pacing.FALLBACK_QPS
    assert seen.budgets == [pacing.FALLBACK_QPS, None, pacing.FALLBACK_QPS]


def test_an_operators_cap_holds_whatever_the_server_says() -> None:
    p = pacer(Clock(), qps=20)
    p.answered(APF)
    assert p.client_qps == 20


def test_a_429_holds_every_request_until_its_wait_is_over(caplog: pytest.LogCaptureFixture
                                                          ) -> None:  # fmt: skip
    clock, seen = Clock(), Seen()
    p = pacer(clock, seen=seen)
    p.answered(APF)
    with caplog.at_level(logging.INFO, logger="dispatcher.kube"):
        delay = p.throttled(what="create Job j", retry_after=1.0, attempt=0)
        p.throttled(what="create Job k", retry_after=1.0, attempt=0)
        p.wait()  # any request, not only the refused one
        assert clock.slept == [pytest.approx(1.0)]
        p.wait()
        assert len(clock.slept) == 1  # the wait is over
        p.answered(APF)  # a success amid the spell: not its end
        p.throttled(what="create Job l", retry_after=1.0, attempt=0)
        clock.now += pacing.QUIET_S
        p.answered(APF)
    assert delay == 1.0 and seen.waits == [1.0, 1.0, 1.0]
    said = [r.getMessage() for r in caplog.records]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "throttling us (429 on create Job j, Retry-After 1 s)" in (
        warnings[0])
    assert sum("accepts our requests again after 3 throttled" in line for line in said) == 1


def test_a_429_maps_to_throttled_with_its_retry_after_and_is_still_an_unavailable() -> None:
    error = _map_status(429, b'{"reason": "TooManyRequests", "message": "too many requests"}',
                        "create Job j", retry_after="2")  # fmt: skip
    assert isinstance(error, Throttled) and isinstance(error, Unavailable)
    assert error.retry_after_s == 2.0 and error.status == 429
    assert "too many requests" in str(error)
