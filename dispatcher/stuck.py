"""Pods that cannot start (an image that cannot be pulled, a bad container config):
since when each run's pod has been stuck, and which are stuck past the grace.

Values in, values out: the pod views come from the pod watch's cache and ``now``
from the caller's clock. Failing such a run is ``Lifecycle.fail_stuck``.
"""

from __future__ import annotations

from dispatcher.pods import PodView


class StuckPods:
    def __init__(self, *, grace_s: float) -> None:
        self.grace_s = grace_s
        self._since: dict[str, float] = {}  # Job name -> when its pod was first seen stuck

    def due(self, views: list[PodView], *, now: float) -> list[tuple[str, str]]:
        """(Job name, reason) for each run whose pod has been stuck for the grace.
        One stays due, check after check, until ``settled``: a failed attempt to
        report it is tried again next time, not a whole grace later. A pod no longer
        stuck starts again from zero."""
        stuck = {view.job: view.stuck for view in views if view.stuck and view.job}
        for job in set(self._since) - set(stuck):
            del self._since[job]
        return [(job, str(reason)) for job, reason in stuck.items()
                if now - self._since.setdefault(job, now) >= self.grace_s]  # fmt: skip

    def settled(self, job: str) -> None:
        """The run was reported: should its pod still show as stuck, a new grace."""
        self._since.pop(job, None)
