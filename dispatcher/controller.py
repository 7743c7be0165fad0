"""The admission reconciler, keyed by RB: when an RB frees up, admit its next waiting run.

The Job cache (``jobcache``, fed by ``jobwatch``) is only a cache: it is rebuilt from a
list on every start (and after any watch gap), and every decision that matters is made
true by a Lease compare-and-swap against the API. Admission is driven by watch events,
so a run waiting on a finished RB is unsuspended within one API round trip, not a poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from dispatcher import admission, faults, voids
from dispatcher.admission import Action
from dispatcher.capslots import CapSlots
from dispatcher.events import WaitingEvents
from dispatcher.identity import Labels
from dispatcher.jobcache import JobCache, slim
from dispatcher.jobwatch import SYNC, JobWatch, Observer
from dispatcher.kube import Kube, KubeError, NotFound, Unavailable
from dispatcher.leases import RbLeases, holder_of
from dispatcher.logs import job_logger
from dispatcher.metrics import Metrics
from dispatcher.pods import PodCache, PodView, PodWatch
from dispatcher.voidjobs import VoidJobs
from dispatcher.workqueue import Claims, WorkQueue

log = logging.getLogger(__name__)
Job = dict[str, Any]
# Admission workers: different RBs are handed over in parallel, one RB never twice at once.
ADMISSION_WORKERS = 4
API_PROBE_S = 2.0  # readiness asks the API server's /readyz at most this often
PODS_UNSYNCED_RETRY_S = 0.2


class Controller:
    """Keeps every RB's Lease and Jobs consistent: at most one running run per RB."""

    def __init__(
        self,
        *,
        kube: Kube,
        labels: Labels,
        identity: str,
        caps: admission.Caps,
        resync_seconds: float,
        pods: PodCache | None = None,
        cache: JobCache | None = None,
        observers: Sequence[Observer] = (),
        metrics: Metrics | None = None,
        void_image: str = "autoreduce-runner:0.1.0",
        fault_point: faults.FaultPoint | None = None,
    ) -> None:
        self.kube = kube
        self.labels = labels
        self.pods = pods if pods is not None else PodCache()
        self.cache = cache if cache is not None else JobCache(labels)
        self.metrics = metrics if metrics is not None else Metrics()
        self.creating = Claims()
        self.voids = VoidJobs(kube=kube, labels=labels, image=void_image,
                              fault_point=fault_point)
        self.waiting_events = WaitingEvents(kube=kube, on_drop=self.metrics.events_dropped.inc)
        self.leases = RbLeases(kube=kube, labels=labels, identity=identity)
        self.queue = WorkQueue()
        self._stop = threading.Event()
        self.watch = JobWatch(kube=kube, labels=labels, cache=self.cache,
                              observers=[self, *observers], metrics=self.metrics,
                              resync_seconds=resync_seconds, stop=self._stop,
                              hold_first_list_s=faults.first_list_hold_s(fault_point))
        self._threads: list[threading.Thread] = []
        self.slots = CapSlots(labels=labels, caps=caps, cache=self.cache,
                              waiting_events=self.waiting_events)
        self._api_ready = (0.0, False)  # (monotonic time of the probe, its answer)

    # -- start, stop, health -------------------------------------------------------

    def start(self) -> None:
        self.waiting_events.start()
        pod_watch = PodWatch(kube=self.kube, labels=self.labels, cache=self.pods,
                             on_change=self.watch.pod_changed, stop=self._stop)
        targets = [(pod_watch.run, "pod-watch"), (self.watch.run, "job-watch")]
        targets += [(self._work_loop, f"admission-{n}") for n in range(ADMISSION_WORKERS)]
        for target, name in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self.queue.shut_down()
        self.waiting_events.stop()

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def api_ready(self) -> bool:
        """Readiness of our API side: the watch is up *and* the API server says it can
        serve (its /readyz checks etcd; a watch fed from its cache does not notice an
        etcd outage, while every create would fail). Probed at most every 2 s."""
        if not self.watch.healthy:
            return False
        probed_at, ready = self._api_ready
        if time.monotonic() - probed_at > API_PROBE_S:
            ready = self.kube.healthy()
            self._api_ready = (time.monotonic(), ready)
        return ready

    def wait_pods_synced(self, timeout: float) -> bool:
        """The first pod list is in: enough to consume. The Job list may take many
        seconds more at 50,000 waiting runs; until it is in, a run on a free RB is
        admitted from the API's view of its RB (``jobs_of_rb``) and every other waits."""
        return self.pods.synced.wait(timeout)

    def observe(self, job: Job) -> None:
        """Our own write, seen before the watch delivers it."""
        self.cache.upsert(job)

    def enqueue(self, rb: str) -> None:
        if rb:
            self.queue.add(rb)

    def jobs_of_rb(self, rb: str) -> list[Job]:
        """The RB's Jobs: from the cache once the first list is in, else from the API
        (one list by label, answered from the API server's watch cache)."""
        if self.cache.synced.is_set():
            return self.cache.of_rb(rb)
        selector = f"{self.labels.managed}=true,{self.labels.key('rb-number')}={rb}"
        jobs, _ = self.kube.list_jobs(selector=selector, keep=slim)
        return jobs

    def admitted_directly(self, job: Job) -> None:
        """A run created running under its RB's Lease (``dispatcher.direct``)."""
        self.cache.upsert(job)
        rb = self.cache.rb_of(job)
        self.waiting_events.record(job, reason="Admitted", note=f"RB {rb} was free: reducing")
        self._observe_admitted(job)

    # -- event handlers (``jobwatch.Observer``): they only queue RBs ------------------

    def job_changed(self, kind: str, job: Job) -> None:
        name = admission.name_of(job)
        rb = self.cache.rb_of(job)
        if kind == SYNC:
            self.enqueue(rb)
            return
        if kind == "DELETED":
            self.waiting_events.forget(name)
        if kind == "DELETED" or admission.is_finished(job) or admission.is_waiting(job):
            self.enqueue(rb)
            if admission.is_finished(job) or kind == "DELETED":
                self._requeue_cap_blocked()

    def pod_changed(self, view: PodView, deleted: bool) -> None:
        """A pod that stopped or went away may free its RB."""
        if deleted or not view.live:
            self.enqueue(view.rb)

    def _requeue_cap_blocked(self) -> None:
        for rb in self.slots.take_blocked():
            self.enqueue(rb)

    # -- admission -----------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            rb = self.queue.get(timeout=1.0)
            if rb is None:
                continue
            try:
                self.reconcile(rb)
                self.queue.forget(rb)
            except Unavailable as error:
                delay = self.queue.retry(rb)
                log.warning("RB %s: API unavailable (%s); retrying in %.2fs", rb, error, delay)
            except KubeError as error:
                delay = self.queue.retry(rb)
                log.error("RB %s: %s; retrying in %.2fs", rb, error, delay)
            finally:
                self.queue.done(rb)

    def reconcile(self, rb: str) -> None:
        """Bring one RB to its right state; safe to run any number of times anywhere."""
        if not self.pods.synced.is_set():
            # Without the pods we cannot tell a free RB from one whose last pod is
            # still stopping: wait for the first pod list (a second or two).
            self.queue.add_after(rb, PODS_UNSYNCED_RETRY_S)
            return
        if not self.cache.synced.is_set():
            # Without every Job we cannot tell which of an RB's runs waited longest.
            # No requeue: the first Job list tells every Job it holds (jobwatch), and
            # at 50,000 runs it is many seconds of thousands of RBs otherwise.
            return
        if rb in self.creating:
            return  # a direct admission of ours is creating its Job; it enqueues rb after
        jobs = self.cache.of_rb(rb)
        busy = admission.occupant(jobs)
        if busy is not None:
            # A run of this RB is reducing: its finish event brings us back. Skipping
            # the Lease read here saves one GET per arrival on a busy RB (the bench's
            # scale scenario read each RB's Lease twice per waiting run).
            self.waiting_events.held(self.labels, rb=rb, jobs=jobs, holder=busy)
            return
        # When every Job we know of for this RB has only ever waited, no Lease is
        # expected: skip the read and let the create (a CAS too) tell us otherwise.
        lease = None if self.leases.probably_absent(rb, jobs) else self.leases.read(rb)
        holder = holder_of(lease)
        if holder and not self._holder_known(rb, holder, lease):
            return
        jobs = self.cache.of_rb(rb)
        plan = admission.plan_rb(
            labels=self.labels, holder=holder, jobs=jobs, lease_exists=lease is not None
        )
        lingering = self.pods.live_of_rb(rb)
        if plan.action in (Action.ADMIT, Action.RELEASE) and lingering:
            # The holder's Job has its verdict, but a pod of this RB is still stopping
            # (grace period after a deletion, eviction or deadline; or a Job deleted
            # under its pods): the RB stays held until that pod is gone. Its next pod
            # event brings us back.
            log.info("RB %s: held until pod %s has stopped", rb, lingering[0].name)
            return
        if plan.action in (Action.KEEP, Action.RESUME) and plan.job is not None:
            self.waiting_events.held(self.labels, rb=rb, jobs=jobs, holder=plan.job)
        if plan.action is Action.RESUME and plan.job is not None:
            self._unsuspend(plan.job)
        elif plan.action is Action.ADMIT and plan.job is not None:
            self._admit(rb, plan.job, lease)
        elif (
            plan.action is Action.RELEASE
            and lease is not None
            and not self.leases.release(rb=rb, base=lease)
        ):
            self.enqueue(rb)  # the Lease moved under us: look again

    def _holder_known(self, rb: str, holder: str, lease: Job | None) -> bool:
        """Make our view of the Lease's holder good enough to plan on: False when this
        pass must end (the RB is requeued, or an event will bring it back)."""
        if self.cache.get(holder) is None:
            # Not in our cache: maybe another replica just made it. Ask the API
            # before treating the Lease as stale.
            confirmed = self.kube.get_job(holder)
            if confirmed is not None and not voids.is_void(self.labels, confirmed):
                self.cache.upsert(confirmed)
            elif confirmed is None and lease is not None and voids.is_direct(self.labels, lease):
                return self._void(rb, holder, lease)
        # Granted before it existed, and now being deleted (a cancellation): once it is
        # gone its name could be created again, so the Lease moves only after a void has
        # taken it. Its DELETED event brings us back.
        deleting = admission.is_deleting(self.cache.get(holder) or {})
        return not (deleting and voids.is_direct(self.labels, lease))

    def _void(self, rb: str, holder: str, lease: Job) -> bool:
        """The Lease was granted to ``holder`` before it existed, and it still does not:
        take its name with a void Job before the Lease may move (``dispatcher.voids``).
        True when the void is there; False when this pass must end (rb is requeued)."""
        wait = voids.reclaim_wait(lease, now=time.time())
        if wait > 0:
            self.queue.add_after(rb, wait)
            return False
        winner = self.voids.take(rb=rb, holder=holder)
        if winner is None:
            return True
        if winner:
            self.cache.upsert(winner)  # its own create won: the Lease stays with it
        self.enqueue(rb)
        return False

    def _admit(self, rb: str, job: Job, lease: Job | None) -> None:
        if not self.slots.capped():
            self._admit_within_caps(rb, job, lease)
            return
        # Admission workers run in parallel; counting and taking a slot must not.
        with self.slots.lock:
            self._admit_within_caps(rb, job, lease)

    def _admit_within_caps(self, rb: str, job: Job, lease: Job | None) -> None:
        if self.slots.capped() and not self.slots.room_for(rb, job):
            return
        name = admission.name_of(job)
        if not self.leases.grant(rb=rb, job=name, base=lease):
            if lease is None:
                self.leases.note_exists(rb)
            self.enqueue(rb)  # someone else moved the Lease: look again
            return
        self._unsuspend(job)
        # Commentary, not state: written off the admission path so hand-off waits for
        # two API calls (Lease, unsuspend), not three.
        self.waiting_events.record(job, reason="Admitted", note=f"RB {rb} is free: reducing")
        self._observe_admitted(job)
        self.waiting_events.held(self.labels, rb=rb, jobs=self.cache.of_rb(rb), holder=job)

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
            self.cache.remove(name)
            self.enqueue(self.cache.rb_of(job))
            return
        self.cache.upsert(updated)
