"""The ``helm test`` canary's judgement, and its wait riding out a broker blip.

A CI run failed the canary when a missed heartbeat (a loaded 2-core node) dropped the
canary's broker connection under a browse: the client reconnected at once, but the
canary had already reported "broker: subscribe ... failed". The wait now browses again
on the next poll. The shell's two reads (``final_outcomes``, ``job_state``) are
replaced by stand-ins here; the real broker and cluster are in the chart test.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from autoreduce_common.messages import Outcome
from autoreduce_common.stomp_client import BrokerError

from autoreduce_cli import canary
from autoreduce_cli.rows import FINISHED, RUNNING

KEY = canary.canary_key(instrument="canary", rb="CANARY", run=123)
MESSAGE = canary.canary_message(instrument="canary", rb="CANARY", run=123, data="/isis/x.nxs")


class Ctx:
    def __init__(self) -> None:
        self.said: list[str] = []
        queues = SimpleNamespace(pending="/queue/ReductionPending")
        self.settings = SimpleNamespace(broker=SimpleNamespace(queues=queues))

    def progress(self, text: str) -> None:
        self.said.append(text)


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(canary.time, "sleep", lambda _s: None)


def test_a_dropped_broker_connection_under_a_browse_is_browsed_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answers: list[Any] = [BrokerError("subscribe failed: protocol is shutdown"), [],
                          [(Outcome.SKIPPED, {"message": "in SKIP_RUNS"})]]  # fmt: skip

    def outcomes(_ctx: Any, _key: Any) -> list[tuple[Outcome, dict[str, Any]]]:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    monkeypatch.setattr(canary, "final_outcomes", outcomes)
    monkeypatch.setattr(canary, "job_state", lambda _ctx, _name: (RUNNING, "", None))
    ctx = Ctx()
    verdict = canary.watch(ctx, KEY, MESSAGE, timeout=60)  # type: ignore[arg-type]
    assert verdict.ok, verdict.text
    assert any("protocol is shutdown; browsing again" in line for line in ctx.said)


def test_a_broker_that_stays_away_ends_in_the_timeout_not_a_hang(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter(float(t) for t in range(1000))
    monkeypatch.setattr(canary.time, "monotonic", lambda: next(clock))

    def outcomes(_ctx: Any, _key: Any) -> list[tuple[Outcome, dict[str, Any]]]:
        raise BrokerError("connect failed")

    monkeypatch.setattr(canary, "final_outcomes", outcomes)
    monkeypatch.setattr(canary, "job_state", lambda _ctx, _name: (RUNNING, "", None))
    verdict = canary.watch(Ctx(), KEY, MESSAGE, timeout=5)  # type: ignore[arg-type]
    assert not verdict.ok
    assert "no outcome for the canary run after 5 s" in verdict.text


def test_one_skipped_outcome_passes_and_two_outcomes_fail() -> None:
    skipped = (Outcome.SKIPPED, {"message": "in SKIP_RUNS"})
    assert canary.judge_messages([skipped]).ok
    two = canary.judge_messages([skipped, (Outcome.COMPLETE, {})])
    assert not two.ok and "2 final outcomes" in two.text
    error = canary.judge_messages([(Outcome.ERROR, {"message": "boom"})])
    assert not error.ok and "ReductionError, want ReductionSkipped: boom" in error.text


def test_a_finished_job_without_a_report_fails_with_the_job_state() -> None:
    verdict = canary.judge_report(None, job_state=FINISHED)
    assert not verdict.ok and "without a runner termination report" in verdict.text
