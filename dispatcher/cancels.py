"""Cancellations: of a waiting run (deleted, its error posted), of a running one (its pods
stopped first, then settled by the outcome path from what its runner left), and of a
run not seen yet (remembered as a suspended marker Job under the run's name, so that
the run is dropped when it arrives). Markers and voids expire by ``sweep_markers``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import jinja2
from autoreduce_common.messages import Outcome, ReductionMessage

from dispatcher import admission, failures, voids
from dispatcher.config import DispatcherSettings
from dispatcher.controller import Controller
from dispatcher.identity import Labels, RunKey, job_name, run_key
from dispatcher.kube import AlreadyExists, Kube, KubeError
from dispatcher.logs import run_logger
from dispatcher.manifests import Arrival, render_job, stored_message
from dispatcher.metrics import Metrics
from dispatcher.outcome_state import OUTCOME_KEY, VERDICT_KEY, OutcomeState, state_of
from dispatcher.reporting import Reporter, error_body

log = logging.getLogger(__name__)


class Cancels:
    def __init__(self, *, settings: DispatcherSettings, kube: Kube, controller: Controller,
                 reporter: Reporter, template: jinja2.Template, metrics: Metrics) -> None:
        self.settings = settings
        self.kube = kube
        self.controller = controller
        self.reporter = reporter
        self.template = template
        self.metrics = metrics
        self.labels = Labels(settings.jobs.label_prefix)

    def is_marker(self, job: dict[str, Any]) -> bool:
        labels = (job.get("metadata") or {}).get("labels") or {}
        return labels.get(self.labels.key("cancel")) == "true"

    def drop_cancelled(self, key: RunKey, raw: dict[str, Any], marker: dict[str, Any]) -> None:
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
        self.metrics.outcome_posted(Outcome.ERROR.value, "CancelledBeforeDispatch")
        run_logger(log, key).info("dropped %s: it was cancelled before it arrived", key.describe())

    def cancel(self, raw: dict[str, Any], message: ReductionMessage) -> None:
        key = run_key(message)
        job = self.kube.get_job(job_name(key))
        if job is not None and voids.is_void(self.labels, job):
            # The run is not in the cluster, but a void has its name: deleting the void
            # early would let a late create run it (dispatcher.voids), so the cancel
            # waits in the broker until the void may go, and is then remembered.
            self.controller.voids.clear(job)
            job = None
        self.metrics.cancels.inc()
        if job is None:
            self._remember_cancel(key)
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
        if running and self.controller.pods.of_job(name):
            # Its runner may be about to post (or posting) its own outcome: stop the
            # pods first; the outcome path settles it from the runner's record once they
            # have stopped, so a run never gets both a Complete and "cancelled".
            if state is None:
                self.kube.annotate_job(name, {self.labels.key(OUTCOME_KEY):
                                              OutcomeState.CANCELLING})
                self.kube.record_event(job=job, reason="Cancelled",
                                       note="Run cancelled while reducing: stopping its pod")
        elif state not in (OutcomeState.CANCELLED, OutcomeState.CANCELLING):
            self._post_cancelled(key, job, raw, state=state, running=running)
        self.kube.delete_job(name, propagation="Foreground" if running else "Background",
                             grace_s=30)
        self.controller.enqueue(key.rb_number)
        run_logger(log, key).info(
            "cancelled %s (%s)", key.describe(), "running" if running else "waiting"
        )

    def _post_cancelled(self, key: RunKey, job: dict[str, Any], raw: dict[str, Any], *,
                        state: OutcomeState | None, running: bool) -> None:
        """A waiting run (or a running one whose pod does not exist yet): no runner can
        have posted, so the cancellation's error is the outcome."""
        note = "Run cancelled while reducing" if running else "Run cancelled while waiting"
        stored = stored_message(self.labels, self.kube.get_job(job_name(key)),
                                lambda: self.kube.get_config_map(job_name(key)))
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
        self.metrics.outcome_posted(Outcome.ERROR.value, "Cancelled")
        self.kube.annotate_job(name, {outcome_key: OutcomeState.CANCELLED})
        self.kube.record_event(job=job, reason="Cancelled", note=note)

    def _remember_cancel(self, key: RunKey) -> None:
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
        """Delete cancel markers and voids older than ``jobs.cancel_marker_ttl_seconds``.

        Both are suspended, so the TTL controller never takes them; without this
        they pile up for ever. Each replica may sweep: the uid precondition and a
        404 make a second delete harmless. A void is never swept before it may be
        deleted at all (``voids.VOID_DELETABLE_AFTER_S``). Returns how many were deleted.
        """
        ttl = self.settings.jobs.cancel_marker_ttl_seconds
        if ttl <= 0:
            return 0
        deleted = 0
        for label, ttl_s in (("cancel", ttl), (voids.VOID_LABEL,
                                               max(ttl, voids.VOID_DELETABLE_AFTER_S))):
            found, _ = self.kube.list_jobs(selector=f"{self.labels.key(label)}=true")
            deleted += sum(self._sweep(job, kind=label, ttl_s=ttl_s)
                           for job in admission.expired(found, now=now, ttl_s=ttl_s))
        return deleted

    def _sweep(self, job: dict[str, Any], *, kind: str, ttl_s: float) -> bool:
        name = admission.name_of(job)
        uid = str((job.get("metadata") or {}).get("uid") or "") or None
        try:
            self.kube.delete_job(name, uid=uid)
        except KubeError as error:
            log.warning("%s Job %s not deleted (%s); next sweep retries", kind, name, error)
            return False
        log.info("%s Job %s expired after %d s: deleted", kind, name, ttl_s)
        return True
