"""Direct admission: a run whose RB is free on arrival takes the RB's Lease first and
its Job is created already running, with no unsuspend.

Three writes for such a run (Lease, the Job carrying its message, Admitted Event; a
message too large for its Job adds its ConfigMap) instead of five.
Runs that must wait keep the suspended path (``controller``). What keeps one run per RB
while the Lease names a Job that does not exist yet is in ``dispatcher.voids``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dispatcher import admission, faults, voids
from dispatcher.controller import Controller
from dispatcher.identity import RunKey, job_name
from dispatcher.leases import holder_of

log = logging.getLogger(__name__)
Obj = dict[str, Any]


@dataclass(frozen=True)
class Grant:
    """The RB's Lease names the run's Job: ``lease`` as written (or as read, when an
    earlier delivery of the same run wrote it), ``taken_at`` on the monotonic clock
    just before that write was sent."""

    rb: str
    lease: Obj
    taken_at: float


class DirectAdmission:
    def __init__(
        self,
        *,
        controller: Controller,
        enabled: bool = True,
        fault_point: faults.FaultPoint | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._controller = controller
        self._enabled = enabled
        self._fault_point = fault_point
        self._clock = clock

    def claim(self, key: RunKey) -> Grant | None:
        """Take the RB's Lease for the run's Job if the RB is free; None: the run waits
        on the suspended path (the RB is busy, a cap is set, or the Lease moved)."""
        c = self._controller
        rb = key.rb_number
        # Caps count running Jobs, which a Lease without its Job is not: capped sites
        # keep the suspended path, where counting and admitting are one step. Without
        # the pod list a free RB cannot be told from one whose last pod still stops.
        if (not self._enabled or c.slots.capped() or not c.pods.synced.is_set()
                or not c.creating.add(rb)):
            return None
        try:
            grant = self._take(rb, job_name(key))
        except BaseException:
            c.creating.discard(rb)
            raise
        if grant is None:
            c.creating.discard(rb)
        else:
            faults.reach(faults.FaultPoint.AFTER_DIRECT_LEASE, configured=self._fault_point)
        return grant

    def _take(self, rb: str, name: str) -> Grant | None:
        c = self._controller
        # Until the first Job list is in (seconds, at 50,000 waiting runs), the API's.
        jobs = {admission.name_of(job): job for job in c.jobs_of_rb(rb)}
        if name in jobs or c.cache.get(name) is not None:
            return None  # a redelivery or a duplicate of a run we already have
        if not admission.free_on_arrival(jobs=list(jobs.values()),
                                         lingering=bool(c.pods.live_of_rb(rb))):
            return None
        taken_at = self._clock()
        # An RB we know no Job of has no Lease as a rule: let the create be the CAS.
        lease = c.leases.read(rb) if jobs else None
        if lease is not None and holder_of(lease) == name and voids.is_direct(c.labels, lease):
            return Grant(rb, lease, taken_at)  # an earlier delivery of this run wrote it
        if lease is not None and not self._holder_done(lease, jobs):
            return None  # held, or by a Job we cannot see yet: the controller decides
        written = c.leases.grant(rb=rb, job=name, base=lease, direct=True)
        if written is not None:
            return Grant(rb, written, taken_at)
        return self._own_lease(rb, name, taken_at) if lease is None else None

    def _own_lease(self, rb: str, name: str, taken_at: float) -> Grant | None:
        """The Lease create was refused: is it our own, from an earlier delivery of
        this run whose Job never came?"""
        c = self._controller
        c.leases.note_exists(rb)
        again = c.leases.read(rb)
        if again is not None and holder_of(again) == name and voids.is_direct(c.labels, again):
            return Grant(rb, again, taken_at)
        return None

    def _holder_done(self, lease: Obj, jobs: dict[str, Obj]) -> bool:
        """The Lease names nobody, or a Job of the RB (``jobs``) our view shows finished."""
        holder = holder_of(lease)
        known = jobs.get(holder or "")
        return not holder or (known is not None and admission.is_finished(known))

    def in_window(self, grant: Grant) -> bool:
        """Whether the Job may still be created running (``voids.DIRECT_WINDOW_S``)."""
        return self._clock() - grant.taken_at < voids.DIRECT_WINDOW_S

    def created(self, job: Obj) -> None:
        """The run's Job exists, running under the Lease."""
        self._controller.admitted_directly(job)
        faults.reach(faults.FaultPoint.AFTER_JOB_CREATE, configured=self._fault_point)

    def stored(self) -> None:
        """Job and ConfigMap both exist; the message is about to be acked."""
        faults.reach(faults.FaultPoint.AFTER_CONFIG_MAP, configured=self._fault_point)

    def release(self, grant: Grant) -> None:
        """Give the Lease back: the run's Job will not be created running (a void or a
        cancel marker has its name, or the cluster refused it)."""
        if not self._controller.leases.release(rb=grant.rb, base=grant.lease):
            log.info("RB %s: Lease moved before it was given back", grant.rb)

    def done(self, grant: Grant) -> None:
        """This delivery is finished with the RB: admission may look at it again."""
        self._controller.creating.discard(grant.rb)
        self._controller.enqueue(grant.rb)
