"""The one exclusivity judge (tests/harness/checks.py) over hand-built Jobs and spans.

It replaced two that disagreed: the integration tests' check counted a Job from its
``startTime`` to its ``completionTime`` (and skipped a Job without one), the fault
suite's counted no Job times at all, only the scripts' and the containers' spans. A run
holds its RB from its start until its Job's final Complete or Failed condition: that
condition is what lets the dispatcher hand the RB on (``admission.is_finished``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from tests.harness.checks import (
    Overlap,
    container_span,
    end_unrecorded,
    exclusivity_violations,
    job_hold,
)

Obj = dict[str, Any]


def stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Verdicts = tuple[tuple[str, float], ...]  # (condition type, when it turned True)


def job(run: int, rb: str, *, start: float | None = None, verdicts: Verdicts = (),
        completion: float | None = None, deleting: bool = False) -> Obj:
    metadata: Obj = {"name": f"run-{run}", "labels": {"autoreduce.io/run-number": str(run),
                                                      "autoreduce.io/rb-number": rb}}
    if deleting:
        metadata["deletionTimestamp"] = stamp(1)
    status: Obj = {"conditions": [{"type": kind, "status": "True", "lastTransitionTime": stamp(at)}
                                  for kind, at in verdicts]}
    if start is not None:
        status["startTime"] = stamp(start)
    if completion is not None:
        status["completionTime"] = stamp(completion)
    return {"metadata": metadata, "status": status}  # fmt: skip


def attempt(run: int, start: float, end: float, attempt_id: str = "") -> list[Obj]:
    path = f"/instrument/WISH/RB1/WISH{run:08d}.nxs"
    return [{"event": "start", "file": path, "t": start, "pid": attempt_id},
            {"event": "end", "file": path, "t": end, "pid": attempt_id}]  # fmt: skip


def test_a_hand_off_before_the_holders_final_condition_is_a_violation() -> None:
    """The case the two judges disagreed on. Run 1's script ends at 104 and its Job
    meets its success criteria at 105, but its final condition (Complete, with the
    same completionTime) is written at 112, once its pod has stopped; run 2 starts at
    108. The fault suite's judge saw no overlap (the scripts never met), the integration
    check saw one (108 < 112). The dispatcher must hold the RB until 112: a violation."""
    jobs = [
        job(1, "1", start=100, verdicts=(("SuccessCriteriaMet", 105), ("Complete", 112)),
            completion=112),
        job(2, "1", start=108, verdicts=(("SuccessCriteriaMet", 110), ("Complete", 111)),
            completion=111),
    ]
    timeline = attempt(1, 101, 104) + attempt(2, 109, 110)
    assert exclusivity_violations(jobs=jobs, timeline=timeline) == [
        Overlap(rb="1", record="Job holds", count=1, spans=[(100, 112), (108, 111)])
    ]


def test_a_failed_holder_is_judged_though_it_has_no_completion_time() -> None:
    """A killed, evicted or timed-out run ends Failed, without a completionTime: the
    integration check skipped it, so its successor starting early went unseen."""
    jobs = [
        job(1, "1", start=100, verdicts=(("FailureTarget", 110), ("Failed", 130))),
        job(2, "1", start=120, verdicts=(("Complete", 140),), completion=140),
    ]
    assert job_hold(jobs[0]) == (100, 130)
    found = exclusivity_violations(jobs=jobs, timeline=[])
    assert [(o.rb, o.record, o.count) for o in found] == [("1", "Job holds", 1)]


def test_handing_on_at_the_final_condition_is_no_violation() -> None:
    """Start in the same whole second as the holder's verdict: times are whole seconds,
    rounded down alike, so this is a hand-off after it. A Job never started (cancelled
    while waiting) or deleted before its verdict holds nothing by its own record."""
    jobs = [
        job(1, "1", start=100, verdicts=(("FailureTarget", 110), ("Failed", 130))),
        job(2, "1", start=130, verdicts=(("Complete", 140),), completion=140),
        job(3, "1"),
        job(4, "1", start=90, deleting=True),
        job(5, "2", start=100, verdicts=(("Complete", 200),), completion=200),
    ]
    assert job_hold(jobs[2]) is None and job_hold(jobs[3]) is None
    assert exclusivity_violations(jobs=jobs, timeline=[]) == []


def test_a_holder_without_a_verdict_holds_its_rb_open_ended() -> None:
    jobs = [job(1, "1", start=100), job(2, "1", start=150, verdicts=(("Complete", 160),))]
    assert job_hold(jobs[0]) == (100, float("inf"))
    assert [o.count for o in exclusivity_violations(jobs=jobs, timeline=[])] == [1]


def test_script_attempts_and_containers_are_judged_each_on_their_own() -> None:
    """A retried run's attempts are separate spans (run 1 before and after run 2 is no
    overlap); scripts that did meet, and containers that did, are each reported."""
    jobs = [job(1, "1"), job(2, "1"), job(3, "2"), job(4, "2")]
    retried = attempt(1, 0, 1, "a") + attempt(2, 1.5, 2, "b") + attempt(1, 3, 4, "c")
    assert exclusivity_violations(jobs=jobs, timeline=retried) == []
    met = attempt(3, 0, 5, "d") + attempt(4, 4, 6, "e")
    found = exclusivity_violations(jobs=jobs, timeline=retried + met,
                                   pod_spans={"1": [(0, 10), (9, 12)]})
    assert [(o.rb, o.record, o.count) for o in found] == [
        ("2", "script attempts", 1), ("1", "runner containers", 1)]


def pod_with(state: Obj) -> Obj:
    return {"status": {"containerStatuses": [{"name": "runner", "state": state}]}}


def test_a_container_the_kubelet_lost_has_an_unrecorded_end_not_an_endless_span() -> None:
    # An evicted pod whose container was removed before its end was recorded.
    lost = pod_with({"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown"}})
    assert end_unrecorded(lost) and container_span(lost) is None
    running = pod_with({"running": {"startedAt": stamp(100)}})
    assert not end_unrecorded(running) and container_span(running) == (100, float("inf"))
    ended = pod_with({"terminated": {"startedAt": stamp(100), "finishedAt": stamp(104)}})
    assert not end_unrecorded(ended) and container_span(ended) == (100, 104)
