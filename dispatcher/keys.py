"""What goes on the work queue: a key names one thing to reconcile (pure)."""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class Kind(StrEnum):
    """What a key names; each kind has one reconciler (``runtime.Workers``)."""

    RB = "rb"  # admission of one RB's runs
    JOB = "job"  # the outcome of one run's Job
    CAP_SLOT = "cap-slot"  # a cap slot may have freed: wake the RBs that wait for one
    MARKER_SWEEP = "marker-sweep"  # expire old cancel markers


class Key(NamedTuple):
    kind: Kind
    name: str = ""
