"""The ``<prefix>/outcome`` annotation on a run's Job: how far its outcome has got (pure).

Its name and every state it can hold are defined here only; readers and writers (the
outcome path in ``outcomes`` and ``settle``, cancellations in ``cancels``, ``autoreduce status``)
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
