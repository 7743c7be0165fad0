"""After a run: exactly one outcome, and a retry when the failure was transient.

Called for every Job that finished as Failed (the watch sees it) and, on a timer,
for runs whose pod is stuck (an image that cannot be pulled). Each Job is handled
once across all replicas: the handler first claims the Job by writing the
``<prefix>/outcome`` annotation with a compare-and-swap on its resourceVersion.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from autoreduce_common.messages import Outcome, encode
from autoreduce_common.stomp_client import BrokerError

from dispatcher import admission, failures
from dispatcher.identity import Labels
from dispatcher.kube import Conflict, Kube, KubeError, NotFound
from dispatcher.logs import job_logger
from dispatcher.reporting import Reporter, error_body

log = logging.getLogger(__name__)
Obj = dict[str, Any]

CLAIMED = "Handling"
DONE = "Done"
ATTEMPT_HEADER = "autoreduce-attempt"
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
        metrics: Any = None,
    ) -> None:
        self.kube = kube
        self.labels = labels
        self.reporter = reporter
        self.retry = retry
        self.pending_queue = pending_queue
        self.image_pull_grace_s = image_pull_grace_s
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lifecycle")
        self._stuck_since: dict[str, float] = {}
        # Told when we give up on a Job for now, so the next re-list offers it again
        # (the controller offers each finished Job once; set in __main__).
        self.on_gave_up: Callable[[str], None] | None = None

    def on_finished(self, job: Obj) -> None:
        """Hook for the controller's watch thread: the work runs on our pool."""
        if admission.succeeded(job) or self._handled(job):
            return
        self._pool.submit(self._guarded, job)

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
        if self.on_gave_up is not None:
            self.on_gave_up(name)

    def _handled(self, job: Obj) -> bool:
        annotations = job.get("metadata", {}).get("annotations") or {}
        return annotations.get(self.labels.key("outcome")) not in (None, "", CLAIMED)

    def handle_failed(self, job: Obj) -> None:
        name = admission.name_of(job)
        pods = self.kube.list_pods(selector=f"batch.kubernetes.io/job-name={name}")
        verdict = failures.classify(job=job, pods=pods, log_tail="")
        if verdict.posted_by_runner and not (verdict.transient and self.retry.by_dispatcher):
            return  # the runner reported and nothing is to be retried: no writes at all
        if not verdict.posted_by_runner:
            verdict = failures.classify(job=job, pods=pods, log_tail=self._log_tail(pods))
        claimed = self._claim(job)
        if claimed is None:
            return
        raw = self._message(name)
        if not verdict.posted_by_runner:
            self._post_on_behalf(claimed, raw, verdict)
        if verdict.transient:
            self._maybe_retry(claimed, raw, verdict)
        self.kube.annotate_job(name, {self.labels.key("outcome"): DONE})

    def _claim(self, job: Obj) -> Obj | None:
        """CAS the outcome annotation; None when another replica handled it."""
        name = admission.name_of(job)
        annotations = job.get("metadata", {}).get("annotations") or {}
        if annotations.get(self.labels.key("outcome")) == CLAIMED:
            # Claimed before a crash (ours or another replica's): finish the job.
            # At worst this repeats a post that was sent just before the crash.
            return job
        try:
            return self.kube.annotate_job(
                name,
                {self.labels.key("outcome"): CLAIMED},
                resource_version=job["metadata"]["resourceVersion"],
            )
        except Conflict:
            fresh = self.kube.get_job(name)
            if fresh is None or self._handled(fresh):
                return None
            return self._claim(fresh)
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
        config_map = self.kube.get_config_map(name) or {}
        try:
            raw = json.loads((config_map.get("data") or {}).get("message.json", "{}"))
        except ValueError:
            raw = {}
        return raw if isinstance(raw, dict) else {}

    def _post_on_behalf(self, job: Obj, raw: Obj, verdict: failures.Verdict) -> None:
        body = error_body(
            raw or self._identity(job), message=verdict.message, retry_in=self._retry_in(verdict)
        )
        self.reporter.post(Outcome.ERROR, body)
        self.kube.record_event(
            job=job,
            reason="OutcomePosted",
            warning=True,
            note=f"ReductionError on the run's behalf: {verdict.reason}",
        )
        if self.metrics is not None:
            self.metrics.outcomes.labels(kind="Error", reason=verdict.reason).inc()
        job_logger(log, self.labels, job).warning(
            "posted ReductionError for %s: %s", admission.name_of(job), verdict.reason
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
        retry = {
            key: value
            for key, value in raw.items()
            if key not in {"message", "retry_in", "reduction_log", "admin_log", "reduction_data"}
        }
        retry["run_version"] = int(raw.get("run_version") or 0) + 1
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
            "scheduled retry of %s as v%s in %ss",
            admission.name_of(job),
            retry["run_version"],
            delay,
        )

    # -- stuck pods ----------------------------------------------------------------

    def check_stuck(self, running: list[Obj]) -> None:
        """Fail runs whose pod has been unable to start (image pull) past the grace."""
        if not running:
            self._stuck_since.clear()
            return
        pods = self.kube.list_pods(selector=f"{self.labels.managed}=true")
        now = time.monotonic()
        seen = set()
        for pod in pods:
            reason = failures.stuck_reason(pod)
            job = (pod.get("metadata", {}).get("labels") or {}).get("batch.kubernetes.io/job-name")
            if reason is None or job is None:
                continue
            seen.add(job)
            since = self._stuck_since.setdefault(job, now)
            if now - since >= self.image_pull_grace_s:
                self._fail_stuck(job, reason)
                self._stuck_since.pop(job, None)
        for job in set(self._stuck_since) - seen:
            self._stuck_since.pop(job, None)

    def _fail_stuck(self, name: str, reason: str) -> None:
        job = self.kube.get_job(name)
        if job is None or admission.is_finished(job):
            return
        claimed = self._claim(job)
        if claimed is None:
            return
        verdict = failures.Verdict(
            False,
            "ImagePullBackOff",
            f"Reduction pod could not start after {self.image_pull_grace_s:.0f} s: {reason}",
            transient=False,
        )
        self._post_on_behalf(claimed, self._message(name), verdict)
        self.kube.annotate_job(name, {self.labels.key("outcome"): DONE})
        self.kube.delete_job(name, propagation="Background")
