"""Settling a finished run's outcome: exactly one posted, and a retry when the failure
was transient. ``dispatcher.outcomes`` decides when; this does it.

Each Job is handled once across all replicas: the handler first claims the Job by
writing the ``<prefix>/outcome`` annotation with a compare-and-swap on its
resourceVersion, recording the verdict it is about to post, so that a crash between
claim and post is finished by whoever comes next with exactly that verdict.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from autoreduce_common.messages import Outcome
from autoreduce_common.pod_contract import OOM_KILLED

from dispatcher import admission, failures, faults
from dispatcher.config import OomRetry
from dispatcher.identity import Labels
from dispatcher.kube import Conflict, Kube, KubeError, NotFound
from dispatcher.logs import job_logger
from dispatcher.manifests import stored_message
from dispatcher.metrics import Metrics
from dispatcher.oom_retry import after_oom
from dispatcher.outcome_state import (
    IN_PROGRESS,
    OUTCOME_KEY,
    SETTLED,
    VERDICT_KEY,
    OutcomeState,
    state_of,
)
from dispatcher.pods import PodCache, pod_view
from dispatcher.reporting import Reporter, on_behalf_body
from dispatcher.retries import Retries

log = logging.getLogger(__name__)
Obj = dict[str, Any]

CANCELLED_RUNNING = "Run cancelled while reducing"
LOG_TAIL_LINES = 20


class Settler:
    def __init__(
        self,
        *,
        kube: Kube,
        labels: Labels,
        reporter: Reporter,
        retries: Retries,
        pods: PodCache,
        metrics: Metrics,
        image_pull_grace_s: float,
        oom_policy: Callable[[str], OomRetry | None] = lambda _instrument: None,
        fault_point: faults.FaultPoint | None = None,
    ) -> None:
        self.kube = kube
        self.labels = labels
        self.reporter = reporter
        self.retries = retries
        self.pods = pods
        self.metrics = metrics
        self.image_pull_grace_s = image_pull_grace_s
        # An instrument's oom_retry (its effective runner spec's), for runs killed for memory.
        self.oom_policy = oom_policy
        self.fault_point = fault_point

    def state(self, job: Obj) -> OutcomeState | None:
        annotations = job.get("metadata", {}).get("annotations") or {}
        return state_of(annotations.get(self.labels.key(OUTCOME_KEY)))

    def settled(self, job: Obj) -> bool:
        """The runner posted (exit 0), or the outcome is settled: the pods may go."""
        return admission.succeeded(job) or self.state(job) in SETTLED

    def handled(self, job: Obj) -> bool:
        """Settled, or left to a step that is not ours (a state we do not know)."""
        annotations = job.get("metadata", {}).get("annotations") or {}
        value = annotations.get(self.labels.key(OUTCOME_KEY))
        return bool(value) and state_of(value) not in IN_PROGRESS

    def release_pods(self, job_name: str) -> None:
        """Remove our finalizer from the Job's stopped pods: its outcome is settled."""
        for pod in self.pods.of_job(job_name):
            if pod.finalized and not pod.live:
                self.kube.remove_pod_finalizer(pod.name, finalizer=self.labels.pod_finalizer)

    def handle_failed(self, job: Obj) -> None:
        name = admission.name_of(job)
        recorded = self._recorded_verdict(job)
        if recorded is not None:
            # Claimed and decided before a crash (ours or another replica's): post
            # exactly what was decided, marked as a possible repeat, never a new verdict.
            self._settle(job, recorded, raw=self._message(name))
            return
        pods = self.kube.list_pods(selector=f"batch.kubernetes.io/job-name={name}")
        if self.state(job) is OutcomeState.CANCELLING:
            self._settle_cancelled(job, pods)
            return
        verdict = self._retried_bigger(job, failures.classify(job=job, pods=pods, log_tail=""))
        retried = verdict.transient and self.retries.policy.by_dispatcher
        if verdict.posted_by_runner and not retried:
            # The runner's own outcome stands and nothing is to be retried. Say so on the
            # Job before the pods go: they are the only other record of it, and a
            # dispatcher that judges this Job again (every restart re-lists finished
            # Jobs) would find no pods and post a second, contrary outcome.
            self.kube.annotate_job(name, {self.labels.key(OUTCOME_KEY): OutcomeState.DONE})
            self.release_pods(name)
            return
        if not verdict.posted_by_runner and verdict.outcome is Outcome.ERROR:
            verdict = self._retried_bigger(
                job, failures.classify(job=job, pods=pods, log_tail=self._log_tail(pods)))
        claimed = self._claim(job, verdict)
        if claimed is None:
            return
        self._settle(claimed, verdict, raw=self._message(name))

    def _retried_bigger(self, job: Obj, verdict: failures.Verdict) -> failures.Verdict:
        """A run killed for memory, with oom_retry on and an attempt left: retried as its
        next version with more memory, decided as at render time (manifests)."""
        if verdict.reason != OOM_KILLED or not self.retries.policy.by_dispatcher:
            return verdict
        instrument = ((job.get("metadata") or {}).get("labels") or {}).get(
            self.labels.key("instrument"), "")
        return after_oom(job, verdict, labels=self.labels, policy=self.oom_policy(instrument),
                         max_attempts=self.retries.policy.max_attempts)

    def _settle_cancelled(self, job: Obj, pods: list[Obj]) -> None:
        """A running run was cancelled and its pods have stopped: the runner's outcome
        stands if it had begun to send one; else the cancellation's error is posted."""
        if any(pod_view(pod, labels=self.labels).live for pod in pods):
            return  # still stopping: its stopped-pod event brings us back
        verdict = failures.cancelled(pods=pods, note=CANCELLED_RUNNING)
        name = admission.name_of(job)
        if verdict.posted_by_runner:
            self.kube.annotate_job(name, {self.labels.key(OUTCOME_KEY): OutcomeState.DONE})
            self.release_pods(name)
            return
        claimed = self._claim(job, verdict)
        if claimed is not None:
            self._settle(claimed, verdict, raw=self._message(name))

    def _settle(self, job: Obj, verdict: failures.Verdict, *, raw: Obj) -> None:
        name = admission.name_of(job)
        if not verdict.posted_by_runner:
            faults.reach(faults.FaultPoint.BEFORE_OUTCOME_SEND, configured=self.fault_point)
            self._post_on_behalf(job, raw, verdict)
            faults.reach(faults.FaultPoint.AFTER_OUTCOME_SEND, configured=self.fault_point)
        if verdict.transient and verdict.outcome is Outcome.ERROR:
            self.retries.maybe_retry(job, raw, verdict)
        self.kube.annotate_job(name, {self.labels.key(OUTCOME_KEY): OutcomeState.DONE})
        self.release_pods(name)

    def _recorded_verdict(self, job: Obj) -> failures.Verdict | None:
        annotations = job.get("metadata", {}).get("annotations") or {}
        if annotations.get(self.labels.key(OUTCOME_KEY)) != OutcomeState.HANDLING:
            return None
        verdict = failures.parse_verdict(annotations.get(self.labels.key(VERDICT_KEY)))
        if verdict is None:
            return None
        return dataclasses.replace(verdict, possible_repeat=True)

    def _claim(self, job: Obj, verdict: failures.Verdict) -> Obj | None:
        """CAS the outcome annotation, recording the verdict we are about to post; None
        when another replica claimed it first."""
        name = admission.name_of(job)
        annotations = job.get("metadata", {}).get("annotations") or {}
        if annotations.get(self.labels.key(OUTCOME_KEY)) == OutcomeState.HANDLING:
            # Claimed by a dispatcher of the first version (no recorded verdict):
            # finish it. At worst this repeats a post sent just before the crash.
            return self.kube.annotate_job(name, {
                self.labels.key(VERDICT_KEY): failures.render_verdict(
                    dataclasses.replace(verdict, possible_repeat=True))})
        try:
            return self.kube.annotate_job(
                name,
                {self.labels.key(OUTCOME_KEY): OutcomeState.HANDLING,
                 self.labels.key(VERDICT_KEY): failures.render_verdict(verdict)},
                resource_version=job["metadata"]["resourceVersion"],
            )
        except Conflict:
            fresh = self.kube.get_job(name)
            if fresh is None or self.handled(fresh):
                return None
            if self._recorded_verdict(fresh) is not None:
                return None  # another replica decided; it (or its successor) posts
            return self._claim(fresh, verdict)
        except NotFound:
            return None

    def _log_tail(self, pods: list[Obj]) -> str:
        for pod in pods:
            try:
                return self.kube.pod_log_tail(
                    pod["metadata"]["name"], container="runner", lines=LOG_TAIL_LINES
                )
            except KubeError:
                continue
        return ""

    def _message(self, name: str) -> Obj:
        """The run's message, or {} when it is gone (the Job's labels then identify it)."""
        return stored_message(self.labels, self.kube.get_job(name),
                              lambda: self.kube.get_config_map(name)) or {}

    def _post_on_behalf(self, job: Obj, raw: Obj, verdict: failures.Verdict) -> None:
        name = admission.name_of(job)
        body = on_behalf_body(raw or self._identity(job), verdict=verdict,
                              retry_in=self.retries.retry_in(verdict))
        self.reporter.post(verdict.outcome, body, outcome_id=name,
                           possible_repeat=verdict.possible_repeat)
        kind = verdict.outcome.value
        self.kube.record_event(
            job=job,
            reason="OutcomePosted",
            warning=verdict.outcome is Outcome.ERROR,
            note=f"Reduction{kind} on the run's behalf: {verdict.reason}",
        )
        self.metrics.outcome_posted(kind, verdict.reason)
        job_logger(log, self.labels, job).warning(
            "posted Reduction%s for %s: %s", kind, name, verdict.reason
        )

    def _identity(self, job: Obj) -> Obj:
        labels = job.get("metadata", {}).get("labels") or {}
        return {
            "instrument": labels.get(self.labels.key("instrument")),
            "rb_number": labels.get(self.labels.key("rb-number")),
            "run_number": int(labels.get(self.labels.key("run-number"), 0)),
            "run_version": int(labels.get(self.labels.key("run-version"), 0)),
        }

    def fail_stuck(self, name: str, reason: str) -> None:
        """Report a run whose pod could not start for the grace, and stop it."""
        job = self.kube.get_job(name)
        if job is None or admission.is_finished(job):
            return
        verdict = failures.Verdict(
            False,
            "ImagePullBackOff",
            f"Reduction pod could not start after {self.image_pull_grace_s:.0f} s: {reason}",
            transient=False,
        )
        claimed = self._claim(job, verdict)
        if claimed is None:
            return
        self._post_on_behalf(claimed, self._message(name), verdict)
        self.kube.annotate_job(name, {self.labels.key(OUTCOME_KEY): OutcomeState.DONE})
        self.kube.delete_job(name, propagation="Background")
