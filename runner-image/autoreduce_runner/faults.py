"""Named fault points in the outcome path, for the fault suite only (off unless set).

``AUTOREDUCE_FAULT_POINT`` names one point; when the runner reaches it, it dies there
(``AUTOREDUCE_FAULT_ACTION=exit``: ``os._exit(137)``, as abrupt as a SIGKILL, no
cleanup, no termination-message write) or hangs until Kubernetes kills it (``hang``:
for pod deletions, evictions and deadlines that land exactly there). A SIGKILL of our
own would do nothing when the runner is the container's PID 1, hence ``_exit``.

The points, in the order a run reaches them (runner-image/README.md):

- ``before-send``: the outcome is recorded as "sending", nothing is on the wire yet;
- ``after-store``: the frame is written and the broker has had a second to store it;
  its receipt is not read;
- ``after-receipt``: the broker confirmed; "posted" is not recorded yet;
- ``during-close``: "posted" is recorded; the connection is being closed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger(__name__)

KILLED_EXIT = 137  # what a SIGKILLed container reports
STORE_WAIT_S = 1.0  # loopback broker: ample time to store a frame before we die


class FaultPoint(StrEnum):
    BEFORE_SEND = "before-send"
    AFTER_STORE = "after-store"
    AFTER_RECEIPT = "after-receipt"
    DURING_CLOSE = "during-close"


class FaultAction(StrEnum):
    EXIT = "exit"
    HANG = "hang"


@dataclass(frozen=True)
class Faults:
    point: FaultPoint | None = None
    action: FaultAction = FaultAction.EXIT

    def reach(self, point: FaultPoint) -> None:
        """Die or hang here when ``point`` is the configured one; else nothing."""
        if point is not self.point:
            return
        if point is FaultPoint.AFTER_STORE:
            time.sleep(STORE_WAIT_S)
        log.warning("fault point %s reached: %s", point.value, self.action.value)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        if self.action is FaultAction.EXIT:
            os._exit(KILLED_EXIT)
        while True:  # until Kubernetes kills the container (SIGTERM is only noted)
            time.sleep(3600)
