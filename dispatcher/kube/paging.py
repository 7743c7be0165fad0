"""Lists in pages, the next page asked for while this one is decoded.

At 50,000 waiting runs a relist of the Jobs is about 600 MB of JSON (the pod template
and managedFields are most of each Job). Decoding it is the dispatcher's work and
encoding it the API server's: asking for page n+1 before decoding page n lets both
happen at once. The continue token is read from the page's head without decoding
its items, since the API server writes ``kind``, ``apiVersion`` and ``metadata``
before ``items``; a page in another shape is decoded first and paged one by one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from dispatcher.kube.transport import Obj, decode
from dispatcher.kube.trim import without_managed_fields

Fetch = Callable[[str | None], bytes]  # continue token (None: the first page) -> raw page


def page_continue(raw: bytes) -> str | None:
    """The continue token from a list page's head (None: none, or not found there)."""
    cut = raw.find(b',"items":')
    if cut < 0:
        return None
    try:
        head = json.loads(raw[:cut] + b"}")
    except ValueError:
        return None
    metadata = head.get("metadata") if isinstance(head, dict) else None
    token = metadata.get("continue") if isinstance(metadata, dict) else None
    return str(token) if token else None


def list_all(fetch: Fetch, *, keep: Callable[[Obj], Obj] | None) -> tuple[list[Obj], str]:
    """Every item of every page (each passed through ``keep`` as its page arrives,
    so full objects never pile up) and the list's resourceVersion. Items come
    without managedFields (``trim``): lists are of Jobs and Pods only."""
    items: list[Obj] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="list-ahead") as ahead:
        raw = fetch(None)
        while True:
            early = page_continue(raw)
            upcoming: Future[bytes] | None = ahead.submit(fetch, early) if early else None
            page = decode(without_managed_fields(raw))
            got = page.get("items") or []
            items.extend(got if keep is None else (keep(item) for item in got))
            metadata = page.get("metadata") or {}
            token = metadata.get("continue")
            if not token:
                return items, str(metadata.get("resourceVersion", ""))
            raw = upcoming.result() if upcoming is not None and early == token else fetch(token)
