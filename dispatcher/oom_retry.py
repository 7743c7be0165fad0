"""Out of memory, retried bigger: the memory a run's next version gets (pure).

Opt-in per instrument (``oom_retry`` in the runner spec). The dispatcher decides it
twice from the same inputs: when it renders a Job, to tell the runner (whose own
ReductionError then says what will be tried), and when the run failed for memory, to
retry it. The next version's memory travels as headers on the retry message, so the
broker holds the decision across our restarts like the retry itself.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autoreduce_common.pod_contract import OOM_KILLED, oom_retry_note, quantity_bytes, render_memory

from dispatcher.config import OomRetry
from dispatcher.failures import Verdict
from dispatcher.identity import Labels

MEMORY_LIMIT_HEADER = "autoreduce-memory-limit"
MEMORY_REQUEST_HEADER = "autoreduce-memory-request"
_MI = 1 << 20


@dataclass(frozen=True)
class Memory:
    """A reduction's memory: its limit, and its request when it has one."""

    limit: str
    request: str | None = None

    def headers(self) -> dict[str, str]:
        return {MEMORY_LIMIT_HEADER: self.limit,
                **({MEMORY_REQUEST_HEADER: self.request} if self.request else {})}  # fmt: skip

    def apply(self, resources: dict[str, Any]) -> dict[str, Any]:
        """``resources`` (a container's) with this memory in place of its own."""
        limits = {**(resources.get("limits") or {}), "memory": self.limit}
        requests = dict(resources.get("requests") or {})
        if self.request:
            requests["memory"] = self.request
        return {**resources, "limits": limits, "requests": requests}


def memory_from(headers: Mapping[str, str]) -> Memory | None:
    """The memory a retry message asks for; None without one, or when it is not a
    quantity (a header anyone could set must not break the Job)."""
    limit = str(headers.get(MEMORY_LIMIT_HEADER) or "")
    if not quantity_bytes(limit):
        return None
    request = str(headers.get(MEMORY_REQUEST_HEADER) or "")
    return Memory(limit, request if quantity_bytes(request) else None)


def _grown(count: int, factor: float, ceiling: int) -> int:
    return min(math.ceil(count * factor / _MI) * _MI, ceiling)


def next_memory(resources: Mapping[str, Any], policy: OomRetry | None) -> Memory | None:
    """The next version's memory, or None: no policy, no limit, or at the ceiling."""
    if policy is None:
        return None
    limit = quantity_bytes(str((resources.get("limits") or {}).get("memory") or ""))
    ceiling = quantity_bytes(policy.max_memory)
    if not limit or not ceiling or _grown(limit, policy.factor, ceiling) <= limit:
        return None
    grown = _grown(limit, policy.factor, ceiling)
    request = quantity_bytes(str((resources.get("requests") or {}).get("memory") or ""))
    bigger = _grown(request, policy.factor, grown) if request else None
    return Memory(render_memory(grown), render_memory(bigger) if bigger else None)


def retried_bigger(verdict: Verdict, memory: Memory | None) -> Verdict:
    """An out-of-memory verdict as one retried with ``memory`` (unchanged otherwise).

    The runner's own ReductionError already said so (it was told at render time); a
    message posted on its behalf says it here."""
    if memory is None or verdict.reason != OOM_KILLED:
        return verdict
    note = "" if verdict.posted_by_runner else oom_retry_note(limit=memory.limit)
    return dataclasses.replace(verdict, message=verdict.message + note, transient=True,
                               retry_in=0, memory=memory.headers())


def after_oom(job: Mapping[str, Any], verdict: Verdict, *, labels: Labels,
              policy: OomRetry | None, max_attempts: int) -> Verdict:
    """The verdict of a finished Job, retried bigger when it ran out of memory, the
    instrument has an ``oom_retry`` and an attempt is left (the dispatcher retries)."""
    if verdict.reason != OOM_KILLED:
        return verdict
    annotations = (job.get("metadata") or {}).get("annotations") or {}
    try:
        attempt = int(annotations.get(labels.key("attempt"), "1") or 1)
    except ValueError:
        attempt = 1
    if attempt >= max_attempts:
        return verdict
    pod_spec = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    runner = (pod_spec.get("containers") or [{}])[0]  # the runner comes first
    return retried_bigger(verdict, next_memory(runner.get("resources") or {}, policy))
