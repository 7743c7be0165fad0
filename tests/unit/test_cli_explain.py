"""``autoreduce explain``: one run's story from plain API dicts (``autoreduce_cli.story``).

The real scheduler's words are asserted against the real stack in
tests/integration/test_cli.py; here every record the story reads is checked to land
in time order, once, with its source.
"""

from __future__ import annotations

from typing import Any

import pytest
from autoreduce_common.messages import Outcome
from autoreduce_common.pod_contract import Stage, TerminationReport

from autoreduce_cli.args import parser
from autoreduce_cli.cli import Context
from autoreduce_cli.story import (
    event_time,
    format_story,
    pods_named,
    selector_of,
    story_json,
    tell,
)
from dispatcher import failures
from dispatcher.config import DispatcherSettings
from dispatcher.identity import Labels
from dispatcher.kube import Forbidden

LABELS = Labels("autoreduce.io")
JOB = "red-mari-7-v0-0123abcd"
POD = f"{JOB}-x7k2p"
UNSCHEDULABLE = "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) didn't match selector."
Obj = dict[str, Any]


def job(*, failed: bool = True, verdict: failures.Verdict | None = None) -> Obj:
    annotations = {"autoreduce.io/enqueued-at": "1767225600000", "autoreduce.io/priority": "9"}
    if verdict is not None:
        annotations["autoreduce.io/outcome-verdict"] = failures.render_verdict(verdict)
    conditions = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                   "message": "Job has reached the specified backoff limit",
                   "lastTransitionTime": "2026-01-01T00:01:40Z"}] if failed else []
    return {
        "metadata": {"name": JOB, "creationTimestamp": "2026-01-01T00:00:01Z",
                     "labels": {"autoreduce.io/instrument": "MARI", "autoreduce.io/rb-number": "1",
                                "autoreduce.io/run-number": "7", "autoreduce.io/run-version": "0"},
                     "annotations": annotations},
        "spec": {"suspend": False},
        "status": {"startTime": "2026-01-01T00:00:02Z", "conditions": conditions},
    }  # fmt: skip


def pod(*, scheduled: bool) -> Obj:
    report = TerminationReport(stage=Stage.DECIDED, outcome=Outcome.COMPLETE,
                               message="not posted: stopped by SIGTERM").render()
    conditions = [{"type": "PodScheduled", "status": "True" if scheduled else "False",
                   "reason": "" if scheduled else "Unschedulable",
                   "message": "" if scheduled else UNSCHEDULABLE,
                   "lastTransitionTime": "2026-01-01T00:00:03Z"},
                  {"type": "DisruptionTarget", "status": "True",
                   "reason": "PreemptionByScheduler", "message": "busy-1: preempting",
                   "lastTransitionTime": "2026-01-01T00:01:30Z"}]
    return {
        "metadata": {"name": POD, "creationTimestamp": "2026-01-01T00:00:02Z",
                     "labels": {"batch.kubernetes.io/job-name": JOB}},
        "spec": {"nodeName": "busy-1"},
        "status": {"phase": "Failed", "conditions": conditions, "containerStatuses": [
            {"name": "runner", "state": {"terminated": {
                "exitCode": 4, "reason": "Error", "message": report,
                "startedAt": "2026-01-01T00:01:00Z", "finishedAt": "2026-01-01T00:01:35Z"}}}]},
    }  # fmt: skip


def event(reason: str, note: str, *, about: str, at: str, source: str, **extra: Any) -> Obj:
    return {"reason": reason, "note": note, "regarding": {"name": about},
            "eventTime": at, "reportingController": source, **extra}  # fmt: skip


VERDICT = failures.Verdict(False, "Preempted", "Reduction pod was preempted by the scheduler",
                           transient=True, retry_in=0)


def test_the_story_is_in_time_order_and_names_who_did_what() -> None:
    events = [
        event("FailedScheduling", UNSCHEDULABLE, about=POD, at="2026-01-01T00:00:03.500000Z",
              source="default-scheduler"),
        event("Scheduled", "Successfully assigned t/x to busy-1", about=POD,
              at="2026-01-01T00:00:58.000000Z", source="default-scheduler"),
        event("Admitted", "RB 1 is free: reducing", about=JOB, at="2026-01-01T00:00:01.500000Z",
              source="autoreduce.io/dispatcher"),
    ]
    story = tell(jobs=[job(verdict=VERDICT)], pods=[pod(scheduled=True)], events=events,
                 labels=LABELS, now=1767225800.0)
    said = [(e.source, e.text) for e in story.entries]
    assert said[:4] == [
        ("broker", "message enqueued on the pending queue (priority 9)"),
        ("dispatcher", "run accepted: Job created (suspended until admitted)"),
        ("autoreduce.io/dispatcher", "Admitted: RB 1 is free: reducing"),
        ("job-controller", "Job started: admitted, its pod may be created"),
    ]
    texts = [text for _, text in said]
    assert f"FailedScheduling: {UNSCHEDULABLE}" in texts
    # The scheduler's events are there, so its condition is not told twice.
    assert not any(text.startswith(("not scheduled", "scheduled to")) for text in texts)
    assert texts.index("container runner running") < texts.index(
        "pod to be stopped: PreemptionByScheduler: busy-1: preempting")
    assert ("runner", "did not post an outcome: not posted: stopped by SIGTERM") in said
    # The verdict (untimed) follows the Job's final condition: who posted, and why.
    final = texts.index("Job Failed (BackoffLimitExceeded: Job has reached the specified "
                        "backoff limit)")
    assert texts[final + 1] == ("verdict recorded: ReductionError on the run's behalf "
                                "(Preempted): Reduction pod was preempted by the scheduler")
    times = [e.at for e in story.entries if e.at is not None]
    assert times == sorted(times)


