"""Outcomes the dispatcher posts for a run, and the retry it schedules after a
transient failure. Called by the outcome reconciler once a verdict is claimed."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from autoreduce_common.messages import Outcome, encode, rerun
from autoreduce_common.pod_contract import ATTEMPT_HEADER

from dispatcher import admission, failures
from dispatcher.identity import Labels
from dispatcher.kube import Kube
from dispatcher.logs import job_logger
from dispatcher.metrics import Metrics
from dispatcher.reporting import Reporter, error_body

log = logging.getLogger(__name__)
Obj = dict[str, Any]

ON_BEHALF_NOTE = (
    "Posted by the autoreduce dispatcher on the run's behalf: {reason}. The reduction's "
    "own logs are in `kubectl logs` of its Job while the Job exists."
)


@dataclass(frozen=True)
class RetryPolicy:
    by_dispatcher: bool  # False: report only, the upstream web app decides (retry_in)
    max_attempts: int  # total, including the first
    delay_s: int  # for transient failures that did not say retry_in


def on_behalf_body(raw: Obj, *, verdict: failures.Verdict, retry_in: int | None) -> Obj:
    """The outcome message the dispatcher sends for a run: an error it diagnosed, or
    the very outcome the runner was sending when it was stopped."""
    if verdict.outcome is Outcome.ERROR:
        body = error_body(raw, message=verdict.message, retry_in=retry_in)
    else:
        body = {**raw, "message": verdict.message or None, "retry_in": None}
    if verdict.reduction_data:
        body["reduction_data"] = list(verdict.reduction_data)
    body["admin_log"] = ON_BEHALF_NOTE.format(reason=verdict.reason)
    return body


def retry_in_for(verdict: failures.Verdict, retry: RetryPolicy) -> int | None:
    """``retry_in`` for an outcome we post (pure). Set only when the web app does the
    retries (``retries.mode: upstream``) and the failure is worth one: with the
    dispatcher retrying, a ``retry_in`` would make the web app retry a second time.
    A resent runner outcome carries exactly what the runner was sending."""
    if verdict.outcome is not Outcome.ERROR:
        return None
    if verdict.possible_repeat and verdict.reason.startswith("Unconfirmed"):
        return verdict.retry_in
    if retry.by_dispatcher or not verdict.transient:
        return None
    return verdict.retry_in if verdict.retry_in is not None else retry.delay_s


class OnBehalf:
    def __init__(self, *, kube: Kube, labels: Labels, reporter: Reporter, metrics: Metrics,
                 retry: RetryPolicy, pending_queue: str) -> None:
        self.kube = kube
        self.labels = labels
        self.reporter = reporter
        self.metrics = metrics
        self.retry = retry
        self.pending_queue = pending_queue

    def post(self, job: Obj, raw: Obj, verdict: failures.Verdict) -> None:
        """Post ``verdict`` for ``job`` (BrokerError unless the broker confirmed it)."""
        name = admission.name_of(job)
        body = on_behalf_body(raw or self._identity(job), verdict=verdict,
                              retry_in=retry_in_for(verdict, self.retry))
        self.reporter.post(verdict.outcome, body, outcome_id=name,
                           possible_repeat=verdict.possible_repeat)
        kind = verdict.outcome.value
        self.kube.record_event(
            job=job,
            reason="OutcomePosted",
            warning=verdict.outcome is Outcome.ERROR,
            note=f"Reduction{kind} on the run's behalf: {verdict.reason}",
        )
        self.metrics.outcomes.labels(kind=kind, reason=verdict.reason).inc()
        job_logger(log, self.labels, job).warning(
            "posted Reduction%s for %s: %s", kind, name, verdict.reason
        )

    def maybe_retry(self, job: Obj, raw: Obj, verdict: failures.Verdict) -> None:
        """Schedule the run again as ``run_version + 1`` when we do the retries."""
        if not self.retry.by_dispatcher or not raw:
            return
        annotations = job.get("metadata", {}).get("annotations") or {}
        attempt = int(annotations.get(self.labels.key("attempt"), "1") or 1)
        if attempt >= self.retry.max_attempts:
            self.kube.record_event(
                job=job,
                reason="RetriesExhausted",
                warning=True,
                note=f"attempt {attempt} of {self.retry.max_attempts}: not retried",
            )
            return
        delay = verdict.retry_in if verdict.retry_in is not None else self.retry.delay_s
        retry = rerun(raw, version=int(raw.get("run_version") or 0) + 1)
        # Reruns and retries go in at priority 0 (message-contract.md); the broker
        # holds the delay (AMQ_SCHEDULED_DELAY), so it survives our restarts.
        self.reporter.send(
            destination=self.pending_queue,
            body=encode(retry),
            priority=0,
            delay_ms=max(delay, 0) * 1000,
            headers={ATTEMPT_HEADER: str(attempt + 1)},
        )
        self.kube.record_event(
            job=job,
            reason="RetryScheduled",
            note=f"retry as version {retry['run_version']} in {delay} s "
            f"(attempt {attempt + 1} of {self.retry.max_attempts})",
        )
        job_logger(log, self.labels, job).info(
            "scheduled retry of %s as v%s in %ss", admission.name_of(job), retry["run_version"],
            delay,
        )

    def _identity(self, job: Obj) -> Obj:
        labels = job.get("metadata", {}).get("labels") or {}
        return {
            "instrument": labels.get(self.labels.key("instrument")),
            "rb_number": labels.get(self.labels.key("rb-number")),
            "run_number": int(labels.get(self.labels.key("run-number"), 0)),
            "run_version": int(labels.get(self.labels.key("run-version"), 0)),
        }
