"""Named fault points in the dispatcher's own outcome path, for the fault suite only.

``fault_point`` in the dispatcher's settings names one point; a dispatcher reaching it
exits at once with 137, as abruptly as a SIGKILL. Unset (the default, and all the chart
can set) means none. The points (README "Faults"):

- ``before-outcome-send``: a verdict is claimed and recorded on the Job; nothing sent;
- ``after-outcome-send``: the broker confirmed the outcome; the Job is not marked Done.

and between the writes of a direct admission (``dispatcher.direct``), and of a void:

- ``after-direct-lease``: the RB's Lease names the run's Job; no Job yet;
- ``after-job-create``: the run's Job exists (with the message in it, or without the
  ConfigMap of a large one yet); message not acked;
- ``after-config-map``: the message is stored (in the Job, or in its ConfigMap); no
  Admitted Event, message not acked;
- ``after-void``: a void Job took a missing holder's name; the Lease has not moved.

One point does not exit but slows the dispatcher down, as 50,000 waiting runs do:

- ``hold-job-list``: the first Job list is applied ``HOLD_JOB_LIST_S`` late, so the
  dispatcher consumes and admits with its Job cache still empty (``controller``).
"""

from __future__ import annotations

import logging
import os
from enum import StrEnum

log = logging.getLogger(__name__)


class FaultPoint(StrEnum):
    BEFORE_OUTCOME_SEND = "before-outcome-send"
    AFTER_OUTCOME_SEND = "after-outcome-send"
    AFTER_DIRECT_LEASE = "after-direct-lease"
    AFTER_JOB_CREATE = "after-job-create"
    AFTER_CONFIG_MAP = "after-config-map"
    AFTER_VOID = "after-void"
    HOLD_JOB_LIST = "hold-job-list"


HOLD_JOB_LIST_S = 30.0


def first_list_hold_s(configured: FaultPoint | None) -> float:
    """How long the first Job list is held back (0: not at all)."""
    return HOLD_JOB_LIST_S if configured is FaultPoint.HOLD_JOB_LIST else 0.0


def reach(point: FaultPoint, *, configured: FaultPoint | None) -> None:
    """Exit here, now, when ``point`` is the configured fault point."""
    if point is configured:
        log.warning("fault point %s reached: exiting 137", point.value)
        logging.shutdown()
        os._exit(137)
