"""Retries of transient failures: by the dispatcher (a rerun sent back to the pending
queue with the broker holding the delay) or by the upstream web app (``retry_in``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from autoreduce_common.messages import Outcome, encode, rerun

from dispatcher import admission, failures
from dispatcher.identity import Labels
from dispatcher.kube import Kube
from dispatcher.logs import job_logger
from dispatcher.oom_retry import MEMORY_LIMIT_HEADER
from dispatcher.reporting import Reporter

log = logging.getLogger(__name__)
Obj = dict[str, Any]
ATTEMPT_HEADER = "autoreduce-attempt"


@dataclass(frozen=True)
class RetryPolicy:
    by_dispatcher: bool  # False: report only, the upstream web app decides (retry_in)
    max_attempts: int  # total, including the first
    delay_s: int  # for transient failures that did not say retry_in


@dataclass
class Retries:
    policy: RetryPolicy
    kube: Kube
    labels: Labels
    reporter: Reporter
    pending_queue: str

    def retry_in(self, verdict: failures.Verdict) -> int | None:
        """``retry_in`` for an error we post: set only when the web app does the retries
        (``retries.mode: upstream``) and the failure is worth one; with the dispatcher
        retrying, a ``retry_in`` would make the web app retry a second time."""
        if verdict.outcome is not Outcome.ERROR:
            return None
        if verdict.possible_repeat and verdict.reason.startswith("Unconfirmed"):
            return verdict.retry_in  # exactly what the runner was sending
        if self.policy.by_dispatcher or not verdict.transient:
            return None
        return verdict.retry_in if verdict.retry_in is not None else self.policy.delay_s

    def maybe_retry(self, job: Obj, raw: Obj, verdict: failures.Verdict) -> None:
        if not self.policy.by_dispatcher or not raw:
            return
        annotations = job.get("metadata", {}).get("annotations") or {}
        attempt = int(annotations.get(self.labels.key("attempt"), "1") or 1)
        if attempt >= self.policy.max_attempts:
            self.kube.record_event(
                job=job,
                reason="RetriesExhausted",
                warning=True,
                note=f"attempt {attempt} of {self.policy.max_attempts}: not retried",
            )
            return
        delay = verdict.retry_in if verdict.retry_in is not None else self.policy.delay_s
        retry = rerun(raw, version=int(raw.get("run_version") or 0) + 1)
        # Reruns and retries go in at priority 0 (message-contract.md); the broker
        # holds the delay (AMQ_SCHEDULED_DELAY), so it survives our restarts.
        self.reporter.send(
            destination=self.pending_queue,
            body=encode(retry),
            priority=0,
            delay_ms=max(delay, 0) * 1000,
            headers={ATTEMPT_HEADER: str(attempt + 1), **verdict.memory},
        )
        self.kube.record_event(
            job=job,
            reason="RetryScheduled",
            note=f"retry as version {retry['run_version']} in {delay} s "
            f"(attempt {attempt + 1} of {self.policy.max_attempts})"
            + (f" with a memory limit of {verdict.memory[MEMORY_LIMIT_HEADER]}"
               if MEMORY_LIMIT_HEADER in verdict.memory else ""),
        )
        job_logger(log, self.labels, job).info(
            "scheduled retry of %s as v%s in %ss", admission.name_of(job), retry["run_version"],
            delay)
