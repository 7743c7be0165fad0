"""The one package that imports ``kubernetes``: a thin, typed shell over the API.

Responses are parsed as plain JSON dicts (``_preload_content=False``) because the
client's model deserialisation costs more CPU than the request itself at 10,000
Jobs. HTTP failures are mapped here to our own exceptions, chained with ``from``,
so callers decide on meaning (409 on create = already done; 409 on a Lease =
someone else holds it; 403 is never contention) without knowing the client. A 401
re-reads our credentials from disk and retries once: tokens rotate and expire.

Modules, one concern each; import from here, not from them:

- ``errors``: our exception types and the HTTP status mapping (pure);
- ``connection``: credentials (read again on a 401);
- ``pacing``: the server's pace (APF, 429 and Retry-After) or an operator's QPS cap;
- ``transport``: one paced, authenticated exchange, failures mapped;
- ``objects``: Job, ConfigMap and Lease calls;
- ``pods``: Pod lists, finalizers and log tails, and our Events;
- ``watch``: watch streaming;
- ``api``: ``Kube``, every public call in one class.
"""

from dispatcher.kube.api import Kube
from dispatcher.kube.connection import Credentials
from dispatcher.kube.errors import (
    AlreadyExists,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    KubeError,
    NotFound,
    Throttled,
    Unauthorized,
    Unavailable,
)
from dispatcher.kube.pacing import PaceObserver, Pacer, RateLimiter
from dispatcher.kube.transport import REQUEST_TIMEOUT, Obj
from dispatcher.kube.watch import WatchEvent

__all__ = [
    "REQUEST_TIMEOUT",
    "AlreadyExists",
    "Conflict",
    "Credentials",
    "Forbidden",
    "Gone",
    "Invalid",
    "Kube",
    "KubeError",
    "NotFound",
    "Obj",
    "PaceObserver",
    "Pacer",
    "RateLimiter",
    "Throttled",
    "Unauthorized",
    "Unavailable",
    "WatchEvent",
]
