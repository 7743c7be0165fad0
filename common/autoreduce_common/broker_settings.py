"""Typed broker settings shared by the dispatcher and the runner.

These are plain pydantic models; the process's top-level settings object embeds
them and is built once in ``main()`` (never at import time).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from autoreduce_common.messages import Outcome


class QueueNames(BaseModel):
    """Destinations of the contract; defaults are the legacy names."""

    pending: str = "/queue/ReductionPending"
    started: str = "/queue/ReductionStarted"
    complete: str = "/queue/ReductionComplete"
    error: str = "/queue/ReductionError"
    skipped: str = "/queue/ReductionSkipped"
    # Where messages that can never be processed go, with the reason in a header.
    dead_letter: str = "/queue/ReductionPending.DLQ"

    def outcome_queues(self) -> tuple[str, ...]:
        """The four queues outcomes go to (Started, Complete, Error, Skipped)."""
        return tuple(self.for_outcome(outcome) for outcome in Outcome)

    def for_outcome(self, outcome: Outcome) -> str:
        """The queue an outcome goes to, whoever sends it (runner or dispatcher)."""
        return {
            Outcome.STARTED: self.started,
            Outcome.COMPLETE: self.complete,
            Outcome.ERROR: self.error,
            Outcome.SKIPPED: self.skipped,
        }[outcome]


class TlsSettings(BaseModel):
    """TLS to the broker (ActiveMQ's ``stomp+ssl`` connector). The broker's certificate
    is always verified, hostname included: it must name each host as ``hosts`` writes
    it (a DNS or IP subjectAltName)."""

    enabled: bool = False
    # PEM bundle of the CA(s) that sign the broker's certificate; None: the system's.
    ca_file: Path | None = None
    # A client certificate (PEM) and its key, for a broker that asks for one
    # (``transport.needClientAuth=true``). A cert_file holding both needs no key_file.
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _check_pair(self) -> TlsSettings:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("tls.key_file is set but tls.cert_file is not")
        return self


class BrokerSettings(BaseModel):
    """How to reach ActiveMQ over STOMP."""

    # "host:port" entries tried in order on every (re)connect: failover.
    hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1:61613"])
    username: str = "admin"
    # The password itself, or a file holding it (a mounted Secret). The file wins.
    password: SecretStr = SecretStr("")
    password_file: Path | None = None
    # Heartbeats in ms (send, receive). 10 s notices a dead broker or a frozen
    # one (SIGSTOP) within ~15 s without chattering.
    heartbeat_ms: int = Field(default=10_000, ge=0)
    # Seconds to wait for a broker RECEIPT on a send before treating it as failed.
    receipt_timeout_s: float = Field(default=15.0, gt=0)
    # The same for outcome messages (runner and dispatcher) and dead letters, sent on
    # connections without heartbeats: longer than any broker stall to ride out, since
    # giving up on a RECEIPT the broker still owes means resending, i.e. a duplicate.
    outcome_receipt_timeout_s: float = Field(default=120.0, gt=0)
    # Reconnect backoff: first wait and ceiling, seconds.
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    queues: QueueNames = Field(default_factory=QueueNames)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one broker host:port is required")
        for entry in value:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"broker host must be host:port, got {entry!r}")
        return value

    @model_validator(mode="after")
    def _read_password_file(self) -> BrokerSettings:
        if self.password_file is not None:
            secret = self.password_file.read_text(encoding="utf-8").strip()
            object.__setattr__(self, "password", SecretStr(secret))
        return self

    def current_password(self) -> str:
        """The password now. A mounted Secret's file is read again on every (re)connect:
        after a rotation the kubelet replaces the file within a minute or two, and the
        next connection uses the new password without a restart. An unreadable file
        (mid-replacement, say) leaves the last password read."""
        if self.password_file is None:
            return self.password.get_secret_value()
        try:
            secret = self.password_file.read_text(encoding="utf-8").strip()
        except OSError:
            return self.password.get_secret_value()
        object.__setattr__(self, "password", SecretStr(secret))
        return secret

    def host_and_ports(self) -> list[tuple[str, int]]:
        pairs = []
        for entry in self.hosts:
            host, _, port = entry.rpartition(":")
            pairs.append((host, int(port)))
        return pairs
