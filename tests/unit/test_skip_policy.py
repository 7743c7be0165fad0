"""A test that needs a component the suite did not start skips locally but fails in CI,
so a CI run can never pass by skipping past a missing component."""

from __future__ import annotations

import pytest

from tests.conftest import needs_own_component


def test_outside_ci_it_is_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="cannot freeze"):
        needs_own_component("cannot freeze a broker this suite did not start")


def test_in_ci_it_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"cannot freeze.*CI is set"):
        needs_own_component("cannot freeze a broker this suite did not start")
