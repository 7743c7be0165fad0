"""``python -m autoreduce_runner``: run one reduction and exit with what happened."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from autoreduce_common.messages import MessageError, Outcome, ReductionMessage, parse_run
from autoreduce_common.stomp_client import BrokerError

from autoreduce_runner import admin, report
from autoreduce_runner.broker import Poster
from autoreduce_runner.config import (
    DEFAULT_TERMINATION_LOG,
    ConfigError,
    RunnerSettings,
    load_settings,
)
from autoreduce_runner.report import ExitCode, RunResult
from autoreduce_runner.script import WebVars

log = logging.getLogger("autoreduce_runner")


class AdminLog(logging.Handler):
    """Keeps the admin's own log lines for the ``admin_log`` field."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


def _configure_logging() -> AdminLog:
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stderr = logging.StreamHandler(sys.stderr)
    admin_log = AdminLog()
    for handler in (stderr, admin_log):
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [stderr, admin_log]
    root.setLevel(logging.INFO)
    return admin_log


def _write_termination(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as problem:  # not in a pod, or no such file: the exit code still says it
        log.debug("cannot write termination message to %s: %s", path, problem)


def _finish(path: Path, *, outcome: Outcome | None, posted: bool, retry_in: int | None,
            message: str, code: ExitCode) -> int:
    _write_termination(path, report.termination_message(
        outcome=outcome, posted=posted, retry_in=retry_in, message=message))
    log.info("exit %d (%s): %s", code.value, code.name, message[:300])
    return int(code)


def _install_stop_handler(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.warning("received %s: stopping the reduction", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _read_message(path: Path) -> tuple[dict[str, Any], ReductionMessage | str]:
    """The raw message and its validated view, or the reason it is invalid.

    ConfigError when there is no JSON object at all (nothing to echo back).
    """
    try:
        body = path.read_bytes()
    except OSError as problem:
        raise ConfigError(f"cannot read the run's message: {problem}") from problem
    try:
        raw, message = parse_run(body)
    except MessageError as problem:
        if problem.raw is None:
            raise ConfigError(f"the run's message is unusable: {problem.reason}") from problem
        return problem.raw, f"Invalid reduction message: {problem.reason}"
    if message.cancel:
        raise ConfigError("the runner was given a cancel message, not a run")
    return raw, message


def _run(*, raw: dict[str, Any], message: ReductionMessage | str, poster: Poster,
         settings: RunnerSettings, stop: threading.Event) -> RunResult:
    if isinstance(message, str):
        log.error("%s", message)
        return report.error(message)
    try:
        WebVars.from_arguments(message.reduction_arguments or {})
    except TypeError as problem:
        log.error("invalid reduction_arguments: %s", problem)
        return report.error(f"Invalid reduction message: {problem}")
    poster.post(destination=settings.broker.queues.started, message=raw)
    log.info("ReductionStarted posted for %s run %s v%s", message.instrument,
             message.run_number, message.run_version)
    tee = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    return admin.reduce(settings=settings, message=message, stop=stop, tee=tee)


def _run_guarded(*, raw: dict[str, Any], message: ReductionMessage | str, poster: Poster,
                 settings: RunnerSettings, stop: threading.Event) -> RunResult:
    """``_run``, but a bug in the runner still ends in one posted ReductionError."""
    try:
        return _run(raw=raw, message=message, poster=poster, settings=settings, stop=stop)
    except BrokerError:
        raise
    except Exception as problem:
        log.exception("internal error in the runner")
        return report.error(f"Internal error in the runner: {type(problem).__name__} - {problem}")


def main() -> int:
    admin_log = _configure_logging()
    stop = threading.Event()
    _install_stop_handler(stop)
    fallback = Path(os.environ.get("AUTOREDUCE_TERMINATION_LOG", str(DEFAULT_TERMINATION_LOG)))
    try:
        settings = load_settings()
        logging.getLogger().setLevel(settings.log_level.upper())
        raw, message = _read_message(settings.message_file)
    except (ConfigError, ValueError) as problem:
        log.error("bad runner configuration: %s", problem)
        return _finish(fallback, outcome=None, posted=False, retry_in=None,
                       message=f"bad runner configuration: {problem}", code=ExitCode.BAD_CONFIG)
    termination = settings.termination_log
    poster = Poster(settings=settings.broker, connect_timeout_s=settings.broker_connect_timeout_s)
    result: RunResult | None = None
    try:
        poster.connect()
        result = _run_guarded(raw=raw, message=message, poster=poster, settings=settings,
                              stop=stop)
        if stop.is_set():
            # SIGTERM comes from Kubernetes: a deadline, an eviction or a cancellation.
            # Only the dispatcher knows which, so it posts the one outcome (with the
            # right reason, and a retry if it was transient); we only say we did not.
            return _finish(termination, outcome=result.outcome, posted=False, retry_in=None,
                           message=f"not posted: stopped by SIGTERM; {result.message or ''}",
                           code=ExitCode.NOT_POSTED)
        body = report.outcome_message(
            raw, result=result, admin_log=admin_log.text(),
            reduction_log_cap=settings.log_caps.reduction_log,
            admin_log_cap=settings.log_caps.admin_log,
        )
        poster.post(destination=report.destination(result.outcome, queues=settings.broker.queues),
                    message=body)
        # Record "posted" the moment the broker confirmed, before the disconnect: a pod
        # killed during close() must not make the dispatcher post a second outcome.
        code = _finish(termination, outcome=result.outcome, posted=True,
                       retry_in=result.retry_in, message=result.message or _summary(result),
                       code=report.exit_code(result, posted=True))
    except BrokerError as problem:
        log.error("outcome not posted: %s", problem)
        return _finish(termination, outcome=result.outcome if result else None, posted=False,
                       retry_in=result.retry_in if result else None,
                       message=f"outcome not posted (broker): {problem}; "
                       + ((result.message or _summary(result)) if result else ""),
                       code=ExitCode.NOT_POSTED)
    finally:
        poster.close()
    log.info("Reduction%s posted", result.outcome.value)
    return code


def _summary(result: RunResult) -> str:
    return "output in " + ", ".join(result.reduction_data) if result.reduction_data else "done"


if __name__ == "__main__":
    sys.exit(main())
