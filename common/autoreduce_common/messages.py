"""The reduction message contract (shared/docs/message-contract.md), as pure functions.

A message is kept as the raw JSON object it arrived as: outcome messages are that
object with fields added, so unknown fields and the producer's own types (an
``rb_number`` sent as an int stays an int) survive the round trip. The pydantic model
is used to *validate* and to read normalised values, never to re-serialise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Label values: at most 63 chars of [A-Za-z0-9._-], alphanumeric at both ends. We are
# stricter (no '.', '_' or '-' in RB numbers) because the RB also names a Lease.
_RB_RE = re.compile(r"^[A-Za-z0-9]{1,40}$")
_INSTRUMENT_RE = re.compile(r"^[A-Z0-9](?:[A-Z0-9_-]{0,38}[A-Z0-9])?$")
_FACILITY_RE = re.compile(r"^[A-Z0-9]{1,20}$")

REQUIRED_FOR_RUN = (
    "data",
    "facility",
    "instrument",
    "rb_number",
    "run_number",
    "reduction_script",
    "reduction_arguments",
)


class Outcome(StrEnum):
    """The outcome queues a run can end on (message-contract.md, Queues)."""

    STARTED = "Started"
    COMPLETE = "Complete"
    ERROR = "Error"
    SKIPPED = "Skipped"


class MessageError(ValueError):
    """A message that cannot be accepted; ``reason`` is fit for a DLQ header."""

    def __init__(self, reason: str, *, raw: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


def _run_number(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("run_number must be an integer, not a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        number = int(value.strip())  # leading zeros are insignificant
    else:
        raise ValueError(f"run_number must be a non-negative integer, got {value!r}")
    if number < 0 or number > 10**12:
        raise ValueError(f"run_number out of range: {number}")
    return number


class ReductionMessage(BaseModel):
    """Validated, normalised view of a pending-queue message."""

    model_config = ConfigDict(extra="allow", frozen=True)

    data: str | list[str] | None = None
    facility: str = "ISIS"
    instrument: str | None = None
    rb_number: str | None = None
    run_number: int | list[int] | None = None
    run_version: int = Field(default=0, ge=0, le=10_000)
    reduction_script: str | None = None
    reduction_arguments: dict[str, Any] | None = None
    cancel: bool = False
    started_by: int | None = None
    overwrite: bool | None = None
    flat_output: bool | None = None
    description: str | None = None
    software: str | dict[str, Any] | None = None
    message: str | None = None
    retry_in: int | None = None

    @field_validator("facility", mode="before")
    @classmethod
    def _facility(cls, value: Any) -> Any:
        if value is None:
            return "ISIS"
        if not isinstance(value, str) or not _FACILITY_RE.match(value.strip().upper()):
            raise ValueError(f"facility must be 1-20 letters/digits, got {value!r}")
        return value.strip().upper()

    @field_validator("instrument", mode="before")
    @classmethod
    def _instrument(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str) or not _INSTRUMENT_RE.match(value.strip().upper()):
            raise ValueError(
                f"instrument must be letters, digits, '-' or '_' (max 40), got {value!r:.80}"
            )
        return value.strip().upper()

    @field_validator("rb_number", mode="before")
    @classmethod
    def _rb_number(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"rb_number must be a string or integer, got {value!r:.80}")
        text = str(value).strip()
        if not _RB_RE.match(text):
            raise ValueError(f"rb_number must be 1-40 letters or digits, got {text!r:.80}")
        return text

    @field_validator("run_number", mode="before")
    @classmethod
    def _run_numbers(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, list):
            if not value:
                raise ValueError("run_number list is empty")
            return [_run_number(item) for item in value]
        return _run_number(value)

    @field_validator("run_version", mode="before")
    @classmethod
    def _run_version(cls, value: Any) -> Any:
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"run_version must be an integer, got {value!r:.80}")
        return value

    @property
    def first_run(self) -> int:
        """The run that names a batch (its lowest run number)."""
        if isinstance(self.run_number, list):
            return min(self.run_number)
        if self.run_number is None:
            raise ValueError("message has no run_number")
        return self.run_number

    def missing_fields(self) -> list[str]:
        """Required fields (contract step 1) that are absent or empty."""
        missing = []
        for name in REQUIRED_FOR_RUN:
            value = getattr(self, name)
            if value is None or (isinstance(value, str | list) and not value):
                missing.append(name)
        return missing


def decode_body(body: bytes | str) -> dict[str, Any]:
    """Parse a frame body into the raw JSON object, or raise MessageError."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MessageError(f"body is not JSON: {error}") from error
    if not isinstance(raw, dict):
        raise MessageError(f"body is JSON but not an object (got {type(raw).__name__})")
    return raw


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def validate(raw: dict[str, Any]) -> ReductionMessage:
    """Validate a raw message object; MessageError says what was wrong."""
    try:
        return ReductionMessage.model_validate(raw)
    except ValidationError as error:
        raise MessageError(f"invalid message: {_describe(error)}", raw=raw) from error


def parse_run(body: bytes | str) -> tuple[dict[str, Any], ReductionMessage]:
    """Decode and validate a run request; every required field must be present."""
    raw = decode_body(body)
    message = validate(raw)
    if not message.cancel:
        missing = message.missing_fields()
        if missing:
            raise MessageError(f"missing required field(s): {', '.join(missing)}", raw=raw)
    elif message.run_number is None:
        raise MessageError("cancel message has no run_number", raw=raw)
    return raw, message


def echo(raw: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The outcome message: the original object with ``fields`` set (contract)."""
    return {**raw, **fields}


# What a reduction (or the dispatcher on its behalf) adds to the message it echoes
# back; a rerun starts without them. And ``cancel``: a rerun is a run, never a cancel.
CLEARED_FOR_RERUN = frozenset(
    {"message", "retry_in", "reduction_data", "reduction_log", "admin_log", "cancel"}
)


def rerun(
    raw: Mapping[str, Any], *, version: int, description: str | None = None
) -> dict[str, Any]:
    """A rerun (or retry) of ``raw`` as run version ``version``: every field of the
    original but the ones its outcome set, so unknown fields survive; ``description``
    replaces the rerun comment when given."""
    message = {key: value for key, value in raw.items() if key not in CLEARED_FOR_RERUN}
    message["run_version"] = version
    if description is not None:
        message["description"] = description
    return message


def bound_text(text: str, *, limit: int, marker: str = "\n... [{n} characters cut] ...\n") -> str:
    """Keep a log field under ``limit`` characters: its head and tail, with a marker.

    Consumers store these fields in database text columns, so they must be bounded;
    the head shows how the run started and the tail how it ended.
    """
    if limit <= 0 or len(text) <= limit:
        return text
    cut_marker = marker.format(n=len(text) - limit)
    keep = max(limit - len(cut_marker), 0)
    head = keep // 2
    tail = keep - head
    return text[:head] + cut_marker + (text[-tail:] if tail else "")


def encode(message: dict[str, Any]) -> bytes:
    """Serialise a message body for the wire."""
    return json.dumps(message, ensure_ascii=False, default=str).encode("utf-8")
