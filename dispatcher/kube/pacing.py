"""How fast we call the API: at the server's pace by default, under an operator's cap if set.

An apiserver running API Priority and Fairness (APF, on by default since Kubernetes
1.20 and GA in 1.29) protects itself: it sorts every request into a FlowSchema and a
priority level, names both in the response headers below, and answers a flow that is
over its share with 429 and ``Retry-After`` *before* the request is executed, so a
rejected create or patch can be sent again unchanged. With such a server a fixed
client-side budget only slows us down when the server has room (controller-runtime
dropped its default client-side limiter for this reason in 2025, PR 3119). So:

- no ``qps`` set: no client-side budget while the server's answers carry APF headers;
  the old 50 QPS / 100 burst bucket while they do not (APF off, or an API proxy that
  strips them) and until the first answer says which;
- ``qps`` set: that bucket always (an operator's explicit cap, e.g. for a shared
  apiserver whose APF configuration gives our ServiceAccount a generous share);
- a 429 is waited out (at least ``Retry-After``, doubling per attempt, with jitter so
  replicas do not return in step) by every request of this process, not only the one
  refused: they share the server's priority level. Waiting happens inside the call,
  so callers keep their order; a request refused for ``MAX_THROTTLED_S`` in all
  surfaces as Unavailable and its message stays in the broker.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

log = logging.getLogger(__package__)

# Set on every answer by an apiserver whose APF filter classified the request.
APF_HEADERS = ("X-Kubernetes-PF-FlowSchema-UID", "X-Kubernetes-PF-PriorityLevel-UID")
# The budget when the server does not pace us (and the old default).
FALLBACK_QPS = 50.0
FALLBACK_BURST = 100
# Backoff for one request refused again and again: 0.25 s doubling to 10 s.
BACKOFF_BASE_S = 0.25
BACKOFF_CAP_S = 10.0
# Waits added on top of a delay: up to half of it again.
JITTER = 0.5
# Seconds one request may spend throttled before it is given up as Unavailable.
MAX_THROTTLED_S = 60.0
# A throttling spell is over (and said so) at the first success this long after its
# last 429: under contention successes and 429s interleave, and one warning per spell
# is what an operator can read.
QUIET_S = 30.0


# -- pure ----------------------------------------------------------------------------


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds; None when absent or not a number (the HTTP-date form
    is not sent by the apiserver, and a wrong guess at a date is worse than none)."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < 3600 else None


def throttle_delay(*, retry_after: float | None, attempt: int, jitter: float) -> float:
    """Seconds before the ``attempt``-th retry (0 = first) of a refused request: never
    before the server's ``Retry-After``; ``jitter`` in [0, 1) adds up to ``JITTER``."""
    backoff = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** min(attempt, 16))
    return max(retry_after or 0.0, backoff) * (1 + JITTER * jitter)


def server_paces(headers: Mapping[str, str]) -> bool:
    """Did this answer come from a server that applies APF to us?"""
    return any(headers.get(name) for name in APF_HEADERS)


class PaceObserver(Protocol):
    """What the process counts about pacing (``Metrics`` is one)."""

    def api_throttled(self, wait_s: float) -> None: ...

    def api_client_budget(self, qps: float | None) -> None: ...


class _Unobserved:
    def api_throttled(self, wait_s: float) -> None:
        return

    def api_client_budget(self, qps: float | None) -> None:
        return


# -- the shell: clocks and sleeps ----------------------------------------------------


class RateLimiter:
    """Token bucket: ``qps`` sustained, ``burst`` at once (client-side API budget)."""

    def __init__(self, *, qps: float, burst: int) -> None:
        self.qps = qps
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self._capacity, self._tokens + (now - self._last) * self.qps)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self.qps
            time.sleep(wait)


class Pacer:
    """Every request's ``wait`` before it leaves; ``answered`` and ``throttled`` after."""

    def __init__(
        self,
        *,
        qps: float | None,
        burst: int | None,
        observer: PaceObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.explicit = qps is not None
        rate = qps if qps is not None else FALLBACK_QPS
        size = burst if burst is not None else (max(1, int(2 * rate)) if self.explicit
                                                else FALLBACK_BURST)  # fmt: skip
        self._bucket = RateLimiter(qps=rate, burst=size)
        self._observer = observer or _Unobserved()
        self._clock, self._sleep, self._jitter = clock, sleep, jitter
        self._lock = threading.Lock()
        self._server_paces: bool | None = None  # unknown until the first answer
        self._not_before = 0.0  # no request leaves before this (after a 429)
        # The throttling spell: (since, 429s, waited s, last 429 at).
        self._episode: tuple[float, int, float, float] | None = None
        self._observer.api_client_budget(rate)

    @property
    def client_qps(self) -> float | None:
        """The client-side budget in force; None while the server paces us."""
        return self._bucket.qps if self.explicit or not self._server_paces else None

    def wait(self) -> None:
        """Block until this request may leave: after any 429's wait, then the bucket."""
        while True:
            with self._lock:
                gate = self._not_before - self._clock()
            if gate <= 0:
                break
            self._sleep(gate)
        if self.client_qps is not None:
            self._bucket.acquire()

    def answered(self, headers: Mapping[str, str]) -> None:
        """A 2xx answer: learn whether the server paces us, and end a throttling spell."""
        paces = server_paces(headers)
        now = self._clock()
        with self._lock:
            changed = paces != self._server_paces
            self._server_paces = paces
            episode = self._episode
            if episode is not None and now - episode[3] >= QUIET_S:
                self._episode = None
            else:
                episode = None
        if changed and not self.explicit:
            self._observer.api_client_budget(None if paces else FALLBACK_QPS)
            if paces:
                log.info("the API server applies Priority and Fairness to us: no client-side "
                         "budget (set api.qps to cap our requests anyway)")  # fmt: skip
            else:
                log.info("the API server's answers carry no Priority and Fairness headers: "
                         "client-side budget of %.0f requests/s, burst %d", FALLBACK_QPS,
                         FALLBACK_BURST)  # fmt: skip
        if episode is not None:
            since, count, waited, last = episode
            log.info("the API server accepts our requests again after %d throttled (429) "
                     "over %.1f s (%.1f s waited in all)", count, last - since,
                     waited)  # fmt: skip

    def throttled(self, *, what: str, retry_after: float | None, attempt: int) -> float:
        """A 429: hold every request for the delay; returns it."""
        delay = throttle_delay(retry_after=retry_after, attempt=attempt, jitter=self._jitter())
        now = self._clock()
        with self._lock:
            self._not_before = max(self._not_before, now + delay)
            first = self._episode is None
            since, count, waited, _ = self._episode or (now, 0, 0.0, now)
            self._episode = (since, count + 1, waited + delay, now)
        self._observer.api_throttled(delay)
        if first:
            after = "no Retry-After" if retry_after is None else f"Retry-After {retry_after:g} s"
            log.warning("the API server is throttling us (429 on %s, %s): every request "
                        "waits %.2f s, longer while it goes on; runs keep their order and "
                        "stay in the broker until stored", what, after, delay)  # fmt: skip
        return delay
