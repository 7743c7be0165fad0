"""The ``<prefix>/outcome`` annotation on a run's Job: how far its outcome has got (pure).

Its name and every state it can hold are defined here only; readers and writers (the
outcome reconciler in ``outcomes``, cancellations in ``dispatch``, ``autoreduce status``)
use these names.

Written only by compare-and-swap or by the one dispatcher that holds the state before
it, so replicas never post twice for one step. The verdict being posted is recorded
beside it (``VERDICT_KEY``) before the send: a successor posts that same verdict.
"""

from __future__ import annotations

from enum import StrEnum

# The annotations' names, under the operator's label prefix (``Labels.key``).
OUTCOME_KEY = "outcome"
VERDICT_KEY = "outcome-verdict"


class OutcomeState(StrEnum):
    HANDLING = "Handling"  # claimed; the verdict recorded beside it is being posted
    DONE = "Done"  # the outcome is posted (or the runner's own stands)
    # A cancellation of a running run: the pods are being stopped; the outcome is the
    # runner's if it had begun to send one, else "Run cancelled while reducing".
    CANCELLING = "Cancelling"
    CANCELLED = "Error"  # a cancellation's ReductionError is posted (first version's name)


SETTLED = frozenset({OutcomeState.DONE, OutcomeState.CANCELLED})
IN_PROGRESS = frozenset({OutcomeState.HANDLING, OutcomeState.CANCELLING})


def state_of(value: str | None) -> OutcomeState | None:
    try:
        return OutcomeState(value or "")
    except ValueError:
        return None


class Step(StrEnum):
    """What the outcome reconciler does next for one run's Job (``next_step``)."""

    WAIT = "wait"  # still reducing, or its pods still stopping: an event brings us back
    CHECK_STUCK = "check-stuck"  # a pod cannot start: fail the run once the grace is over
    RELEASE = "release"  # the outcome stands (the runner's or ours): let the pods go
    SETTLE_FAILED = "settle-failed"  # failed without a settled outcome: decide and post
    SETTLE_CANCELLED = "settle-cancelled"  # cancelled while reducing, pods stopped
    ORPHAN = "orphan"  # no Job: its stopped pods go without an outcome check


def next_step(  # noqa: PLR0911 - a decision table: one return per row
    *, exists: bool, state_value: str | None, finished: bool, succeeded: bool,
    pods_live: bool, pods_stuck: bool, pods_released: bool,
) -> Step:
    """The outcome's transitions in one place: from what the caches show, the step
    that moves a run towards "exactly one outcome posted, its pods released"."""
    if not exists:
        return Step.ORPHAN
    state = state_of(state_value)
    if state is OutcomeState.CANCELLING:
        # The runner may be posting: wait for its pods to stop, then read its record.
        return Step.WAIT if pods_live else Step.SETTLE_CANCELLED
    if state_value and state not in IN_PROGRESS:
        # Settled (a stuck run is failed before its Job finishes), or a state a newer
        # version owns: never posted again, only its stopped pods let go.
        return Step.RELEASE
    if not finished:
        return Step.CHECK_STUCK if pods_stuck else Step.WAIT
    if succeeded:
        return Step.RELEASE  # exit 0: the runner posted its own outcome
    if not state_value and pods_released:
        # Its pods are let go only once the outcome stands: the runner's own, judged
        # before (no annotation is written for it, to spare a write per failed script).
        return Step.WAIT
    return Step.SETTLE_FAILED  # nothing claimed yet, or claimed (HANDLING) and unfinished
