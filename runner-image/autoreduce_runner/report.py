"""Pure: outcome messages, the termination message and the exit code."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from autoreduce_common.broker_settings import QueueNames
from autoreduce_common.messages import Outcome, bound_text, echo

# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_CHARS = 800  # x 4 bytes of UTF-8, plus the keys


class ExitCode(IntEnum):
    """What the Job's exit status tells the dispatcher (runner-image/README.md)."""

    POSTED_OK = 0  # ReductionComplete or ReductionSkipped posted
    POSTED_ERROR = 1  # ReductionError posted: the script's or the input's fault
    BAD_CONFIG = 2  # the runner's own configuration is unusable; nothing posted
    POSTED_RETRY = 3  # ReductionError posted with retry_in
    NOT_POSTED = 4  # the outcome could not be posted (broker): report on our behalf


@dataclass(frozen=True)
class RunResult:
    """How the run ended, before it becomes a message."""

    outcome: Outcome
    message: str | None = None  # error or skip text
    retry_in: int | None = None
    reduction_data: list[str] = field(default_factory=list)
    reduction_log: str = ""


def error(message: str, *, retry_in: int | None = None, reduction_log: str = "") -> RunResult:
    return RunResult(outcome=Outcome.ERROR, message=message, retry_in=retry_in,
                     reduction_log=reduction_log)


def destination(outcome: Outcome, *, queues: QueueNames) -> str:
    return {
        Outcome.STARTED: queues.started,
        Outcome.COMPLETE: queues.complete,
        Outcome.ERROR: queues.error,
        Outcome.SKIPPED: queues.skipped,
    }[outcome]


def outcome_message(
    raw: dict[str, Any],
    *,
    result: RunResult,
    admin_log: str,
    reduction_log_cap: int,
    admin_log_cap: int,
) -> dict[str, Any]:
    """The original message with the outcome fields set (stale ones overwritten)."""
    return echo(
        raw,
        message=result.message,
        retry_in=result.retry_in if result.outcome is Outcome.ERROR else None,
        reduction_data=list(result.reduction_data),
        reduction_log=bound_text(result.reduction_log, limit=reduction_log_cap),
        admin_log=bound_text(admin_log, limit=admin_log_cap),
    )


def exit_code(result: RunResult | None, *, posted: bool) -> ExitCode:
    if result is None or not posted:
        return ExitCode.NOT_POSTED
    if result.outcome is not Outcome.ERROR:
        return ExitCode.POSTED_OK
    return ExitCode.POSTED_RETRY if result.retry_in is not None else ExitCode.POSTED_ERROR


def termination_message(
    *, outcome: Outcome | None, posted: bool, retry_in: int | None, message: str | None
) -> str:
    """JSON for the pod's termination message: did the runner post, and what."""
    return json.dumps(
        {
            "outcome": outcome.value if outcome is not None else "none",
            "posted": posted,
            "retry_in": retry_in,
            "message": bound_text(message or "", limit=TERMINATION_MESSAGE_CHARS),
        },
        ensure_ascii=False,
    )
