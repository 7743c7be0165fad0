"""Which finished Jobs the outcome path has been offered: each once, and once more
after the outcome path gave up on one for now (broker or API away for longer than it
retries), at the next resync.

Shared by the controller, which offers, and the lifecycle, which gives up: built
once by the composition root and handed to both, so neither is wired to the other
after construction.
"""

from __future__ import annotations

import threading


class FinishedOffers:
    def __init__(self) -> None:
        self._offered: set[str] = set()
        self._lock = threading.Lock()

    def first(self, name: str) -> bool:
        """True once per Job name (until ``forget``): offer it now."""
        with self._lock:
            if name in self._offered:
                return False
            self._offered.add(name)
            return True

    def forget(self, name: str) -> None:
        """Offer ``name`` again next time (given up on, or the Job is gone)."""
        with self._lock:
            self._offered.discard(name)
