"""Pods that cannot start (an image that cannot be pulled, a bad container config):
since when each run's pod has been stuck, and whether it is stuck past the grace.

Values in, values out: the pod views come from the pod watch's cache and ``now``
from the caller's clock. The outcome reconciler (``dispatcher.outcomes``) asks on each
of the Job's pod events and requeues the Job for when the grace ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.pods import PodView


@dataclass(frozen=True)
class Stuck:
    due: str | None  # the reason, when the run is to be failed now
    recheck_in: float | None  # seconds until the grace ends, while it has not


class StuckPods:
    def __init__(self, *, grace_s: float) -> None:
        self.grace_s = grace_s
        self._since: dict[str, float] = {}  # Job name -> when its pod was first seen stuck

    def check(self, job: str, views: list[PodView], *, now: float) -> Stuck:
        """Whether ``job``'s pods have been stuck for the grace. One stays due, check
        after check, until ``settled``: a failed attempt to report it is tried again,
        not a whole grace later. A pod no longer stuck starts again from zero."""
        reason = next((view.stuck for view in views if view.stuck), None)
        if reason is None:
            self._since.pop(job, None)
            return Stuck(None, None)
        left = self._since.setdefault(job, now) + self.grace_s - now
        return Stuck(None, left) if left > 0 else Stuck(reason, None)

    def settled(self, job: str) -> None:
        """The run was reported: should its pod still show as stuck, a new grace."""
        self._since.pop(job, None)
