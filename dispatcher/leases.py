"""RB Leases: which Job holds an experiment, changed only by compare-and-swap.

A Lease ``rb-<rb>`` names the Job allowed to reduce. Granting writes the Lease
with the resourceVersion we read (create when there was none); if another replica
got there first the API answers 409 and we simply re-read. That CAS is what keeps
one run per RB across any number of dispatcher replicas. (The controller may skip
the read when it expects no Lease; the create is then the CAS.)
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dispatcher import admission
from dispatcher.identity import Labels, lease_name
from dispatcher.kube import AlreadyExists, Conflict, Kube, NotFound
from dispatcher.voids import DIRECT_KEY

Obj = dict[str, Any]


def micro_time(now: float | None = None) -> str:
    stamp = time.time() if now is None else now
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp))
    return f"{whole}.{int((stamp % 1) * 1_000_000):06d}Z"


def holder_of(lease: Obj | None) -> str | None:
    if lease is None:
        return None
    holder = (lease.get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None


def lease_body(
    *, labels: Labels, rb: str, holder: str, identity: str, base: Obj | None,
    direct: bool = False,
) -> Obj:
    """The Lease granting ``rb`` to Job ``holder`` (``base``: the Lease as read, for CAS;
    ``direct``: granted before the Job exists, see ``dispatcher.voids``)."""
    annotations = {labels.key("granted-by"): identity}
    if direct:
        annotations[labels.key(DIRECT_KEY)] = "true"
    metadata: Obj = {
        "name": lease_name(rb),
        "labels": {labels.managed: "true", labels.key("rb-number"): rb},
        "annotations": annotations,
    }
    if base is not None:
        metadata["resourceVersion"] = base["metadata"]["resourceVersion"]
    now = micro_time()
    transitions = int(((base or {}).get("spec") or {}).get("leaseTransitions") or 0)
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": holder,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions + (1 if base is not None else 0),
        },
    }


@dataclass
class RbLeases:
    kube: Kube
    labels: Labels
    identity: str
    # RBs whose optimistic Lease create was refused: read the Lease next time.
    _exists_hint: set[str] = field(default_factory=set)
    _hint_lock: threading.Lock = field(default_factory=threading.Lock)

    def note_exists(self, rb: str) -> None:
        """A Lease create for ``rb`` was refused: read it on the next pass."""
        with self._hint_lock:
            self._exists_hint.add(rb)

    def probably_absent(self, rb: str, jobs: list[Obj]) -> bool:
        """True when the RB's Jobs are all still waiting and no create was refused.

        A wrong guess costs one refused create (409) and a read on the next pass;
        exclusivity never rests on the guess, only on the compare-and-swap.
        """
        with self._hint_lock:
            if rb in self._exists_hint:
                self._exists_hint.discard(rb)
                return False
        return bool(jobs) and all(admission.is_waiting(job) for job in jobs)

    def read(self, rb: str) -> Obj | None:
        return self.kube.get_lease(lease_name(rb))

    def grant(self, *, rb: str, job: str, base: Obj | None, direct: bool = False) -> Obj | None:
        """CAS the RB to ``job``: the Lease as written, or None when someone else
        changed the Lease first."""
        body = lease_body(labels=self.labels, rb=rb, holder=job, identity=self.identity,
                          base=base, direct=direct)
        try:
            if base is None:
                return self.kube.create_lease(body)
            return self.kube.replace_lease(body)
        except (AlreadyExists, Conflict, NotFound):
            return None

    def release(self, *, rb: str, base: Obj) -> bool:
        """Drop the Lease if it is still as we read it."""
        try:
            self.kube.delete_lease(
                lease_name(rb), resource_version=base["metadata"]["resourceVersion"]
            )
        except NotFound:
            return True
        except Conflict:
            return False
        return True
