"""Watch streaming: one long GET read line by line as events until it times out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import urllib3.exceptions
from kubernetes.watch.watch import iter_resp_lines

from dispatcher.kube.errors import Gone, Unavailable
from dispatcher.kube.transport import REQUEST_TIMEOUT, Obj, Transport, decode
from dispatcher.kube.trim import without_managed_fields


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    obj: Obj


def watch(
    transport: Transport,
    kind: str,
    path: str,
    *,
    selector: str,
    resource_version: str,
    timeout_s: int,
) -> Iterator[WatchEvent]:
    """Events on ``path`` after ``resource_version``; raises Gone when it is too old.

    A generator: nothing is sent until the first event is asked for.
    """
    response = transport._send(
        f"watch {kind}",
        "GET",
        path,
        query={
            "labelSelector": selector,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout_s,
        },
        timeout=(REQUEST_TIMEOUT[0], timeout_s + 15.0),
    )
    try:
        for line in iter_resp_lines(response.response):  # type: ignore[no-untyped-call]
            if not line:
                continue
            event = decode(without_managed_fields(line.encode()))  # Jobs and Pods only
            if event.get("type") == "ERROR":
                status = event.get("object") or {}
                if status.get("code") == 410:
                    raise Gone(f"watch {kind}: resourceVersion too old", status=410)
                raise Unavailable(f"watch {kind}: {status.get('message', status)}")
            yield WatchEvent(kind=event["type"], obj=event["object"])
    except (urllib3.exceptions.HTTPError, OSError) as error:
        raise Unavailable(f"watch {kind}: connection lost: {error}") from error
    finally:
        response.release_conn() if hasattr(response, "release_conn") else None