def test_without_scheduler_events_the_pods_condition_says_why_it_waits() -> None:
    # Events expire (an hour by default); the pod's condition stays.
    story = tell(jobs=[job(failed=False)], pods=[pod(scheduled=False)], events=[],
                 labels=LABELS, now=1767225800.0)
    assert ("default-scheduler", f"not scheduled: Unschedulable: {UNSCHEDULABLE}") in [
        (e.source, e.text) for e in story.entries]


def test_the_human_view_heads_each_version_and_offsets_from_the_first_record() -> None:
    story = tell(jobs=[job(verdict=VERDICT)], pods=[pod(scheduled=True)], events=[],
                 labels=LABELS, now=1767225800.0)
    text = format_story(story, run="MARI run 7")
    lines = text.splitlines()
    assert lines[0] == "MARI run 7: 1 version(s)"
    assert lines[1].startswith(f"  v0  {JOB}  Error  Reduction pod was preempted")
    assert "00:00:00.000 UTC     +0.0s  broker" in text
    assert "v0 pod x7k2p" in text and "+95.0s" in text
    assert story_json(story)["versions"][0]["job"] == JOB


def test_no_job_says_what_that_can_mean() -> None:
    story = tell(jobs=[], pods=[], events=[], labels=LABELS, now=0.0)
    assert format_story(story, run="MARI run 8").startswith("no Job for MARI run 8: it never")


def test_event_time_prefers_the_series_then_its_own_then_the_old_apis() -> None:
    assert event_time({"series": {"lastObservedTime": "2026-01-01T00:00:10Z"},
                       "eventTime": "2026-01-01T00:00:01Z"}) == 1767225610.0
    assert event_time({"deprecatedLastTimestamp": "2026-01-01T00:00:05Z"}) == 1767225605.0
    assert event_time({}) is None


def test_explain_parses_instrument_run_and_an_optional_version() -> None:
    args = parser().parse_args(["explain", "mari", "7", "--version", "1", "-o", "json"])
    assert (args.instrument, args.run, args.version, args.output) == ("mari", 7, 1, "json")
    assert selector_of(LABELS, instrument="mari", run=7) == (
        "autoreduce.io/managed=true,autoreduce.io/instrument=MARI,autoreduce.io/run-number=7")


def test_within_one_second_the_story_follows_a_runs_life_not_the_alphabet() -> None:
    # API times are whole seconds: the broker's millisecond enqueue time, the Job's
    # creationTimestamp and our Admitted Event all fall in the same second.
    quick = job(failed=False)
    quick["metadata"]["annotations"]["autoreduce.io/enqueued-at"] = "1767225601300"
    quick["status"] = {"startTime": "2026-01-01T00:00:01Z"}
    events = [event("Admitted", "RB 1 is free: reducing", about=JOB, source="autoreduce.io/"
                    "dispatcher", at="2026-01-01T00:00:01.000000Z"),
              event("Suspended", "Job suspended", about=JOB, source="job-controller",
                    at="2026-01-01T00:00:01.000000Z")]
    story = tell(jobs=[quick], pods=[], events=events, labels=LABELS, now=1767225800.0)
    assert [e.text.split(":")[0] for e in story.entries] == [
        "message enqueued on the pending queue (priority 9)",
        "run accepted", "Suspended", "Admitted", "Job started"]


def test_pods_gone_since_are_found_from_the_job_controllers_events() -> None:
    events = [event("SuccessfulCreate", f"Created pod: {POD}", about=JOB, at="",
                    source="job-controller"),
              event("Completed", "Job completed", about=JOB, at="", source="job-controller")]
    assert pods_named(events) == {POD}


class EventsRefused:
    """Our own Kube boundary, as a Role without ``list`` on Events answers."""

    def list_events(self, **_: Any) -> list[dict[str, Any]]:
        raise Forbidden("list Events: events.events.k8s.io is forbidden", status=403)


def test_a_role_without_events_still_gets_its_answer_and_one_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = DispatcherSettings.model_validate({})
    ctx = Context(settings=settings, labels=LABELS, output="text", kubeconfig=None,
                  namespace="ns", _kube=EventsRefused())  # type: ignore[arg-type]
    assert ctx.events(regarding=JOB) == [] and ctx.events(reason="TriggeredScaleUp") == []
    warned = capsys.readouterr().err
    assert warned.count("no Events shown") == 1 and "forbidden" in warned, warned
