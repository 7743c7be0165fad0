"""Our exceptions for failed API calls, and HTTP statuses mapped to them (pure).

Callers decide on meaning from the type (409 on create = already done; 409 on a
Lease = someone else holds it; 403 is never contention) without knowing the client.
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes.client.exceptions import ApiException

from dispatcher.kube.pacing import retry_after_s


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AlreadyExists(KubeError):
    """409 on create: the object is there already (an earlier attempt made it)."""


class Conflict(KubeError):
    """409 on update: the resourceVersion moved; someone else changed it first."""


class NotFound(KubeError):
    """404."""


class Forbidden(KubeError):
    """403: RBAC says no. Never retried, never read as contention."""


class Invalid(KubeError):
    """422 (or 400): the object itself is wrong; retrying cannot help."""


class Unavailable(KubeError):
    """The API could not answer (connection refused, timeout, 429, 5xx): retry later."""


class Throttled(Unavailable):
    """429: the API server's Priority and Fairness (or another limit) refused the
    request before executing it; ``retry_after_s`` is its Retry-After, if it sent one.

    ``Kube`` waits these out itself (see ``pacing``); after ``pacing.MAX_THROTTLED_S``
    callers get a plain Unavailable (status 429). Only an unpaced request (the health
    check) sees a Throttled."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message, status=429)
        self.retry_after_s = retry_after_s


class Gone(KubeError):
    """410 on a watch: the resourceVersion is too old; re-list."""


class Unauthorized(Unavailable):
    """401: the API server rejected our credentials (an expired or rotated token).

    Raised by ``Kube`` only once re-reading the credentials did not help. It is an
    Unavailable because it means the same to every caller: the deployment, not the
    message, is at fault, so messages stay in the broker and readiness goes false
    until valid credentials are in place (the kubelet rewrites a projected token).
    """


def _map_api_exception(error: ApiException, what: str) -> KubeError:
    headers = error.headers or {}
    return _map_status(error.status or 0, error.body, what,
                       retry_after=headers.get("Retry-After"))  # fmt: skip


def _map_status(status: int, payload: Any, what: str, *, retry_after: str | None = None
                ) -> KubeError:  # fmt: skip
    reason = ""
    detail = ""
    try:
        body = json.loads(payload or "{}")
        reason = body.get("reason", "")
        detail = body.get("message", "")
    except (ValueError, AttributeError, TypeError):
        detail = str(payload)[:300]
    if status == 401:
        return Unauthorized(
            f"{what}: API server rejected our credentials (401) {detail}".rstrip(), status=401
        )
    message = f"{what}: {status} {detail}"
    if status == 429:
        return Throttled(message, retry_after_s=retry_after_s(retry_after))
    if status == 409:
        return (
            AlreadyExists(message, status=409)
            if reason == "AlreadyExists"
            else Conflict(message, status=409)
        )
    kinds: dict[int, type[KubeError]] = {
        400: Invalid,
        403: Forbidden,
        404: NotFound,
        410: Gone,
        422: Invalid,
    }
    if status in kinds:
        return kinds[status](message, status=status)
    if status >= 500 or status == 0:
        return Unavailable(message, status=status)
    return KubeError(message, status=status)
