"""The outcome reconciler, keyed by Job: every finished run ends with exactly one outcome
posted, and its pods are let go only after that.

Its handlers (``jobwatch.Observer``) only queue Job names:

- a Job seen finished for the first time in this process is *owed* a look: the
  runner's own outcome stands (exit 0, or a recorded one), else a verdict is claimed
  on the Job and posted on the run's behalf (``dispatcher.settle``);
- a stopped pod still carrying our finalizer is released once its Job's outcome is
  settled (a cancelled run is settled then, from what its runner left);
- a pod that cannot start is requeued for when its grace ends, and its run failed
  if it still cannot (``dispatcher.stuck``).

An API or broker error requeues the Job with per-key backoff (``WorkQueue.retry``);
a retry reads the Job afresh, since another replica may have settled it meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from autoreduce_common.stomp_client import BrokerError

from dispatcher import admission
from dispatcher.jobcache import JobCache
from dispatcher.jobwatch import SYNC
from dispatcher.kube import KubeError
from dispatcher.outcome_state import OutcomeState
from dispatcher.pods import PodCache, PodView
from dispatcher.settle import Settler
from dispatcher.stuck import StuckPods
from dispatcher.workqueue import Clock, WorkQueue

log = logging.getLogger(__name__)
Job = dict[str, Any]
WORKERS = 2
# A broker or API outage can last minutes: back off up to this between tries.
MAX_BACKOFF_S = 30.0


class Outcomes:
    def __init__(self, *, settler: Settler, jobs: JobCache, pods: PodCache,
                 stuck_grace_s: float, clock: Clock = time.monotonic) -> None:
        self.settler = settler
        self.kube = settler.kube
        self.jobs = jobs
        self.pods = pods
        self.stuck = StuckPods(grace_s=stuck_grace_s)
        self.clock = clock
        self.queue = WorkQueue(base_delay_s=1.0, max_delay_s=MAX_BACKOFF_S, clock=clock)
        self._lock = threading.Lock()
        self._offered: set[str] = set()  # finished Jobs this process has been told of
        self._owed: set[str] = set()  # ...and not looked at to the end yet
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- handlers (on the watch threads: queue only) ---------------------------------

    def job_changed(self, kind: str, job: Job) -> None:
        name = admission.name_of(job)
        with self._lock:
            if kind == "DELETED":
                self._offered.discard(name)
                self._owed.discard(name)
                return
            finished = admission.is_finished(job)
            if finished and name not in self._offered:
                self._offered.add(name)
                self._owed.add(name)
        # A finished Job's every change (few: its verdict, our annotations, the
        # resync) may let its stopped pods go; a cancelled run is settled from its pods.
        if finished or (kind != SYNC and self.settler.state(job) is OutcomeState.CANCELLING):
            self.queue.add(name)

    def pod_changed(self, view: PodView, deleted: bool) -> None:
        if not view.job or deleted:
            return
        stopped = not view.live and view.finalized
        if stopped or (view.stuck and self.stuck.grace_s > 0):
            self.queue.add(view.job)

    # -- workers ---------------------------------------------------------------------

    def start(self) -> None:
        for n in range(WORKERS):
            thread = threading.Thread(target=self._work, name=f"outcomes-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Finish what the workers hold, then stop (what is queued is redone on start)."""
        self._stop.set()
        self.queue.shut_down()
        for thread in self._threads:
            thread.join(timeout=30)

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        while not self._stop.is_set():
            name = self.queue.get(timeout=1.0)
            if name is not None:
                self.process(name)

    def process(self, name: str) -> None:
        """Reconcile one Job taken from the queue: forgotten when done, else requeued
        with backoff."""
        try:
            self.reconcile(name)
            self.queue.forget(name)
        except (KubeError, BrokerError) as error:
            delay = self.queue.retry(name)
            log.warning("outcome of %s not settled yet (%s); retrying in %.0fs", name, error,
                        delay)
        except Exception:
            # A bug: keep the worker, and the Job, for a later try.
            delay = self.queue.retry(name)
            log.exception("outcome of %s failed; retrying in %.0fs", name, delay)
        finally:
            self.queue.done(name)

    # -- the reconcile ---------------------------------------------------------------

    def reconcile(self, name: str) -> None:
        """Bring one Job's outcome to its right state; safe to repeat."""
        job = self._read(name)
        with self._lock:
            owed = name in self._owed
        if job is None:
            self._release_orphans(name)
        elif owed:
            self._settle_owed(name, job)
        elif self.settler.state(job) is OutcomeState.CANCELLING:
            self._handle(name)  # settled once its pods have stopped
        elif self.settler.settled(job):
            self.settler.release_pods(name)
        elif not admission.is_finished(job):
            self._check_stuck(name)

    def _read(self, name: str) -> Job | None:
        """The cached Job; on a retry, or when the cache has none, the API's."""
        cached = self.jobs.get(name)
        if cached is not None and not self.queue.failures(name):
            return cached
        return self.kube.get_job(name)

    def _settle_owed(self, name: str, job: Job) -> None:
        if self.settler.settled(job) or self.settler.handled(job):
            self.settler.release_pods(name)
        else:
            self._handle(name)
        with self._lock:
            self._owed.discard(name)

    def _handle(self, name: str) -> None:
        """Settle a failed or cancelled run from the API's copy of its Job: the cache
        keeps no pod template (the verdict reads its limits) and may be behind."""
        job = self.kube.get_job(name)
        if job is None:
            return
        cancelling = self.settler.state(job) is OutcomeState.CANCELLING
        if not cancelling and (self.settler.settled(job) or self.settler.handled(job)):
            self.settler.release_pods(name)  # another replica (or our last try) settled it
        else:
            self.settler.handle_failed(job)

    def _release_orphans(self, name: str) -> None:
        """Pods that outlived their Job (deleted under them): nothing to settle."""
        with self._lock:
            self._owed.discard(name)
        for pod in self.pods.of_job(name):
            if pod.finalized and not pod.live:
                log.warning("pod %s outlived its Job %s: released without an outcome check",
                            pod.name, name)
        self.settler.release_pods(name)

    def _check_stuck(self, name: str) -> None:
        if self.stuck.grace_s <= 0:
            return
        stuck = self.stuck.check(name, self.pods.of_job(name), now=self.clock())
        if stuck.recheck_in is not None:
            self.queue.add_after(name, stuck.recheck_in)
        elif stuck.due is not None:
            self.settler.fail_stuck(name, stuck.due)
            self.stuck.settled(name)
