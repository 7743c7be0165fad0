"""Void Jobs in the cluster: made by admission before a Lease may leave a holder that
is not there, deleted by intake when the run itself arrives. The rules and margins
are ``dispatcher.voids`` (pure); this is their I/O."""

from __future__ import annotations

import logging
import time
from typing import Any

from dispatcher import admission, faults, voids
from dispatcher.identity import Labels
from dispatcher.kube import AlreadyExists, Kube

log = logging.getLogger(__name__)
Obj = dict[str, Any]


class VoidTooYoung(Exception):
    """The run's name is taken by a void too young to delete: the message waits."""


class VoidJobs:
    def __init__(self, *, kube: Kube, labels: Labels, image: str,
                 fault_point: faults.FaultPoint | None = None) -> None:
        self.kube = kube
        self.labels = labels
        self.image = image
        self.fault_point = fault_point

    def take(self, *, rb: str, holder: str) -> Obj | None:
        """Create the void under ``holder``'s name. None when it is ours (or an older
        void is there); else the Job whose own create won (the Lease stays with it),
        or ``{}`` when that Job went again before we could read it."""
        body = voids.void_job(labels=self.labels, name=holder, rb=rb, image=self.image)
        try:
            self.kube.create_job(body)
        except AlreadyExists:
            existing = self.kube.get_job(holder)
            if existing is not None and voids.is_void(self.labels, existing):
                return None
            return existing if existing is not None else {}
        log.warning("RB %s: its Lease names Job %s, which is not there (never created, or "
                    "deleted); voided that name so that the RB can move on", rb, holder)
        faults.reach(faults.FaultPoint.AFTER_VOID, configured=self.fault_point)
        return None

    def clear(self, void: Obj) -> None:
        """Delete the void under a run's name once no late create can meet the gap
        (``voids.VOID_DELETABLE_AFTER_S``); until then raise ``VoidTooYoung``."""
        name = admission.name_of(void)
        wait = voids.delete_wait(void, now=time.time())
        if wait > 0:
            raise VoidTooYoung(
                f"Job {name} is a void made {voids.VOID_DELETABLE_AFTER_S - wait:.0f} s ago; "
                f"its run is stored once it is {voids.VOID_DELETABLE_AFTER_S:.0f} s old")
        self.kube.delete_job(name, uid=(void.get("metadata") or {}).get("uid"))
        log.info("deleted the void %s: its run arrived again and is stored, waiting", name)
