"""Log lines that say which run they concern.

Every line about a run carries its identity (instrument, run, version, RB, Job name)
as ``extra`` fields: ``run_logger`` / ``job_logger`` give a ``LoggerAdapter`` that
adds them, and ``JsonFormatter`` (settings ``log_json``) renders them as top-level
keys, so ``jq 'select(.rb == "1920001")'`` follows one experiment through the log.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

from dispatcher.identity import Labels, RunKey, job_name

# The keys a run-tagged record carries (LogRecord attributes set through ``extra``).
RUN_FIELDS = ("instrument", "run", "version", "rb", "job")


def run_fields(key: RunKey) -> dict[str, Any]:
    """The identity of a run as log fields."""
    runs = key.runs[0] if len(key.runs) == 1 else list(key.runs)
    return {
        "instrument": key.instrument,
        "run": runs,
        "version": key.version,
        "rb": key.rb_number,
        "job": job_name(key),
    }


def job_fields(labels: Labels, job: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of a run read from its Job's labels (no message at hand)."""
    metadata = job.get("metadata") or {}
    tags = metadata.get("labels") or {}

    def number(name: str) -> int | None:
        try:
            return int(tags.get(labels.key(name), ""))
        except ValueError:
            return None

    return {
        "instrument": tags.get(labels.key("instrument")),
        "run": number("run-number"),
        "version": number("run-version"),
        "rb": tags.get(labels.key("rb-number")),
        "job": metadata.get("name"),
    }


class RunAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds the run's fields to every record (merged with any ``extra`` of the call)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def run_logger(logger: logging.Logger, key: RunKey) -> RunAdapter:
    return RunAdapter(logger, run_fields(key))


def job_logger(logger: logging.Logger, labels: Labels, job: Mapping[str, Any]) -> RunAdapter:
    return RunAdapter(logger, job_fields(labels, job))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the run's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        for name in RUN_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)
