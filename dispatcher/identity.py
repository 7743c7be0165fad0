"""A run's identity and the deterministic names and labels derived from it (pure).

The Job name is a function of (facility, instrument, runs, version) only, so a
redelivered message meets ``409 AlreadyExists`` instead of creating a second Job.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from autoreduce_common.messages import ReductionMessage

MAX_NAME = 63  # Job names end up in the pod label batch.kubernetes.io/job-name
_NAME_SAFE = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class RunKey:
    """What makes a run unique, and its exclusivity key (the RB number)."""

    facility: str
    instrument: str
    runs: tuple[int, ...]
    version: int
    rb_number: str

    @property
    def first_run(self) -> int:
        return min(self.runs)

    def describe(self) -> str:
        runs = (
            str(self.runs[0]) if len(self.runs) == 1 else f"{self.first_run}+{len(self.runs) - 1}"
        )
        return f"{self.instrument} run {runs} v{self.version} (RB {self.rb_number})"


def run_key(message: ReductionMessage) -> RunKey:
    """The key of a validated run message (required fields already checked)."""
    runs = message.run_number if isinstance(message.run_number, list) else [message.first_run]
    return RunKey(
        facility=message.facility,
        instrument=message.instrument or "",
        runs=tuple(sorted(set(runs))),
        version=message.run_version,
        rb_number=message.rb_number or "",
    )


def _digest(key: RunKey) -> str:
    text = f"{key.facility}/{key.instrument}/{','.join(map(str, key.runs))}/{key.version}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def job_name(key: RunKey) -> str:
    """``red-<instrument>-<run>-v<version>-<hash>``, at most 63 characters.

    The readable part is for operators; the hash makes it unique even when the
    readable part is truncated or a batch shares its first run with a single run.
    """
    instrument = _NAME_SAFE.sub("-", key.instrument.lower()).strip("-") or "x"
    suffix = f"-{key.first_run}-v{key.version}-{_digest(key)}"
    room = MAX_NAME - len("red-") - len(suffix)
    return f"red-{instrument[: max(room, 1)].rstrip('-')}{suffix}"[:MAX_NAME]


def lease_name(rb_number: str) -> str:
    """The Lease that says which Job holds RB ``rb_number``."""
    return f"rb-{rb_number.lower()}"


@dataclass(frozen=True)
class Labels:
    """Label and annotation keys under the operator's prefix."""

    prefix: str

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    @property
    def managed(self) -> str:
        return self.key("managed")

    @property
    def pod_finalizer(self) -> str:
        """Keeps a reduction pod, with its termination message, until its run's outcome is
        settled: a deleted pod would otherwise vanish with the runner's record of what it
        sent, and the dispatcher could only guess."""
        return self.key("outcome")

    def for_run(self, key: RunKey) -> dict[str, str]:
        return {
            self.managed: "true",
            self.key("rb-number"): key.rb_number,
            self.key("instrument"): key.instrument,
            self.key("run-number"): str(key.first_run),
            self.key("run-version"): str(key.version),
        }

    def selector(self, **match: str) -> str:
        parts = [f"{self.managed}=true"]
        parts += [f"{self.key(name.replace('_', '-'))}={value}" for name, value in match.items()]
        return ",".join(parts)
