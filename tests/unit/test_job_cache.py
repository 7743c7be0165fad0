"""The controller's Job cache: its RB index stays consistent with the Jobs it holds."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dispatcher.identity import Labels
from dispatcher.jobcache import JobCache

LABELS = Labels("autoreduce.io")


def job(name: str, rb: str, rv: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "resourceVersion": str(rv),
                     "labels": {"autoreduce.io/rb-number": rb}, "managedFields": [{"x": 1}]},
        "spec": {"suspend": True, "template": {"spec": {"containers": []}}},
        "status": {},
    }  # fmt: skip


ops = st.lists(
    st.tuples(st.sampled_from(["upsert", "remove"]), st.sampled_from("abcdef"),
              st.sampled_from(["1", "2", "3"]), st.integers(1, 50)),
    max_size=60,
)  # fmt: skip


@given(ops)
def test_rb_index_matches_a_scan(operations: list[tuple[str, str, str, int]]) -> None:
    cache = JobCache(LABELS)
    for op, name, rb, rv in operations:
        if op == "upsert":
            cache.upsert(job(name, rb, rv))
        else:
            cache.remove(name)
    everything = cache.all()
    for rb in "123":
        scanned = sorted(j["metadata"]["name"] for j in everything if cache.rb_of(j) == rb)
        assert sorted(j["metadata"]["name"] for j in cache.of_rb(rb)) == scanned
    assert {cache.rb_of(j) for j in everything} <= set("123")


def test_older_write_does_not_replace_a_newer_one_and_cached_jobs_are_slim() -> None:
    cache = JobCache(LABELS)
    cache.upsert(job("a", "1", 5))
    cache.upsert(job("a", "2", 4))  # stale: ignored, index unchanged
    assert [j["metadata"]["name"] for j in cache.of_rb("1")] == ["a"] and cache.of_rb("2") == []
    cached = cache.get("a")
    assert cached is not None and "managedFields" not in cached["metadata"]
    assert "template" not in cached["spec"]
    cache.replace_all([job("b", "3", 1)])
    assert cache.get("a") is None and cache.of_rb("1") == []
    assert [j["metadata"]["name"] for j in cache.of_rb("3")] == ["b"]


def test_a_list_keeps_our_own_writes_made_after_its_snapshot() -> None:
    # The dispatcher consumes during its first list: a Job it created after the
    # list's snapshot (resourceVersion 10) stays until the watch confirms it.
    cache = JobCache(LABELS)
    assert not cache.synced.is_set()
    cache.upsert(job("created-during-the-list", "1", 12))
    cache.upsert(job("listed-and-changed-since", "2", 14))
    cache.upsert(job("written-before-the-snapshot", "3", 9))
    cache.replace_all([job("listed-and-changed-since", "2", 8), job("listed", "4", 7)], "10")
    assert cache.synced.is_set()
    assert sorted(j["metadata"]["name"] for j in cache.all()) == [
        "created-during-the-list", "listed", "listed-and-changed-since"]
    assert cache.get("listed-and-changed-since")["metadata"]["resourceVersion"] == "14"  # type: ignore[index]
    assert [j["metadata"]["name"] for j in cache.of_rb("1")] == ["created-during-the-list"]
    assert cache.of_rb("3") == []
