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
from autoreduce_common.pod_contract import (
    TERMINATION_LOG,
    ExitCode,
    PodEnv,
    Stage,
    TerminationReport,
    outcome_headers,
    started_id,
)
from autoreduce_common.stomp_client import BrokerError

from autoreduce_runner import admin, report
from autoreduce_runner.broker import OutcomePoster, Poster
from autoreduce_runner.config import ConfigError, RunnerSettings, load_settings
from autoreduce_runner.faults import FaultPoint
from autoreduce_runner.report import RunResult
from autoreduce_runner.script import WebVars
from autoreduce_runner.sidecar_client import SidecarPoster, make_non_dumpable

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


def _write_termination(path: Path, report: TerminationReport) -> None:
    try:
        path.write_text(report.render(), encoding="utf-8")
    except OSError as problem:  # not in a pod, or no such file: the exit code still says it
        log.debug("cannot write termination message to %s: %s", path, problem)


def _finish(path: Path, report: TerminationReport, *, code: ExitCode) -> int:
    _write_termination(path, report)
    log.info("exit %d (%s): %s", code.value, code.name, report.message[:300])
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


def _run(*, raw: dict[str, Any], message: ReductionMessage | str, poster: OutcomePoster,
         settings: RunnerSettings, stop: threading.Event) -> RunResult:
    if isinstance(message, str):
        log.error("%s", message)
        return report.error(message)
    try:
        WebVars.from_arguments(message.reduction_arguments or {})
    except TypeError as problem:
        log.error("invalid reduction_arguments: %s", problem)
        return report.error(f"Invalid reduction message: {problem}")
    poster.post(destination=settings.broker.queues.for_outcome(Outcome.STARTED), message=raw,
                headers=outcome_headers(outcome_id=started_id(settings.outcome_id),
                                        possible_repeat=False))
    poster.close()  # nothing idles through an hours-long script
    log.info("ReductionStarted posted for %s run %s v%s", message.instrument,
             message.run_number, message.run_version)
    tee = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    return admin.reduce(settings=settings, message=message, stop=stop, tee=tee)


def _run_guarded(*, raw: dict[str, Any], message: ReductionMessage | str, poster: OutcomePoster,
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
    # Where to say "bad configuration" when the settings themselves cannot be read.
    fallback = Path(os.environ.get(PodEnv.TERMINATION_LOG, TERMINATION_LOG))
    try:
        settings = load_settings()
        logging.getLogger().setLevel(settings.log_level.upper())
        raw, message = _read_message(settings.message_file)
    except (ConfigError, ValueError) as problem:
        log.error("bad runner configuration: %s", problem)
        return _finish(fallback, report.termination_report(
            None, stage=Stage.NONE, message=f"bad runner configuration: {problem}"),
            code=ExitCode.BAD_CONFIG)
    poster = _poster(settings)
    try:
        return _reduce_and_post(raw=raw, message=message, poster=poster, settings=settings,
                                stop=stop, admin_log=admin_log)
    finally:
        poster.close()


def _poster(settings: RunnerSettings) -> OutcomePoster:
    """Through the pod's poster sidecar when it has one (then the broker credential
    is in the sidecar only), else straight to the broker."""
    if settings.poster_socket is None:
        return Poster(settings=settings.broker,
                      connect_timeout_s=settings.broker_connect_timeout_s)
    make_non_dumpable()
    # The sidecar's own worst case: its warm-up connect failing (sidecar._warm_up),
    # reaching the broker, then a lost receipt and the one resend, each waiting the
    # outcome receipt timeout.
    worst = (3 * settings.broker_connect_timeout_s
             + 2 * settings.broker.outcome_receipt_timeout_s)
    return SidecarPoster(path=settings.poster_socket,
                         connect_timeout_s=settings.broker_connect_timeout_s,
                         reply_timeout_s=worst + 60)


def _reduce_and_post(*, raw: dict[str, Any], message: ReductionMessage | str, poster: OutcomePoster,
                     settings: RunnerSettings, stop: threading.Event,
                     admin_log: AdminLog) -> int:
    termination = settings.termination_log
    result: RunResult | None = None
    try:
        poster.connect()
        result = _run_guarded(raw=raw, message=message, poster=poster, settings=settings,
                              stop=stop)
        if stop.is_set():
            # SIGTERM comes from Kubernetes: a deadline, an eviction or a cancellation.
            # Only the dispatcher knows which, so it posts the one outcome (with the
            # right reason, and a retry if it was transient); we only say we did not.
            return _finish(termination, report.termination_report(
                result, stage=Stage.DECIDED,
                message=f"not posted: stopped by SIGTERM; {result.message or ''}"),
                code=ExitCode.NOT_POSTED)
        _post_outcome(raw=raw, result=result, poster=poster, settings=settings,
                      admin_log=admin_log)
    except BrokerError as problem:
        log.error("outcome not posted: %s", problem)
        if result is None:  # the broker failed us before the run's end: nothing sent
            return _finish(termination, report.termination_report(
                None, stage=Stage.NONE, message=f"outcome not posted (broker): {problem}"),
                code=ExitCode.NOT_POSTED)
        # Stage SENDING stays on record: a copy may be on the broker, so the dispatcher
        # will post this same outcome, never another.
        return int(ExitCode.NOT_POSTED)
    code = report.exit_code(result, posted=True)
    log.info("Reduction%s posted; exit %d (%s)", result.outcome.value, code.value, code.name)
    settings.faults.reach(FaultPoint.DURING_CLOSE)
    return int(code)


def _post_outcome(*, raw: dict[str, Any], result: RunResult, poster: OutcomePoster,
                  settings: RunnerSettings, admin_log: AdminLog) -> None:
    """Record "sending", send, record "posted": each step on record before the next, so
    whoever finds this pod stopped at any instant posts this outcome or nothing."""
    termination, faults = settings.termination_log, settings.faults
    body = report.outcome_message(
        raw, result=result, admin_log=admin_log.text(),
        reduction_log_cap=settings.log_caps.reduction_log,
        admin_log_cap=settings.log_caps.admin_log,
    )
    _write_termination(termination, report.termination_report(
        result, stage=Stage.SENDING, message=result.message or ""))
    faults.reach(FaultPoint.BEFORE_SEND)
    poster.post(destination=settings.broker.queues.for_outcome(result.outcome),
                message=body,
                headers=outcome_headers(outcome_id=settings.outcome_id, possible_repeat=False),
                on_sent=lambda: faults.reach(FaultPoint.AFTER_STORE))
    faults.reach(FaultPoint.AFTER_RECEIPT)
    # "posted" the moment the broker confirmed, before the disconnect: a pod killed
    # during close() must not make the dispatcher post again.
    _write_termination(termination, report.termination_report(
        result, stage=Stage.POSTED, message=result.message or ""))


if __name__ == "__main__":
    sys.exit(main())
