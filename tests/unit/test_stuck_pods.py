"""A run is failed for a stuck pod only after the grace, once, and a pod that gets
going again starts from zero."""

from __future__ import annotations

from dispatcher.pods import PodView
from dispatcher.stuck import StuckPods


def _pod(job: str, stuck: str | None) -> PodView:
    return PodView(name=f"{job}-pod", job=job, rb="1", phase="Pending", deleting=False,
                   finalized=True, stuck=stuck)  # fmt: skip


def test_due_after_the_grace_once() -> None:
    stuck = StuckPods(grace_s=10)
    pods = [_pod("a", "ErrImagePull: nope"), _pod("b", None)]
    assert stuck.due(pods, now=100) == []
    assert stuck.due(pods, now=109) == []
    assert stuck.due(pods, now=110) == [("a", "ErrImagePull: nope")]
    stuck.settled("a")  # reported
    assert stuck.due(pods, now=111) == []  # returned once; still stuck: a new grace


def test_one_not_reported_yet_stays_due() -> None:
    stuck = StuckPods(grace_s=10)
    pods = [_pod("a", "ErrImagePull: nope"), _pod("b", "ImagePullBackOff")]
    assert stuck.due(pods, now=0) == []
    assert stuck.due(pods, now=10) == [("a", "ErrImagePull: nope"), ("b", "ImagePullBackOff")]
    stuck.settled("b")  # a's report failed (API away): a is due again at the next check
    assert stuck.due(pods, now=15) == [("a", "ErrImagePull: nope")]


def test_a_pod_that_starts_again_begins_from_zero() -> None:
    stuck = StuckPods(grace_s=10)
    assert stuck.due([_pod("a", "ImagePullBackOff")], now=0) == []
    assert stuck.due([_pod("a", None)], now=8) == []  # pulled after all
    assert stuck.due([_pod("a", "ImagePullBackOff")], now=9) == []
    assert stuck.due([_pod("a", "ImagePullBackOff")], now=18) == []
    assert stuck.due([_pod("a", "ImagePullBackOff")], now=19) == [("a", "ImagePullBackOff")]
