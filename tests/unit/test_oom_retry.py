"""Out of memory, retried bigger (opt-in ``oom_retry``): the pure decisions.

The dispatcher decides the next version's memory twice from the same inputs: when it
renders a Job (the runner is told, so its own ReductionError can say it) and when the
run failed for memory (the retry message carries the memory as headers). The real
node's version is tests/integration/test_lifecycle.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from autoreduce_common.messages import Outcome
from autoreduce_common.pod_contract import (
    OOM_KILLED,
    PodEnv,
    Stage,
    TerminationReport,
    parse_report,
)
from pydantic import ValidationError

from dispatcher.config import DispatcherSettings, OomRetry
from dispatcher.dispatch import arrival_of
from dispatcher.failures import Verdict, classify
from dispatcher.identity import Labels, RunKey
from dispatcher.manifests import Arrival, load_template, render_job
from dispatcher.oom_retry import Memory, after_oom, memory_from, next_memory

LABELS = Labels("autoreduce.io")
POLICY = OomRetry(factor=2, max_memory="1Gi")


def resources(limit: str | None, request: str | None = None) -> dict[str, Any]:
    return {"limits": {"memory": limit} if limit else {},
            "requests": {"cpu": "1", **({"memory": request} if request else {})}}  # fmt: skip


@pytest.mark.parametrize(("limit", "asked", "expected"), [
    ("200Mi", "64Mi", Memory("400Mi", "128Mi")),
    ("600Mi", "600Mi", Memory("1Gi", "1Gi")),  # capped at the ceiling, request too
    ("1Gi", "64Mi", None),  # at the ceiling: not retried
    ("2Gi", None, None),  # above it
    (None, "64Mi", None),  # no limit to grow
    ("300M", None, Memory("573Mi")),  # 600 MB, rounded up to whole Mi
])  # fmt: skip
def test_the_next_memory_grows_by_the_factor_up_to_the_ceiling(
    limit: str | None, asked: str | None, expected: Memory | None
) -> None:
    assert next_memory(resources(limit, asked), POLICY) == expected
    assert next_memory(resources(limit, asked), None) is None


def test_a_max_memory_that_is_not_a_quantity_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="memory quantity"):
        OomRetry(max_memory="lots")
    with pytest.raises(ValidationError):
        OomRetry(factor=1, max_memory="1Gi")


def test_the_retry_headers_carry_the_memory_and_a_hostile_one_is_ignored() -> None:
    memory = Memory("400Mi", "128Mi")
    assert memory_from(memory.headers()) == memory
    assert arrival_of({"timestamp": "1", **memory.headers()}).memory == memory
    assert memory_from({"autoreduce-memory-limit": "lots"}) is None
    assert memory_from({"autoreduce-memory-limit": "1Gi",
                        "autoreduce-memory-request": "x"}) == Memory("1Gi")
    assert arrival_of({}).memory is None


def settings(*, mode: str = "dispatcher", max_attempts: int = 3) -> DispatcherSettings:
    return DispatcherSettings.model_validate({
        "runner": {"resources": {"requests": {"cpu": "1", "memory": "64Mi"},
                                 "limits": {"memory": "200Mi"}}},
        "instruments": {"MARI": {"oom_retry": {"factor": 2, "max_memory": "1Gi"}}},
        "retries": {"mode": mode, "max_attempts": max_attempts},
    })  # fmt: skip


def runner_of(job: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return container


def env_of(job: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in runner_of(job)["env"]}


def rendered(s: DispatcherSettings, *, instrument: str = "MARI", attempt: int = 1,
             memory: Memory | None = None) -> dict[str, Any]:
    return render_job(settings=s, template=load_template(s.jobs.template_path),
                      key=RunKey("ISIS", instrument, (7,), attempt - 1, "1"),
                      arrival=Arrival(priority=9, enqueued_ms=1, message_id="m",
                                      attempt=attempt, memory=memory))  # fmt: skip


def test_a_job_tells_its_runner_the_memory_an_oom_retry_would_get() -> None:
    first = rendered(settings())
    assert env_of(first)[PodEnv.OOM_RETRY_LIMIT] == "400Mi"
    # The retry gets the bigger memory, and its own next step.
    second = rendered(settings(), attempt=2, memory=Memory("400Mi", "128Mi"))
    assert runner_of(second)["resources"]["limits"]["memory"] == "400Mi"
    assert runner_of(second)["resources"]["requests"] == {"cpu": "1", "memory": "128Mi"}
    assert env_of(second)[PodEnv.OOM_RETRY_LIMIT] == "800Mi"


@pytest.mark.parametrize("case", ["no policy", "last attempt", "upstream retries", "ceiling"])
def test_no_oom_retry_no_promise(case: str) -> None:
    job = {
        "no policy": lambda: rendered(settings(), instrument="WISH"),
        "last attempt": lambda: rendered(settings(max_attempts=2), attempt=2),
        "upstream retries": lambda: rendered(settings(mode="upstream")),
        "ceiling": lambda: rendered(settings(), attempt=2, memory=Memory("1Gi")),
    }[case]()
    assert PodEnv.OOM_RETRY_LIMIT not in env_of(job)


def oom_killed_job(*, attempt: int = 1) -> dict[str, Any]:
    job = rendered(settings(), attempt=attempt)
    job["metadata"]["annotations"][LABELS.key("attempt")] = str(attempt)
    job["status"] = {"conditions": [{"type": "Failed", "status": "True",
                                     "reason": "BackoffLimitExceeded"}]}
    return job


def killed_pod() -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "status": {"containerStatuses": [
        {"name": "runner", "state": {"terminated": {"exitCode": 137, "reason": OOM_KILLED}}}]}}


def test_an_oom_killed_run_posted_on_its_behalf_says_what_is_tried_and_retries_at_once() -> None:
    job = oom_killed_job()
    verdict = after_oom(job, classify(job=job, pods=[killed_pod()], log_tail=""),
                        labels=LABELS, policy=POLICY, max_attempts=3)
    assert verdict == Verdict(
        False, OOM_KILLED,
        "Reduction ran out of memory (limit 200Mi) and was killed; it is retried as its "
        "next version with a memory limit of 400Mi",
        transient=True, retry_in=0,
        memory={"autoreduce-memory-limit": "400Mi", "autoreduce-memory-request": "128Mi"})
    # The last attempt: the plain verdict, not retried.
    last = oom_killed_job(attempt=3)
    plain = classify(job=last, pods=[killed_pod()], log_tail="")
    assert after_oom(last, plain, labels=LABELS, policy=POLICY, max_attempts=3) == plain
    assert not plain.transient


def test_a_runner_that_said_oom_itself_keeps_its_words_and_the_run_is_retried() -> None:
    # cgroup v1: the kernel killed only the script; the runner posted the error (with
    # the note it was given at render time) and says why in its report.
    said = TerminationReport(stage=Stage.POSTED, outcome=Outcome.ERROR, reason=OOM_KILLED,
                             message="ran out of memory; it is retried as ...")
    assert parse_report(said.render()) == said
    pod = {"metadata": {"name": "p"}, "status": {"containerStatuses": [
        {"name": "runner", "state": {"terminated": {"exitCode": 1, "message": said.render()}}}]}}
    job = oom_killed_job()
    verdict = after_oom(job, classify(job=job, pods=[pod], log_tail=""),
                        labels=LABELS, policy=POLICY, max_attempts=3)
    assert verdict.posted_by_runner and verdict.transient
    assert verdict.message == "ran out of memory; it is retried as ..."
    assert verdict.memory["autoreduce-memory-limit"] == "400Mi"


def test_other_failures_are_left_alone() -> None:
    job = oom_killed_job()
    other = Verdict(False, "ExitCode2", "exited", transient=False)
    assert after_oom(job, other, labels=LABELS, policy=POLICY, max_attempts=3) is other
