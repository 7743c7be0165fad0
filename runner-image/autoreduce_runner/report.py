"""Pure: outcome messages, the termination message and the exit code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autoreduce_common.messages import Outcome, bound_text, echo
from autoreduce_common.pod_contract import ExitCode, Stage, TerminationReport


@dataclass(frozen=True)
class RunResult:
    """How the run ended, before it becomes a message."""

    outcome: Outcome
    message: str | None = None  # error or skip text
    retry_in: int | None = None
    reduction_data: list[str] = field(default_factory=list)
    reduction_log: str = ""
    reason: str = ""  # pod_contract.OOM_KILLED when the script was killed for memory


def error(message: str, *, retry_in: int | None = None, reduction_log: str = "",
          reason: str = "") -> RunResult:
    return RunResult(outcome=Outcome.ERROR, message=message, retry_in=retry_in,
                     reduction_log=reduction_log, reason=reason)


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


def termination_report(result: RunResult | None, *, stage: Stage,
                       message: str | None = None) -> TerminationReport:
    """What the termination message says about ``result`` at ``stage``."""
    if result is None:
        return TerminationReport(stage=Stage.NONE, message=message or "")
    return TerminationReport(
        stage=stage,
        outcome=result.outcome,
        message=message if message is not None else (result.message or summary(result)),
        retry_in=result.retry_in if result.outcome is Outcome.ERROR else None,
        reduction_data=list(result.reduction_data),
        reason=result.reason,
    )


def summary(result: RunResult) -> str:
    return "output in " + ", ".join(result.reduction_data) if result.reduction_data else "done"
