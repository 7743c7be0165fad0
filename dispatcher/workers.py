"""The threads that take keys off the work queue and run each key's reconciler.

Errors are mapped here, once: an API or broker that is away, or a bug, puts the key
back with its own exponential backoff (a key never gives up, and never blocks the
others); a reconciler that wants another look says when by returning a delay.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from autoreduce_common.stomp_client import BrokerError

from dispatcher.keys import Key, Kind
from dispatcher.kube import KubeError, Unavailable
from dispatcher.workqueue import WorkQueue

log = logging.getLogger(__name__)
# Takes the key's name; returns seconds until it wants another look, or None.
Reconcile = Callable[[str], float | None]


class Workers:
    def __init__(self, *, queue: WorkQueue, reconcilers: Mapping[Kind, Reconcile],
                 count: int) -> None:
        self._queue = queue
        self._reconcilers = dict(reconcilers)
        self._threads = [threading.Thread(target=self._run, name=f"reconcile-{n}", daemon=True)
                         for n in range(count)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def stop(self, *, timeout: float) -> None:
        self._queue.shutdown()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self) -> None:
        while not self._queue.closed:
            key = self._queue.get(timeout=1.0)
            if key is not None:
                self.process(key)

    def process(self, key: Key) -> None:
        """One pass of ``key``'s reconciler, its errors mapped to a backoff."""
        try:
            after = self._reconcilers[key.kind](key.name)
        except Unavailable as error:
            delay = self._queue.add_rate_limited(key)
            log.warning("%s %s: API unavailable (%s); again in %.1fs", key.kind, key.name,
                        error, delay)
        except (KubeError, BrokerError) as error:
            delay = self._queue.add_rate_limited(key)
            log.warning("%s %s: %s; again in %.1fs", key.kind, key.name, error, delay)
        except Exception:
            # A bug must not kill the worker, nor drop the key: it is retried with
            # backoff (and logged every time) until a fix is deployed.
            delay = self._queue.add_rate_limited(key)
            log.exception("%s %s: reconcile failed; again in %.1fs", key.kind, key.name, delay)
        else:
            self._queue.forget(key)
            if after is not None:
                self._queue.add_after(key, after)
        finally:
            self._queue.done(key)
