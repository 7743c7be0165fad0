"""After a run: exactly one outcome, and a retry when the failure was transient.

Called for every Job that finished as Failed (the watch sees it) and, on a timer,
for runs whose pod is stuck (an image that cannot be pulled). Each Job is handled
once across all replicas: the handler first claims the Job by writing the
``<prefix>/outcome`` annotation with a compare-and-swap on its resourceVersion.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from autoreduce_common.messages import Outcome, encode, rerun
from autoreduce_common.pod_contract import OOM_KILLED
from autoreduce_common.stomp_client import BrokerError

from dispatcher import admission, failures, faults
from dispatcher.config import OomRetry
from dispatcher.identity import Labels
from dispatcher.kube import Conflict, Kube, KubeError, NotFound
from dispatcher.logs import job_logger
from dispatcher.manifests import message_of
from dispatcher.metrics import Metrics
from dispatcher.oom_retry import MEMORY_LIMIT_HEADER, after_oom
from dispatcher.outcome_state import (
    IN_PROGRESS,
    OUTCOME_KEY,
    SETTLED,
    VERDICT_KEY,
    OutcomeState,
    state_of,
)
from dispatcher.pods import PodCache, PodView, pod_view
from dispatcher.reporting import Reporter, error_body
from dispatcher.workqueue import Claims

log = logging.getLogger(__name__)
Obj = dict[str, Any]

ATTEMPT_HEADER = "autoreduce-attempt"
CANCELLED_RUNNING = "Run cancelled while reducing"
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class RetryPolicy:
    by_dispatcher: bool  # False: report only, the upstream web app decides (retry_in)
    max_attempts: int  # total, including the first
    delay_s: int  # for transient failures that did not say retry_in


class Lifecycle:
    def __init__(
        self,
        *,
        kube: Kube,
        labels: Labels,
        reporter: Reporter,
        retry: RetryPolicy,
        pending_queue: str,
        image_pull_grace_s: float,
        oom_policy: Callable[[str], OomRetry | None] = lambda _instrument: None,
        pods: PodCache | None = None,
        fault_point: faults.FaultPoint | None = None,
        metrics: Metrics | None = None,
        offers: Claims | None = None,
    ) -> None:
        self.fault_point = fault_point
        self.kube = kube
        self.pods = pods if pods is not None else PodCache()
        self.labels = labels
        self.reporter = reporter
        self.retry = retry
        self.pending_queue = pending_queue
        self.image_pull_grace_s = image_pull_grace_s
        # An instrument's oom_retry (its effective runner spec's), for runs killed for memory.
        self.oom_policy = oom_policy
        self.metrics = metrics if metrics is not None else Metrics()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lifecycle")
        # The controller offers each finished Job once; one we give up on for now is
        # forgotten there, so the next resync offers it again.
        self.offers = offers if offers is not None else Claims()

    def on_finished(self, job: Obj) -> None:
        """Hook for the controller's watch thread: the work runs on our pool."""
        if admission.succeeded(job) or self._handled(job):
            # The runner posted (exit 0), or the outcome is settled: let the pods go.
            self._pool.submit(self._release_quietly, admission.name_of(job))
            return
        self._pool.submit(self._guarded, job)

    def on_pod_stopped(self, pod: PodView, job: Obj | None) -> None:
        """Hook for the pod watch: a stopped pod still held by our finalizer."""
        if job is not None and self._state(job) is OutcomeState.CANCELLING:
            self._pool.submit(self._guarded, job)  # a cancelled run: its pods have stopped
            return
        if job is not None and not (admission.succeeded(job) or self._settled(job)):
            return  # its Job's verdict (on_finished) settles the outcome, then releases
        self._pool.submit(self._release_stopped, pod, job is None)

    def _state(self, job: Obj) -> OutcomeState | None:
        annotations = job.get("metadata", {}).get("annotations") or {}
        return state_of(annotations.get(self.labels.key(OUTCOME_KEY)))

    def _settled(self, job: Obj) -> bool:
        return self._state(job) in SETTLED

    def _release_stopped(self, pod: PodView, unknown_job: bool) -> None:
        try:
            if unknown_job and self.kube.get_job(pod.job) is not None:
                return  # our cache is behind: the Job's finish event handles it
            if unknown_job:
                log.warning("pod %s outlived its Job %s: released without an outcome check",
                            pod.name, pod.job)
            self.kube.remove_pod_finalizer(pod.name, finalizer=self.labels.pod_finalizer)
        except KubeError as error:
            log.warning("pod %s not released yet (%s); its next event retries", pod.name, error)

    def _release_quietly(self, job_name: str) -> None:
        try:
            self.release_pods(job_name)
        except KubeError as error:
            log.warning("pods of %s not released yet (%s); the next resync retries", job_name,
                        error)

    def release_pods(self, job_name: str) -> None:
        """Remove our finalizer from the Job's stopped pods: its outcome is settled."""
        for pod in self.pods.of_job(job_name):
            if pod.finalized and not pod.live:
                self.kube.remove_pod_finalizer(pod.name, finalizer=self.labels.pod_finalizer)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    # -- failed runs ---------------------------------------------------------------

    def _guarded(self, job: Obj) -> None:
        name = admission.name_of(job)
        for attempt in range(5):
            try:
                if attempt:  # re-read: another replica may have settled it meanwhile
                    fresh = self.kube.get_job(name)
                    if fresh is None:
                        return
                    job = fresh
                self.handle_failed(job)
                return
            except (KubeError, BrokerError) as error:
                log.warning("outcome for %s not settled yet (%s); retrying", name, error)
                time.sleep(min(2**attempt, 10))
        log.error("gave up settling the outcome of %s; the next resync retries it", name)
        self.offers.discard(name)

    def _handled(self, job: Obj) -> bool:
        """Settled, or left to a step that is not ours (a state we do not know)."""
        annotations = job.get("metadata", {}).get("annotations") or {}
        value = annotations.get(self.labels.key(OUTCOME_KEY))
        return bool(value) and state_of(value) not in IN_PROGRESS

    def handle_failed(self, job: Obj) -> None:
        name = admission.name_of(job)
        recorded = self._recorded_verdict(job)
        if recorded is not None:
            # Claimed and decided before a crash (ours or another replica's): post
            # exactly what was decided, marked as a possible repeat, never a new verdict.
            self._settle(job, recorded, raw=self._message(name))
            return
        pods = self.kube.list_pods(selector=f"batch.kubernetes.io/job-name={name}")
        if self._state(job) is OutcomeState.CANCELLING:
            self._settle_cancelled(job, pods)
            return
        verdict = self._retried_bigger(job, failures.classify(job=job, pods=pods, log_tail=""))
        if verdict.posted_by_runner and not (verdict.transient and self.retry.by_dispatcher):
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
        if verdict.reason != OOM_KILLED or not self.retry.by_dispatcher:
            return verdict
        instrument = ((job.get("metadata") or {}).get("labels") or {}).get(
            self.labels.key("instrument"), "")
        return after_oom(job, verdict, labels=self.labels, policy=self.oom_policy(instrument),
                         max_attempts=self.retry.max_attempts)

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
            self._maybe_retry(job, raw, verdict)
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
            if fresh is None or self._handled(fresh):
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
        return message_of(self.kube.get_config_map(name)) or {}

    def _post_on_behalf(self, job: Obj, raw: Obj, verdict: failures.Verdict) -> None:
        name = admission.name_of(job)
        body = on_behalf_body(raw or self._identity(job), verdict=verdict,
                              retry_in=self._retry_in(verdict))
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

    def _identity(self, job: Obj) -> Obj:
        labels = job.get("metadata", {}).get("labels") or {}
        return {
            "instrument": labels.get(self.labels.key("instrument")),
            "rb_number": labels.get(self.labels.key("rb-number")),
            "run_number": int(labels.get(self.labels.key("run-number"), 0)),
            "run_version": int(labels.get(self.labels.key("run-version"), 0)),
        }

    # -- retries -------------------------------------------------------------------

    def _retry_in(self, verdict: failures.Verdict) -> int | None:
        if verdict.outcome is not Outcome.ERROR:
            return None
        if verdict.possible_repeat and verdict.reason.startswith("Unconfirmed"):
            return verdict.retry_in  # exactly what the runner was sending
        """``retry_in`` for an error we post: set only when the web app does the retries
        (``retries.mode: upstream``) and the failure is worth one; with the dispatcher
        retrying, a ``retry_in`` would make the web app retry a second time."""
        if self.retry.by_dispatcher or not verdict.transient:
            return None
        return verdict.retry_in if verdict.retry_in is not None else self.retry.delay_s

    def _maybe_retry(self, job: Obj, raw: Obj, verdict: failures.Verdict) -> None:
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
            headers={ATTEMPT_HEADER: str(attempt + 1), **verdict.memory},
        )
        self.kube.record_event(
            job=job,
            reason="RetryScheduled",
            note=f"retry as version {retry['run_version']} in {delay} s "
            f"(attempt {attempt + 1} of {self.retry.max_attempts})"
            + (f" with a memory limit of {verdict.memory[MEMORY_LIMIT_HEADER]}"
               if MEMORY_LIMIT_HEADER in verdict.memory else ""),
        )
        job_logger(log, self.labels, job).info(
            "scheduled retry of %s as v%s in %ss",
            admission.name_of(job),
            retry["run_version"],
            delay,
        )

    # -- stuck pods (``dispatcher.stuck`` says which) ------------------------------

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


ON_BEHALF_NOTE = (
    "Posted by the autoreduce dispatcher on the run's behalf: {reason}. The reduction's "
    "own logs are in `kubectl logs` of its Job while the Job exists."
)


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
