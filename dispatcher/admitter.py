"""The admission reconciler, keyed by RB: when an RB frees up, admit its next waiting run.

Safe to run any number of times anywhere: ``admission.plan_rb`` decides from the
caches, and the Lease compare-and-swap (``leases``) makes the decision true across
replicas. Admission is driven by watch events through the work queue, so a run
waiting on a finished RB is unsuspended within one API round trip, not a poll.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from dispatcher import admission
from dispatcher.admission import Action
from dispatcher.caches import JobCache, PodCache
from dispatcher.events import WaitingEvents, caps_note, held_note
from dispatcher.identity import Labels
from dispatcher.keys import Key, Kind
from dispatcher.kube import Kube, NotFound
from dispatcher.leases import RbLeases, holder_of
from dispatcher.logs import job_logger
from dispatcher.metrics import Metrics
from dispatcher.workqueue import WorkQueue

log = logging.getLogger(__name__)
Job = dict[str, Any]
PODS_UNSYNCED_RETRY_S = 0.2


class Admitter:
    def __init__(self, *, kube: Kube, labels: Labels, identity: str, caps: admission.Caps,
                 jobs: JobCache, pods: PodCache, queue: WorkQueue, events: WaitingEvents,
                 metrics: Metrics) -> None:
        self.kube = kube
        self.labels = labels
        self.caps = caps
        self.jobs = jobs
        self.pods = pods
        self.queue = queue
        self.events = events
        self.metrics = metrics
        self.leases = RbLeases(kube=kube, labels=labels, identity=identity)
        # Counting the running Jobs and taking a slot is one step across workers, and
        # marking an RB cap-blocked is part of it: a slot freed between a worker's
        # count and its mark would otherwise leave that RB blocked with room to run.
        self._caps_lock = threading.Lock()
        self._cap_blocked: set[str] = set()  # RBs waiting for a cap slot; under _caps_lock
        # RBs whose optimistic Lease create was refused: read the Lease next time.
        self._lease_exists_hint: set[str] = set()
        self._hint_lock = threading.Lock()

    def reconcile(self, rb: str) -> float | None:
        """Move one RB a step towards "its next run reduces once the last has stopped";
        returns when to look again (None: an event will bring us back)."""
        if not self.pods.synced.is_set():
            # Without the pods we cannot tell a free RB from one whose last pod is
            # still stopping: wait for the first pod list.
            return PODS_UNSYNCED_RETRY_S
        jobs = self.jobs.of_rb(rb)
        self.events.retain(rb, {admission.name_of(job) for job in jobs})
        busy = admission.occupant(jobs)
        if busy is not None:
            # A run of this RB is reducing: its finish event brings us back. Skipping
            # the Lease read here saves one GET per arrival on a busy RB.
            self._note_held(rb, jobs, busy)
            return None
        # When every Job we know of for this RB has only ever waited, no Lease is
        # expected: skip the read and let the create (a CAS too) tell us otherwise.
        lease = None if self._lease_probably_absent(rb, jobs) else self.leases.read(rb)
        holder = holder_of(lease)
        if holder and self.jobs.get(holder) is None:
            # Not in our cache: maybe another replica just made it. Ask the API
            # before treating the Lease as stale.
            confirmed = self.kube.get_job(holder)
            if confirmed is not None:
                self.jobs.upsert(confirmed)
                jobs = self.jobs.of_rb(rb)
        plan = admission.plan_rb(
            labels=self.labels, holder=holder, jobs=jobs, lease_exists=lease is not None
        )
        self._carry_out(rb, plan, jobs, lease)
        return None

    def wake_cap_blocked(self) -> None:
        """A cap slot may have freed: every RB that waited for one looks again."""
        with self._caps_lock:
            blocked, self._cap_blocked = self._cap_blocked, set()
        for rb in blocked:
            self.queue.add(Key(Kind.RB, rb))

    def _carry_out(self, rb: str, plan: admission.Plan, jobs: list[Job],
                   lease: Job | None) -> None:
        lingering = self.pods.live_of_rb(rb)
        if plan.action in (Action.ADMIT, Action.RELEASE) and lingering:
            # The holder's Job has its verdict, but a pod of this RB is still stopping
            # (grace period after a deletion, eviction or deadline; or a Job deleted
            # under its pods): the RB stays held until that pod is gone. Its next pod
            # event brings us back.
            log.info("RB %s: held until pod %s has stopped", rb, lingering[0].name)
            return
        if plan.action in (Action.KEEP, Action.RESUME) and plan.job is not None:
            self._note_held(rb, jobs, plan.job)
        if plan.action is Action.RESUME and plan.job is not None:
            self._unsuspend(plan.job)
        elif plan.action is Action.ADMIT and plan.job is not None:
            self._admit(rb, plan.job, lease)
        elif (
            plan.action is Action.RELEASE
            and lease is not None
            and not self.leases.release(rb=rb, base=lease)
        ):
            self.queue.add(Key(Kind.RB, rb))  # the Lease moved under us: look again

    def _admit(self, rb: str, job: Job, lease: Job | None) -> None:
        if not self._capped():
            self._admit_within_caps(rb, job, lease)
            return
        # Admission workers run in parallel; counting and taking a slot must not.
        with self._caps_lock:
            self._admit_within_caps(rb, job, lease)

    def _admit_within_caps(self, rb: str, job: Job, lease: Job | None) -> None:
        if self._capped() and not self._room_for(rb, job):
            return
        name = admission.name_of(job)
        if not self.leases.grant(rb=rb, job=name, base=lease):
            if lease is None:
                with self._hint_lock:
                    self._lease_exists_hint.add(rb)
            self.queue.add(Key(Kind.RB, rb))  # someone else moved the Lease: look again
            return
        self._unsuspend(job)
        # Commentary, not state: written off the admission path so hand-off waits for
        # two API calls (Lease, unsuspend), not three.
        self.events.record(job, reason="Admitted", note=f"RB {rb} is free: reducing")
        self._observe_admitted(job)
        self._note_held(rb, self.jobs.of_rb(rb), job)

    def _lease_probably_absent(self, rb: str, jobs: list[Job]) -> bool:
        """True when the RB's Jobs are all still waiting and no create was refused.

        A wrong guess costs one refused create (409) and a read on the next pass;
        exclusivity never rests on the guess, only on the compare-and-swap.
        """
        with self._hint_lock:
            if rb in self._lease_exists_hint:
                self._lease_exists_hint.discard(rb)
                return False
        return bool(jobs) and all(admission.is_waiting(job) for job in jobs)

    def _capped(self) -> bool:
        return self.caps.max_running is not None or bool(self.caps.per_instrument)

    def _room_for(self, rb: str, job: Job) -> bool:
        """Whether the caps let ``job`` start; if not, its RB waits for a slot (noted).

        Called with ``_caps_lock`` held: the count and the mark are one step."""
        running = [other for other in self.jobs.running() if other is not job]
        if admission.caps_allow(labels=self.labels, caps=self.caps, job=job, running=running):
            return True
        self._cap_blocked.add(rb)
        note = caps_note(self.labels, caps=self.caps, job=job, running=running)
        for waiting in self.jobs.of_rb(rb):
            if admission.is_waiting(waiting):
                self.events.waiting(waiting, note, rb=rb)
        return False

    def _note_held(self, rb: str, jobs: list[Job], holder: Job) -> None:
        """A Waiting Event (once per Job) on every other waiting run of the RB."""
        holder_name = admission.name_of(holder)
        note = held_note(self.labels, rb=rb, holder=holder, holder_name=holder_name)
        for job in jobs:
            if admission.is_waiting(job) and admission.name_of(job) != holder_name:
                self.events.waiting(job, note, rb=rb)

    def _observe_admitted(self, job: Job) -> None:
        self.metrics.admitted.inc()
        created = admission.created_at(job)
        if created is not None:
            self.metrics.admission_latency.observe(max(time.time() - created, 0.0))
        job_logger(log, self.labels, job).info("admitted %s", admission.name_of(job))

    def _unsuspend(self, job: Job) -> None:
        name = admission.name_of(job)
        try:
            updated = self.kube.set_suspend(name, suspend=False)
        except NotFound:
            # Cancelled between our read and now: the Lease is stale, look again.
            self.jobs.remove(name)
            self.queue.add(Key(Kind.RB, self.jobs.rb_of(job)))
            return
        self.jobs.upsert(updated)
