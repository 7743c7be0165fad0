"""The outcome reconciler, keyed by Job: exactly one outcome per run, then its pods go.

The desired state of a run's Job is "one outcome posted, its stopped pods released".
``outcome_state.next_step`` says from the caches which step moves it there; this
module carries the step out. Each Job is settled once across all replicas: the step
that posts first claims the Job by writing the ``<prefix>/outcome`` annotation with a
compare-and-swap on its resourceVersion, recording the verdict it is about to post.
Every write's result goes back into the Job cache, so a second pass of the same key
(the watch echoing our own write) reads our state, never an older one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from autoreduce_common.messages import Outcome

from dispatcher import admission, failures, faults
from dispatcher.caches import JobCache, PodCache
from dispatcher.identity import Labels
from dispatcher.kube import Conflict, Kube, KubeError, NotFound
from dispatcher.manifests import message_of
from dispatcher.on_behalf import OnBehalf
from dispatcher.outcome_state import (
    IN_PROGRESS,
    OUTCOME_KEY,
    VERDICT_KEY,
    OutcomeState,
    Step,
    next_step,
    state_of,
)
from dispatcher.pods import pod_view

log = logging.getLogger(__name__)
Obj = dict[str, Any]

CANCELLED_RUNNING = "Run cancelled while reducing"
UNSYNCED_RETRY_S = 0.2
LOG_TAIL_LINES = 20


class Outcomes:
    def __init__(self, *, kube: Kube, labels: Labels, jobs: JobCache, pods: PodCache,
                 on_behalf: OnBehalf, image_pull_grace_s: float,
                 fault_point: faults.FaultPoint | None = None) -> None:
        self.kube = kube
        self.labels = labels
        self.jobs = jobs
        self.pods = pods
        self.on_behalf = on_behalf
        self.image_pull_grace_s = image_pull_grace_s
        self.fault_point = fault_point
        # When each run's pod was first seen unable to start. Only the worker holding
        # that Job's key touches its entry (the queue never gives a key to two).
        self._stuck_since: dict[str, float] = {}

    def reconcile(self, name: str) -> float | None:
        """Move Job ``name`` one step towards its settled outcome; returns when to look
        again (None: an event brings us back). KubeError or BrokerError: retry later."""
        if not (self.jobs.synced.is_set() and self.pods.synced.is_set()):
            # Before the first lists, a pod's Job would look gone and cost a GET.
            return UNSYNCED_RETRY_S
        job = self.jobs.get(name)
        views = self.pods.of_job(name)
        if job is None and any(v.finalized and not v.live for v in views):
            job = self._confirm_gone(name)
        annotations = ((job or {}).get("metadata") or {}).get("annotations") or {}
        step = next_step(
            exists=job is not None,
            state_value=annotations.get(self.labels.key(OUTCOME_KEY)),
            finished=job is not None and admission.is_finished(job),
            succeeded=job is not None and admission.succeeded(job),
            pods_live=any(v.live for v in views),
            pods_stuck=self.image_pull_grace_s > 0 and any(v.stuck for v in views),
            pods_released=bool(views) and not any(v.finalized or v.live for v in views),
        )
        if step is not Step.CHECK_STUCK:
            self._stuck_since.pop(name, None)
        if job is None:
            self._release(name, orphan=True)
        elif step is Step.RELEASE:
            self._release(name)
        elif step is Step.SETTLE_CANCELLED:
            self._settle_cancelled(job)
        elif step is Step.SETTLE_FAILED:
            self._settle_failed(job)
        elif step is Step.CHECK_STUCK:
            return self._check_stuck(job)
        return None

    # -- releasing pods ------------------------------------------------------------

    def _confirm_gone(self, name: str) -> Obj | None:
        """Our cache has no Job for these pods: ask the API before releasing them."""
        fresh = self.kube.get_job(name)
        if fresh is not None:
            self.jobs.upsert(fresh)
        return fresh

    def _release(self, name: str, *, orphan: bool = False) -> None:
        """Remove our finalizer from the Job's stopped pods: its outcome is settled."""
        for view in self.pods.of_job(name):
            if view.finalized and not view.live:
                if orphan:
                    log.warning("pod %s outlived its Job %s: released without an outcome "
                                "check", view.name, name)
                self.kube.remove_pod_finalizer(view.name, finalizer=self.labels.pod_finalizer)
                self.pods.upsert(dataclasses.replace(view, finalized=False))

    def _mark(self, name: str, annotations: dict[str, str | None], *,
              resource_version: str | None = None) -> Obj:
        """Annotate the Job and keep what the API answered (read-your-writes)."""
        updated = self.kube.annotate_job(name, annotations, resource_version=resource_version)
        self.jobs.upsert(updated)
        return updated

    # -- failed runs ---------------------------------------------------------------

    def _settle_failed(self, job: Obj) -> None:
        name = admission.name_of(job)
        recorded = self._recorded_verdict(job)
        if recorded is not None:
            # Claimed and decided before a crash or a failed send (ours or another
            # replica's): post exactly what was decided, marked as a possible repeat.
            self._settle(job, recorded)
            return
        pods = self.kube.list_pods(selector=f"batch.kubernetes.io/job-name={name}")
        verdict = failures.classify(job=job, pods=pods, log_tail="")
        retried = verdict.transient and self.on_behalf.retry.by_dispatcher
        if verdict.posted_by_runner and not retried:
            self._release(name)  # the runner reported and nothing is to be retried
            return
        if not verdict.posted_by_runner and verdict.outcome is Outcome.ERROR:
            verdict = failures.classify(job=job, pods=pods, log_tail=self._log_tail(pods))
        claimed = self._claim(job, verdict)
        if claimed is not None:
            self._settle(claimed, verdict)

    def _settle_cancelled(self, job: Obj) -> None:
        """A running run was cancelled and its pods have stopped: the runner's outcome
        stands if it had begun to send one; else the cancellation's error is posted."""
        name = admission.name_of(job)
        pods = self.kube.list_pods(selector=f"batch.kubernetes.io/job-name={name}")
        if any(pod_view(pod, labels=self.labels).live for pod in pods):
            return  # our cache is behind: its stopped-pod event brings us back
        verdict = failures.cancelled(pods=pods, note=CANCELLED_RUNNING)
        if verdict.posted_by_runner:
            self._mark(name, {self.labels.key(OUTCOME_KEY): OutcomeState.DONE})
            self._release(name)
            return
        claimed = self._claim(job, verdict)
        if claimed is not None:
            self._settle(claimed, verdict)

    def _settle(self, job: Obj, verdict: failures.Verdict) -> None:
        name = admission.name_of(job)
        raw = self._message(name)
        if not verdict.posted_by_runner:
            faults.reach(faults.FaultPoint.BEFORE_OUTCOME_SEND, configured=self.fault_point)
            self.on_behalf.post(job, raw, verdict)
            faults.reach(faults.FaultPoint.AFTER_OUTCOME_SEND, configured=self.fault_point)
        if verdict.transient and verdict.outcome is Outcome.ERROR:
            self.on_behalf.maybe_retry(job, raw, verdict)
        self._mark(name, {self.labels.key(OUTCOME_KEY): OutcomeState.DONE})
        self._release(name)

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
            return self._mark(name, {self.labels.key(VERDICT_KEY): failures.render_verdict(
                dataclasses.replace(verdict, possible_repeat=True))})
        try:
            return self._mark(
                name,
                {self.labels.key(OUTCOME_KEY): OutcomeState.HANDLING,
                 self.labels.key(VERDICT_KEY): failures.render_verdict(verdict)},
                resource_version=job["metadata"]["resourceVersion"],
            )
        except Conflict:
            return self._claim_again(name, verdict)
        except NotFound:
            return None

    def _claim_again(self, name: str, verdict: failures.Verdict) -> Obj | None:
        """The Job changed under our claim: claim again unless someone else settled or
        decided it meanwhile."""
        fresh = self.kube.get_job(name)
        if fresh is None:
            return None
        self.jobs.upsert(fresh)
        value = (fresh.get("metadata", {}).get("annotations") or {}).get(
            self.labels.key(OUTCOME_KEY))
        if value and state_of(value) not in IN_PROGRESS:
            return None  # settled meanwhile
        if self._recorded_verdict(fresh) is not None:
            return None  # another replica decided; it (or its successor) posts
        return self._claim(fresh, verdict)

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

    # -- pods that cannot start ----------------------------------------------------

    def _check_stuck(self, job: Obj) -> float | None:
        """Fail a run whose pod has been unable to start (image pull) past the grace."""
        name = admission.name_of(job)
        since = self._stuck_since.setdefault(name, time.monotonic())
        remaining = self.image_pull_grace_s - (time.monotonic() - since)
        if remaining > 0:
            return remaining
        reason = next((v.stuck for v in self.pods.of_job(name) if v.stuck), "") or ""
        verdict = failures.Verdict(
            False,
            "ImagePullBackOff",
            f"Reduction pod could not start after {self.image_pull_grace_s:.0f} s: {reason}",
            transient=False,
        )
        claimed = self._claim(job, verdict)
        if claimed is not None:
            self.on_behalf.post(claimed, self._message(name), verdict)
            self._mark(name, {self.labels.key(OUTCOME_KEY): OutcomeState.DONE})
            self.kube.delete_job(name, propagation="Background")
        self._stuck_since.pop(name, None)
        return None
