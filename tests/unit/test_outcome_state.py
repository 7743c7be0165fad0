"""The outcome annotation's name and states: values other replicas (and older versions)
have written must keep their meaning."""

from __future__ import annotations

import pytest

from dispatcher.identity import Labels
from dispatcher.outcome_state import (
    IN_PROGRESS,
    OUTCOME_KEY,
    SETTLED,
    VERDICT_KEY,
    OutcomeState,
    state_of,
)


def test_the_annotations_and_their_values_are_the_ones_on_existing_jobs() -> None:
    labels = Labels("autoreduce.io")
    assert labels.key(OUTCOME_KEY) == "autoreduce.io/outcome"
    assert labels.key(VERDICT_KEY) == "autoreduce.io/outcome-verdict"
    assert {state.name: state.value for state in OutcomeState} == {
        "HANDLING": "Handling", "DONE": "Done", "CANCELLING": "Cancelling",
        "CANCELLED": "Error",
    }


def test_every_state_is_either_settled_or_in_progress() -> None:
    assert set(OutcomeState) == SETTLED | IN_PROGRESS
    assert not SETTLED & IN_PROGRESS


@pytest.mark.parametrize(("value", "state"), [
    ("Handling", OutcomeState.HANDLING),
    ("Error", OutcomeState.CANCELLED),
    (None, None),
    ("", None),
    ("Unknown", None),  # a state of a later version: not ours to interpret
])
def test_state_of_an_annotation_value(value: str | None, state: OutcomeState | None) -> None:
    assert state_of(value) is state
