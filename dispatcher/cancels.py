"""Cancellations: a cancel message stops a run, or is remembered for one not yet seen.

A waiting run gets "Run cancelled while waiting" at once. A running one is stopped
first and its outcome is settled by the outcome reconciler (``outcomes``) once its
pods have stopped, so a run never gets both its own outcome and "cancelled". A
cancel that arrives before its run is kept as a suspended marker Job under the run's
name, swept after ``jobs.cancel_marker_ttl_seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import jinja2
from autoreduce_common.messages import Outcome, ReductionMessage

from dispatcher import admission, failures
from dispatcher.caches import JobCache, PodCache
from dispatcher.config import DispatcherSettings
from dispatcher.identity import Labels, RunKey, job_name, run_key
from dispatcher.keys import Key, Kind
from dispatcher.kube import AlreadyExists, Kube, KubeError
from dispatcher.logs import run_logger
from dispatcher.manifests import Arrival, message_of, render_job
from dispatcher.metrics import Metrics
from dispatcher.outcome_state import OUTCOME_KEY, VERDICT_KEY, OutcomeState, state_of
from dispatcher.reporting import Reporter, error_body
from dispatcher.workqueue import WorkQueue

log = logging.getLogger(__name__)


class Cancels:
    def __init__(self, *, settings: DispatcherSettings, kube: Kube, jobs: JobCache,
                 pods: PodCache, queue: WorkQueue, reporter: Reporter,
                 template: jinja2.Template, metrics: Metrics) -> None:
        self.settings = settings
        self.kube = kube
        self.jobs = jobs
        self.pods = pods
        self.queue = queue
        self.reporter = reporter
        self.template = template
        self.metrics = metrics
        self.labels = Labels(settings.jobs.label_prefix)

    def _count(self, reason: str) -> None:
        """A ReductionError we posted for a run (the outcome reconciler counts its own)."""
        self.metrics.outcomes.labels(kind=Outcome.ERROR.value, reason=reason).inc()

    def is_marker(self, job: dict[str, Any]) -> bool:
        labels = (job.get("metadata") or {}).get("labels") or {}
        return labels.get(self.labels.key("cancel")) == "true"

    def drop_arrived(self, key: RunKey, raw: dict[str, Any], marker: dict[str, Any]) -> None:
        """The run arrived after its cancellation: report it once, never run it.

        The marker stays (annotated) so a redelivery or a resend of the run is
        dropped too instead of running; it is a suspended Job, so it costs nothing.
        """
        outcome_key = self.labels.key(OUTCOME_KEY)
        annotations = (marker.get("metadata") or {}).get("annotations") or {}
        if annotations.get(outcome_key) == OutcomeState.CANCELLED:
            run_logger(log, key).info("dropped %s again: it was cancelled", key.describe())
            return
        self.reporter.post(
            Outcome.ERROR, error_body(raw, message="Run cancelled before it was dispatched"),
            outcome_id=job_name(key), possible_repeat=annotations.get(outcome_key) is not None,
        )
        self.kube.annotate_job(job_name(key), {outcome_key: OutcomeState.CANCELLED})
        self.metrics.dropped.inc()
        self._count("CancelledBeforeDispatch")
        run_logger(log, key).info("dropped %s: it was cancelled before it arrived", key.describe())

    def cancel(self, raw: dict[str, Any], message: ReductionMessage) -> None:
        key = run_key(message)
        job = self.kube.get_job(job_name(key))
        self.metrics.cancels.inc()
        if job is None:
            self._remember(key)
            return
        if self.is_marker(job):
            run_logger(log, key).info("cancel for %s already remembered", key.describe())
            return
        if admission.is_finished(job) or admission.is_deleting(job):
            run_logger(log, key).info("cancel for %s ignored: it already finished", key.describe())
            return
        running = not admission.is_suspended(job)
        name = job_name(key)
        state = state_of(((job.get("metadata") or {}).get("annotations") or {}).get(
            self.labels.key(OUTCOME_KEY)))
        if running and self.pods.of_job(name):
            # Its runner may be about to post (or posting) its own outcome: stop the
            # pods first; the outcome path settles it from the runner's record once they
            # have stopped, so a run never gets both a Complete and "cancelled".
            if state is None:
                self.jobs.upsert(self.kube.annotate_job(
                    name, {self.labels.key(OUTCOME_KEY): OutcomeState.CANCELLING}))
                self.kube.record_event(job=job, reason="Cancelled",
                                       note="Run cancelled while reducing: stopping its pod")
        elif state not in (OutcomeState.CANCELLED, OutcomeState.CANCELLING):
            self._post_cancelled(key, job, raw, state=state, running=running)
        self.kube.delete_job(name, propagation="Foreground" if running else "Background",
                             grace_s=30)
        self.queue.add(Key(Kind.RB, key.rb_number))
        run_logger(log, key).info(
            "cancelled %s (%s)", key.describe(), "running" if running else "waiting"
        )

    def _post_cancelled(self, key: RunKey, job: dict[str, Any], raw: dict[str, Any], *,
                        state: OutcomeState | None, running: bool) -> None:
        """A waiting run (or a running one whose pod does not exist yet): no runner can
        have posted, so the cancellation's error is the outcome."""
        note = "Run cancelled while reducing" if running else "Run cancelled while waiting"
        stored = message_of(self.kube.get_config_map(job_name(key)))
        run_raw = stored or {k: v for k, v in raw.items() if k != "cancel"}
        name, outcome_key = job_name(key), self.labels.key(OUTCOME_KEY)
        # Claim first so the outcome path never posts a second one; mark it posted only
        # after the broker confirmed the send.
        verdict = failures.Verdict(False, "Cancelled", note, transient=False)
        recorded = failures.render_verdict(verdict)
        self.kube.annotate_job(name, {outcome_key: OutcomeState.HANDLING,
                                      self.labels.key(VERDICT_KEY): recorded})
        self.reporter.post(Outcome.ERROR, error_body(run_raw, message=note), outcome_id=name,
                           possible_repeat=state is OutcomeState.HANDLING)
        self._count("Cancelled")
        self.kube.annotate_job(name, {outcome_key: OutcomeState.CANCELLED})
        self.kube.record_event(job=job, reason="Cancelled", note=note)

    def _remember(self, key: RunKey) -> None:
        """Park a cancellation for a run we have not seen, as a Job under the run's name.

        When the run arrives, its create answers 409 and the read that follows finds
        the marker: the happy path pays no extra read for cancellations that are rare.
        The marker has no managed label, so the controller never sees it as a run.
        """
        marker = render_job(
            settings=self.settings,
            template=self.template,
            key=key,
            arrival=Arrival(priority=0, enqueued_ms=int(time.time() * 1000), message_id=""),
        )
        metadata = marker["metadata"]
        metadata["labels"] = {
            **{k: v for k, v in metadata["labels"].items() if k != self.labels.managed},
            self.labels.key("cancel"): "true",
        }
        marker["spec"]["suspend"] = True  # never runs, whatever the template says
        with contextlib.suppress(AlreadyExists):
            self.kube.create_job(marker)
        log.info("cancel for unknown %s remembered", key.describe())

    def sweep_markers(self, *, now: float) -> int:
        """Delete cancel markers older than ``jobs.cancel_marker_ttl_seconds``.

        Markers are suspended, so the TTL controller never takes them; without this
        they pile up for ever. Each replica may sweep: the uid precondition and a
        404 make a second delete harmless. Returns how many were deleted.
        """
        ttl = self.settings.jobs.cancel_marker_ttl_seconds
        if ttl <= 0:
            return 0
        markers, _ = self.kube.list_jobs(selector=f"{self.labels.key('cancel')}=true")
        deleted = 0
        for marker in admission.expired(markers, now=now, ttl_s=ttl):
            name = admission.name_of(marker)
            uid = str((marker.get("metadata") or {}).get("uid") or "") or None
            try:
                self.kube.delete_job(name, uid=uid)
            except KubeError as error:
                log.warning("cancel marker %s not deleted (%s); next sweep retries", name, error)
                continue
            deleted += 1
            log.info("cancel marker %s expired after %d s: deleted", name, ttl)
        return deleted
