"""The admission loop: watch Jobs, and when an RB frees up admit its next waiting run.

The Job cache (``jobcache``) is only a cache: it is rebuilt from a list on every start
(and after any watch gap), and every decision that matters is made true by a Lease
compare-and-swap against the API. Admission is driven by watch events, so a run
waiting on a finished RB is unsuspended within one API round trip, not a poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from dispatcher import admission, faults, voids
from dispatcher.admission import Action
from dispatcher.events import WaitingEvents, caps_note, held_note
from dispatcher.identity import Labels
from dispatcher.jobcache import JobCache, slim
from dispatcher.kube import AlreadyExists, Gone, Kube, KubeError, NotFound, Unavailable
from dispatcher.leases import RbLeases, holder_of
from dispatcher.logs import job_logger
from dispatcher.metrics import Metrics
from dispatcher.pods import PodCache, PodView, PodWatch
from dispatcher.workqueue import Claims, RbQueue

log = logging.getLogger(__name__)
Job = dict[str, Any]
FinishedHook = Callable[[Job], None]
# Told about a reduction pod that has stopped and still carries our finalizer, with
# its Job as our cache knows it (None when the cache has none).
PodStoppedHook = Callable[[PodView, Job | None], None]
# Admission workers: different RBs are handed over in parallel, one RB never twice at once.
ADMISSION_WORKERS = 4
API_PROBE_S = 2.0  # readiness asks the API server's /readyz at most this often
# Re-list at least this often while the API is away: a re-list is one call, and a
# longer cap only delays admission once the API is back (10 s cost up to 10 s).
WATCH_BACKOFF_MAX_S = 3.0


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
        on_finished: FinishedHook | None = None,
        on_pod_stopped: PodStoppedHook | None = None,
        metrics: Metrics | None = None,
        void_image: str = "autoreduce-runner:0.1.0",
        fault_point: faults.FaultPoint | None = None,
        offers: Claims | None = None,
    ) -> None:
        self.kube = kube
        self.pods = pods if pods is not None else PodCache()
        self.creating = Claims()
        self._void_image = void_image
        self._fault_point = fault_point
        self._on_pod_stopped = on_pod_stopped
        self.metrics = metrics if metrics is not None else Metrics()
        self.waiting_events = WaitingEvents(kube=kube, on_drop=self.metrics.events_dropped.inc)
        self.labels = labels
        self.caps = caps
        self.cache = JobCache(labels)
        self.leases = RbLeases(kube=kube, labels=labels, identity=identity)
        self.queue = RbQueue()
        self._resync_seconds = resync_seconds
        self._on_finished = on_finished
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._threads: list[threading.Thread] = []
        self._caps_lock = threading.Lock()
        self._cap_blocked: set[str] = set()  # RBs waiting for a cap slot; under _caps_lock
        # RBs whose optimistic Lease create was refused: read the Lease next time.
        self._lease_exists_hint: set[str] = set()
        self._hint_lock = threading.Lock()
        self._offers = offers if offers is not None else Claims()
        self.api_healthy = False
        self._api_ready = (0.0, False)  # (monotonic time of the probe, its answer)

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        self.waiting_events.start()
        pod_watch = PodWatch(kube=self.kube, labels=self.labels, cache=self.pods,
                             on_change=self._on_pod, stop=self._stop)
        targets = [(pod_watch.run, "pod-watch"), (self._watch_loop, "job-watch")]
        targets += [(self._work_loop, f"admission-{n}") for n in range(ADMISSION_WORKERS)]
        for target, name in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self.queue.put("")  # wake the worker
        self.waiting_events.stop()

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def api_ready(self) -> bool:
        """Readiness of our API side: the watch is up *and* the API server says it can
        serve (its /readyz checks etcd; a watch fed from its cache does not notice an
        etcd outage, while every create would fail). Probed at most every 2 s."""
        if not self.api_healthy:
            return False
        probed_at, ready = self._api_ready
        if time.monotonic() - probed_at > API_PROBE_S:
            ready = self.kube.healthy()
            self._api_ready = (time.monotonic(), ready)
        return ready

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return self._synced.wait(timeout) and self.pods.synced.wait(
            max(deadline - time.monotonic(), 0.0))

    def observe(self, job: Job) -> None:
        """Our own write, seen before the watch delivers it."""
        self.cache.upsert(job)

    def enqueue(self, rb: str) -> None:
        if rb:
            self.queue.put(rb)

    def enqueue_after(self, rb: str, seconds: float) -> None:
        """Look at ``rb`` again in ``seconds`` (a wait that no watch event ends)."""
        timer = threading.Timer(max(seconds, 0.05), self.enqueue, args=(rb,))
        timer.daemon = True
        timer.start()

    def synced(self) -> bool:
        return self._synced.is_set() and self.pods.synced.is_set()

    def capped(self) -> bool:
        return self.caps.max_running is not None or bool(self.caps.per_instrument)

    def note_lease_exists(self, rb: str) -> None:
        """A Lease create for ``rb`` was refused: read it on the next pass."""
        with self._hint_lock:
            self._lease_exists_hint.add(rb)

    def admitted_directly(self, job: Job) -> None:
        """A run created running under its RB's Lease (``dispatcher.direct``)."""
        self.cache.upsert(job)
        rb = self.cache.rb_of(job)
        self.waiting_events.record(job, reason="Admitted", note=f"RB {rb} was free: reducing")
        self._observe_admitted(job)

    # -- watch ---------------------------------------------------------------------

    def _watch_loop(self) -> None:
        selector = f"{self.labels.managed}=true"
        backoff = 0.2
        failed = False
        while not self._stop.is_set():
            try:
                resource_version = self._relist(selector)
                if failed:
                    self.metrics.api_reconnects.inc()
                failed = False
                backoff = 0.2
                self._follow(selector, resource_version)
            except Gone:
                log.info("Job watch expired; re-listing")
            except KubeError as error:
                self.api_healthy = False
                failed = True
                log.warning("Job watch failed (%s); re-listing in %.1fs", error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, WATCH_BACKOFF_MAX_S)

    def _relist(self, selector: str) -> str:
        # Finished Jobs stay whole: the finished-Job hook reads their pod template.
        jobs, resource_version = self.kube.list_jobs(
            selector=selector,
            keep=lambda job: job if admission.is_finished(job) else slim(job),
        )
        self.cache.replace_all(jobs)
        self.api_healthy = True
        self._synced.set()
        for rb in self.cache.rbs():
            self.enqueue(rb)
        for job in jobs:
            self._maybe_finished(job)
        return resource_version

    def _follow(self, selector: str, resource_version: str) -> None:
        last_resync = time.monotonic()
        while not self._stop.is_set():
            for event in self.kube.watch_jobs(
                selector=selector, resource_version=resource_version, timeout_s=60
            ):
                if event.kind == "BOOKMARK":
                    resource_version = event.obj["metadata"]["resourceVersion"]
                    continue
                resource_version = event.obj.get("metadata", {}).get(
                    "resourceVersion", resource_version
                )
                self._on_event(event.kind, event.obj)
                if self._stop.is_set():
                    return
            if time.monotonic() - last_resync > self._resync_seconds:
                # The safety net, not the admission mechanism: every RB and finished
                # Job is looked at again from the cache. Not a re-list: the watch
                # misses nothing, and at 50,000 waiting runs a re-list is seconds of
                # CPU and twice the cache in memory.
                last_resync = time.monotonic()
                self._replay()

    def _replay(self) -> None:
        for rb in self.cache.rbs():
            self.enqueue(rb)
        for job in self.cache.finished():
            self._maybe_finished(job)

    def _on_event(self, kind: str, job: Job) -> None:
        name = admission.name_of(job)
        if kind == "DELETED":
            self.cache.remove(name)
            self._offers.discard(name)
            self.waiting_events.forget(name)
        else:
            self.cache.upsert(job)
            self._maybe_finished(job)
        if kind == "DELETED" or admission.is_finished(job) or admission.is_waiting(job):
            self.enqueue(self.cache.rb_of(job))
            if admission.is_finished(job) or kind == "DELETED":
                self._requeue_cap_blocked()

    def _maybe_finished(self, job: Job) -> None:
        name = admission.name_of(job)
        hook = self._on_finished
        if hook is not None and admission.is_finished(job) and self._offers.add(name):
            try:
                hook(job)
            except Exception:
                # The hook reports outcomes; a bug there must not stop admission.
                log.exception("finished-Job hook failed for %s", name)

    def _on_pod(self, view: PodView, deleted: bool) -> None:
        """A pod that stopped or went away may free its RB; a stopped one that still
        carries our finalizer waits for its run's outcome to be settled."""
        if deleted or not view.live:
            self.enqueue(view.rb)
        if not deleted and not view.live and view.finalized and self._on_pod_stopped:
            self._on_pod_stopped(view, self.cache.get(view.job))

    def _requeue_cap_blocked(self) -> None:
        # The lock workers hold while they count the caps and mark an RB blocked: a
        # swap between a worker's count and its mark would leave that RB blocked with
        # its slot already free (and iterating the set a worker adds to can raise).
        with self._caps_lock:
            blocked, self._cap_blocked = self._cap_blocked, set()
        for rb in blocked:
            self.enqueue(rb)

    # -- admission -----------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            rb = self.queue.get(timeout=1.0)
            if rb is None:
                continue
            try:
                if rb:
                    self.reconcile(rb)
            except Unavailable as error:
                log.warning("RB %s: API unavailable (%s); will retry", rb, error)
                self._stop.wait(0.5)
                self.enqueue(rb)
            except KubeError as error:
                log.error("RB %s: %s", rb, error)
                self._stop.wait(1.0)
                self.enqueue(rb)
            finally:
                self.queue.done(rb)

    def reconcile(self, rb: str) -> None:
        """Bring one RB to its right state; safe to run any number of times anywhere."""
        if not self.pods.synced.is_set():
            # Without the pods we cannot tell a free RB from one whose last pod is
            # still stopping: wait for the first pod list.
            self._stop.wait(0.2)
            self.enqueue(rb)
            return
        if rb in self.creating:
            return  # a direct admission of ours is creating its Job; it enqueues rb after
        jobs = self.cache.of_rb(rb)
        busy = admission.occupant(jobs)
        if busy is not None:
            # A run of this RB is reducing: its finish event brings us back. Skipping
            # the Lease read here saves one GET per arrival on a busy RB (the bench's
            # scale scenario read each RB's Lease twice per waiting run).
            self._note_held(rb, jobs, busy)
            return
        # When every Job we know of for this RB has only ever waited, no Lease is
        # expected: skip the read and let the create (a CAS too) tell us otherwise.
        lease = None if self._lease_probably_absent(rb, jobs) else self.leases.read(rb)
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
            self.enqueue_after(rb, wait)
            return False
        body = voids.void_job(labels=self.labels, name=holder, rb=rb, image=self._void_image)
        try:
            self.kube.create_job(body)
        except AlreadyExists:
            existing = self.kube.get_job(holder)
            if existing is not None and voids.is_void(self.labels, existing):
                return True
            if existing is not None:
                self.cache.upsert(existing)  # its own create won: the Lease stays with it
            self.enqueue(rb)
            return False
        log.warning("RB %s: its Lease names Job %s, which is not there (never created, or "
                    "deleted); voided that name so that the RB can move on", rb, holder)
        faults.reach(faults.FaultPoint.AFTER_VOID, configured=self._fault_point)
        return True

    def _admit(self, rb: str, job: Job, lease: Job | None) -> None:
        if not self.capped():
            self._admit_within_caps(rb, job, lease)
            return
        # Admission workers run in parallel; counting and taking a slot must not.
        with self._caps_lock:
            self._admit_within_caps(rb, job, lease)

    def _admit_within_caps(self, rb: str, job: Job, lease: Job | None) -> None:
        if self.capped() and not self._room_for(rb, job):
            return
        name = admission.name_of(job)
        if not self.leases.grant(rb=rb, job=name, base=lease):
            if lease is None:
                self.note_lease_exists(rb)
            self.enqueue(rb)  # someone else moved the Lease: look again
            return
        self._unsuspend(job)
        # Commentary, not state: written off the admission path so hand-off waits for
        # two API calls (Lease, unsuspend), not three.
        self.waiting_events.record(job, reason="Admitted", note=f"RB {rb} is free: reducing")
        self._observe_admitted(job)
        self._note_held(rb, self.cache.of_rb(rb), job)

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

    def _room_for(self, rb: str, job: Job) -> bool:
        """Whether the caps let ``job`` start; if not, its RB waits for a slot (noted).

        Called with ``_caps_lock`` held: the count and the mark are one step."""
        running = [other for other in self.cache.running() if other is not job]
        if admission.caps_allow(labels=self.labels, caps=self.caps, job=job, running=running):
            return True
        self._cap_blocked.add(rb)
        note = caps_note(self.labels, caps=self.caps, job=job, running=running)
        for waiting in self.cache.of_rb(rb):
            if admission.is_waiting(waiting):
                self.waiting_events.waiting(waiting, note)
        return False

    def _note_held(self, rb: str, jobs: list[Job], holder: Job) -> None:
        """A Waiting Event (once per Job) on every other waiting run of the RB."""
        holder_name = admission.name_of(holder)
        note = held_note(self.labels, rb=rb, holder=holder, holder_name=holder_name)
        for job in jobs:
            if admission.is_waiting(job) and admission.name_of(job) != holder_name:
                self.waiting_events.waiting(job, note)

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
