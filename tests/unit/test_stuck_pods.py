"""A run is failed for a stuck pod only after the grace, once, and a pod that gets
going again starts from zero."""

from __future__ import annotations

from dispatcher.pods import PodView
from dispatcher.stuck import Stuck, StuckPods


def _pod(job: str, stuck: str | None) -> PodView:
    return PodView(name=f"{job}-pod", job=job, rb="1", phase="Pending", deleting=False,
                   finalized=True, stuck=stuck)  # fmt: skip


def test_due_after_the_grace_once() -> None:
    stuck = StuckPods(grace_s=10)
    pods = [_pod("a", "ErrImagePull: nope"), _pod("a", None)]
    assert stuck.check("a", pods, now=100) == Stuck(None, 10)
    assert stuck.check("a", pods, now=109) == Stuck(None, 1)
    assert stuck.check("a", pods, now=110) == Stuck("ErrImagePull: nope", None)
    stuck.settled("a")  # reported
    assert stuck.check("a", pods, now=111) == Stuck(None, 10)  # still stuck: a new grace


def test_one_not_reported_yet_stays_due() -> None:
    stuck = StuckPods(grace_s=10)
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=0).due is None
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=10).due == "ImagePullBackOff"
    # Its report failed (API away): it is due again when the retry comes.
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=15).due == "ImagePullBackOff"


def test_a_pod_that_starts_again_begins_from_zero() -> None:
    stuck = StuckPods(grace_s=10)
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=0).due is None
    assert stuck.check("a", [_pod("a", None)], now=8) == Stuck(None, None)  # pulled after all
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=9) == Stuck(None, 10)
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=18).due is None
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=19).due == "ImagePullBackOff"


def test_runs_are_timed_apart() -> None:
    stuck = StuckPods(grace_s=10)
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=0).due is None
    assert stuck.check("b", [_pod("b", "ImagePullBackOff")], now=5).due is None
    assert stuck.check("a", [_pod("a", "ImagePullBackOff")], now=10).due == "ImagePullBackOff"
    assert stuck.check("b", [_pod("b", "ImagePullBackOff")], now=10) == Stuck(None, 5)
