"""Running-run caps in the admission reconciler: counting a slot and taking it are one
step (workers admit in parallel), and an RB refused a slot is remembered so that the
next finished run queues it again. The rule itself is ``admission.caps_allow``."""

from __future__ import annotations

import threading
from typing import Any

from dispatcher import admission
from dispatcher.events import WaitingEvents, caps_note
from dispatcher.identity import Labels
from dispatcher.jobcache import JobCache

Job = dict[str, Any]


class CapSlots:
    def __init__(self, *, labels: Labels, caps: admission.Caps, cache: JobCache,
                 waiting_events: WaitingEvents) -> None:
        self.labels = labels
        self.caps = caps
        self.cache = cache
        self.waiting_events = waiting_events
        # Held while a worker counts the caps and marks an RB blocked: a swap between a
        # worker's count and its mark would leave that RB blocked with its slot already
        # free (and iterating the set a worker adds to can raise).
        self.lock = threading.Lock()
        self._blocked: set[str] = set()  # RBs waiting for a slot; under ``lock``

    def capped(self) -> bool:
        return self.caps.max_running is not None or bool(self.caps.per_instrument)

    def room_for(self, rb: str, job: Job) -> bool:
        """Whether the caps let ``job`` start; if not, its RB waits for a slot (noted).
        Call with ``lock`` held."""
        running = [other for other in self.cache.running() if other is not job]
        if admission.caps_allow(labels=self.labels, caps=self.caps, job=job, running=running):
            return True
        self._blocked.add(rb)
        note = caps_note(self.labels, caps=self.caps, job=job, running=running)
        for waiting in self.cache.of_rb(rb):
            if admission.is_waiting(waiting):
                self.waiting_events.waiting(waiting, note)
        return False

    def take_blocked(self) -> set[str]:
        """The RBs refused a slot since the last call (a slot may be free now)."""
        with self.lock:
            blocked, self._blocked = self._blocked, set()
        return blocked
