"""The outcome's transitions (``outcome_state.next_step``) as a table."""

from __future__ import annotations

import pytest

from dispatcher.outcome_state import OutcomeState, Step, next_step

BASE = {"exists": True, "state_value": None, "finished": True, "succeeded": False,
        "pods_live": False, "pods_stuck": False, "pods_released": False}

CASES = [
    ({"exists": False}, Step.ORPHAN),
    ({"finished": False}, Step.WAIT),
    ({"finished": False, "pods_stuck": True}, Step.CHECK_STUCK),
    ({"finished": False, "pods_stuck": True, "state_value": OutcomeState.HANDLING},
     Step.CHECK_STUCK),  # a stuck run's claim survived a crash: finish it
    ({"finished": False, "pods_stuck": True, "state_value": OutcomeState.DONE},
     Step.RELEASE),  # failed already, its Job being deleted: never posted twice
    ({"succeeded": True}, Step.RELEASE),
    ({}, Step.SETTLE_FAILED),
    ({"state_value": OutcomeState.HANDLING}, Step.SETTLE_FAILED),
    ({"state_value": OutcomeState.DONE}, Step.RELEASE),
    ({"state_value": OutcomeState.CANCELLED}, Step.RELEASE),
    ({"state_value": "SomethingNewer"}, Step.RELEASE),
    ({"pods_released": True}, Step.WAIT),  # the runner's own outcome, judged before
    ({"state_value": OutcomeState.CANCELLING, "pods_live": True}, Step.WAIT),
    ({"state_value": OutcomeState.CANCELLING, "finished": False}, Step.SETTLE_CANCELLED),
    ({"state_value": OutcomeState.CANCELLING, "succeeded": True}, Step.SETTLE_CANCELLED),
]  # fmt: skip


@pytest.mark.parametrize(("change", "step"), CASES)
def test_next_step(change: dict[str, object], step: Step) -> None:
    assert next_step(**{**BASE, **change}) is step  # type: ignore[arg-type]
