"""Which keys a change of a Job or a pod puts on the work queue (pure).

The informers call these for every event and every re-list; a reconciler then reads
the caches, so a key queued for nothing costs one cheap pass and never a wrong step.
"""

from __future__ import annotations

from typing import Any

from dispatcher import admission
from dispatcher.identity import Labels
from dispatcher.keys import Key, Kind
from dispatcher.outcome_state import OUTCOME_KEY, OutcomeState, state_of
from dispatcher.pods import PodView

Job = dict[str, Any]
CAP_SLOT = Key(Kind.CAP_SLOT)
MARKER_SWEEP = Key(Kind.MARKER_SWEEP)


def rb_of(labels: Labels, job: Job) -> str:
    return str(((job.get("metadata") or {}).get("labels") or {}).get(labels.key("rb-number"), ""))


def job_keys(labels: Labels, job: Job, *, deleted: bool) -> list[Key]:
    """A finish or a deletion may free the RB and a cap slot and asks for the run's
    outcome; a waiting Job may be admissible; a cancel in progress needs its outcome."""
    keys: list[Key] = []
    finished = admission.is_finished(job)
    rb = rb_of(labels, job)
    if rb and (deleted or finished or admission.is_waiting(job)):
        keys.append(Key(Kind.RB, rb))
    if deleted or finished:
        keys.append(CAP_SLOT)
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    cancelling = state_of(annotations.get(labels.key(OUTCOME_KEY))) is OutcomeState.CANCELLING
    if deleted or finished or cancelling:
        keys.append(Key(Kind.JOB, admission.name_of(job)))
    return keys


def pod_keys(view: PodView, *, deleted: bool) -> list[Key]:
    """A pod that stopped or went away may free its RB; a stopped one still held by our
    finalizer, or one that cannot start, needs its run's outcome looked at."""
    keys: list[Key] = []
    if view.rb and (deleted or not view.live):
        keys.append(Key(Kind.RB, view.rb))
    if view.job and ((not deleted and not view.live and view.finalized) or view.stuck):
        keys.append(Key(Kind.JOB, view.job))
    return keys
