"""Voiding a Job name that a direct admission's Lease promised (pure).

A run whose RB is free on arrival is admitted directly: the dispatcher takes the RB's
Lease for the run's Job first and then creates that Job already running (``direct``).
Until the Job exists, the Lease names a Job that is not there. Another replica (or
this one after a restart) cannot tell "not created yet" from "gone", so it never
moves such a Lease on a missing holder by itself: it first creates a suspended
stand-in under the holder's name (a *void* Job). Job names are unique in etcd, so
exactly one of the two creates wins:

- the run's own create won: the void create answers 409, the holder exists, and the
  Lease stays with it;
- the void won: the run's create answers 409 and finds the void; that run then waits
  like any other (created suspended once the void is gone), and the Lease may move.

So RB exclusivity rests on two compare-and-swaps, the Lease's resourceVersion and the
Job name, never on a clock. Clocks only decide two things, with margins written here:

- when a void may be made (``RECLAIM_AFTER_S``): early enough for a dead dispatcher's
  RB to move on soon, late enough not to push a live one off its direct path;
- when a void may be deleted (``VOID_DELETABLE_AFTER_S``): only once no create that
  was already on its way when the void was made can still land. A void deleted
  earlier would let such a late create make the run's Job running after all.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from dispatcher.identity import Labels

Obj = dict[str, Any]

# A direct admission sends its running create no later than this after it began its
# Lease write (its own monotonic clock); after that it creates the Job suspended.
DIRECT_WINDOW_S = 10.0
# How long one create can still be on its way after it was first tried: the API
# client waits out 429s for up to 60 s (dispatcher.kube.pacing.MAX_THROTTLED_S), and
# the apiserver abandons a request it has not finished in its --request-timeout
# (60 s by default; API Priority and Fairness queues within it).
CREATE_IN_FLIGHT_MAX_S = 60.0 + 60.0
# Clocks of the dispatcher replicas and the apiserver may disagree by this much.
MAX_CLOCK_SKEW_S = 30.0
# A Lease that names a missing Job is voided once it is this old: a live direct
# admission creates its Job within milliseconds, so waiting longer only delays the
# RB's next run after a crash, a cancellation or an expired Job.
RECLAIM_AFTER_S = 15.0
# A void may be deleted (so that its run can be created, suspended) only this long
# after it was made: by then every create sent under the Lease it replaced has
# either landed (and met the void) or been abandoned by the apiserver.
VOID_DELETABLE_AFTER_S = DIRECT_WINDOW_S + CREATE_IN_FLIGHT_MAX_S + MAX_CLOCK_SKEW_S

VOID_LABEL = "void"
DIRECT_KEY = "admitted-before-create"  # Lease annotation: granted before its Job existed


def direct_allowed(*, ttl_seconds_after_finished: int) -> bool:
    """Whether direct admission is safe with this Job TTL. A finished holder hands its
    RB on without a void (it still exists, so its name cannot be created again); a
    TTL shorter than a late create can take could delete it in time for one."""
    return ttl_seconds_after_finished >= VOID_DELETABLE_AFTER_S


def is_void(labels: Labels, job: Obj | None) -> bool:
    found = ((job or {}).get("metadata") or {}).get("labels") or {}
    return found.get(labels.key(VOID_LABEL)) == "true"


def is_direct(labels: Labels, lease: Obj | None) -> bool:
    found = ((lease or {}).get("metadata") or {}).get("annotations") or {}
    return found.get(labels.key(DIRECT_KEY)) == "true"


def _seconds(stamp: object) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def reclaim_wait(lease: Obj, *, now: float) -> float:
    """Seconds until a direct Lease whose holder is missing may be voided (0: now).

    Measured from the Lease's ``renewTime`` (the granting replica's clock) on ours:
    an unreadable stamp waits the whole time once more, never zero."""
    renewed = _seconds((lease.get("spec") or {}).get("renewTime"))
    if renewed is None:
        return RECLAIM_AFTER_S
    return max(renewed + RECLAIM_AFTER_S - now, 0.0)


def delete_wait(void: Obj, *, now: float) -> float:
    """Seconds until ``void`` may be deleted (0: now), from its creationTimestamp
    (the apiserver's clock, hence the skew in ``VOID_DELETABLE_AFTER_S``)."""
    created = _seconds((void.get("metadata") or {}).get("creationTimestamp"))
    if created is None:
        return VOID_DELETABLE_AFTER_S
    return max(created + VOID_DELETABLE_AFTER_S - now, 0.0)


def void_job(*, labels: Labels, name: str, rb: str, image: str) -> Obj:
    """A suspended Job named ``name`` that never runs: it only takes the name.

    It carries no managed label (admission, the outcome path and the CLI never see
    it) and the marker sweep deletes it with the cancel markers, days later."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "labels": {labels.key(VOID_LABEL): "true", labels.key("rb-number"): rb},
            "annotations": {labels.key("void-reason"):
                            "its RB's Lease named this Job before it existed, and it never came"},
        },
        "spec": {
            "suspend": True,
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "securityContext": {"runAsNonRoot": True, "runAsUser": 65534,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "void", "image": image, "command": ["false"],
                    "securityContext": {"allowPrivilegeEscalation": False,
                                        "capabilities": {"drop": ["ALL"]}},
                }],
            }},
        },
    }  # fmt: skip
