"""Paged lists: the next page is asked for from the head of this one, every item
arrives once, in order, through ``keep``; a page of another shape still pages."""

from __future__ import annotations

import json
import threading

from dispatcher.kube.paging import list_all, page_continue


def _page(items: list[int], token: str | None, *, rv: str = "7", shape: str = "api") -> bytes:
    metadata = {"resourceVersion": rv, **({"continue": token} if token else {})}
    body = {"items": [{"n": n} for n in items], "metadata": metadata}
    if shape == "api":  # as the API server writes it: metadata before items
        body = {"kind": "JobList", "apiVersion": "batch/v1", "metadata": metadata,
                "items": body["items"]}  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


def test_the_continue_token_is_read_from_the_head_only() -> None:
    assert page_continue(_page([1, 2], "abc")) == "abc"
    assert page_continue(_page([1], None)) is None
    assert page_continue(_page([1], "abc", shape="items-first")) is None  # not in the head
    assert page_continue(b"not json at all") is None


def _serve(pages: dict[str | None, bytes]) -> tuple[list[str | None], object]:
    asked: list[str | None] = []
    lock = threading.Lock()

    def fetch(token: str | None) -> bytes:
        with lock:
            asked.append(token)
        return pages[token]

    return asked, fetch


def test_every_item_once_in_order_through_keep() -> None:
    pages = {None: _page([1, 2], "p2"), "p2": _page([3, 4], "p3"), "p3": _page([5], None)}
    asked, fetch = _serve(pages)
    items, rv = list_all(fetch, keep=lambda item: {"kept": item["n"]})  # type: ignore[arg-type]
    assert items == [{"kept": n} for n in (1, 2, 3, 4, 5)] and rv == "7"
    assert asked == [None, "p2", "p3"]


def test_a_page_in_another_shape_is_paged_one_by_one() -> None:
    pages = {None: _page([1], "p2", shape="items-first"), "p2": _page([2], None, rv="9")}
    asked, fetch = _serve(pages)
    items, rv = list_all(fetch, keep=None)  # type: ignore[arg-type]
    assert items == [{"n": 1}, {"n": 2}] and rv == "9" and asked == [None, "p2"]
