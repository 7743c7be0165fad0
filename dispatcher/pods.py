"""Reduction pods as the dispatcher sees them: a typed view, a cache fed by list+watch,
and the rules that read it (pure; ``caches.PodCache`` holds them).

The pods, not the Job's conditions, say when an RB is really free: a pod that is
being deleted, evicted or stopped at its deadline keeps running its script through
its grace period, and a Job whose pods were deleted under it (``kubectl delete job``
with background cascading) is gone while they still run. Every reduction pod carries
our finalizer (``Labels.pod_finalizer``), so it stays visible here until the
dispatcher has settled its run's outcome and released it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dispatcher.failures import stuck_reason
from dispatcher.identity import Labels

Obj = dict[str, Any]
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class PodView:
    """What the dispatcher needs of one reduction pod."""

    name: str
    job: str
    rb: str
    phase: str
    deleting: bool
    finalized: bool  # still carries our finalizer
    stuck: str | None = None  # why it cannot start (an image it cannot pull), if so

    @property
    def live(self) -> bool:
        """Its containers may still run: it holds its RB."""
        return self.phase not in TERMINAL_PHASES


def pod_view(pod: Obj, *, labels: Labels) -> PodView:
    metadata = pod.get("metadata") or {}
    pod_labels = metadata.get("labels") or {}
    return PodView(
        name=str(metadata.get("name", "")),
        job=str(pod_labels.get(JOB_NAME_LABEL, "")),
        rb=str(pod_labels.get(labels.key("rb-number"), "")),
        phase=str((pod.get("status") or {}).get("phase") or "Pending"),
        deleting=bool(metadata.get("deletionTimestamp")),
        finalized=labels.pod_finalizer in (metadata.get("finalizers") or []),
        stuck=stuck_reason(pod),
    )
