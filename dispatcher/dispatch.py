"""Turning one pending-queue message into durable cluster state.

``handle`` returns ACK only when the run is safely in the cluster (its Job exists,
carrying its message or with the ConfigMap of a large one), was cancelled, or was
dead-lettered with a reason; it raises ``TryLater`` when the API or broker is away,
and the message stays unacked.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import jinja2
from autoreduce_common.messages import MessageError, Outcome, ReductionMessage, parse_run
from autoreduce_common.stomp_client import BrokerError

from dispatcher import voids
from dispatcher.cancels import Cancels
from dispatcher.config import DispatcherSettings
from dispatcher.controller import Controller
from dispatcher.direct import DirectAdmission, Grant
from dispatcher.identity import Labels, RunKey, job_name, run_key
from dispatcher.kube import AlreadyExists, Forbidden, Invalid, Kube, KubeError, Unavailable
from dispatcher.logs import run_logger
from dispatcher.manifests import (
    Arrival,
    TemplateError,
    carries_message,
    inline_message,
    message_size,
    owned_by,
    render_config_map,
    render_job,
)
from dispatcher.metrics import Metrics
from dispatcher.oom_retry import memory_from
from dispatcher.reporting import Reporter, error_body
from dispatcher.voidjobs import VoidTooYoung

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    ACK = "ack"


class TryLater(Exception):
    """Transient: leave the message unacked and try again (or let it be redelivered)."""


@dataclass(frozen=True)
class Received:
    body: bytes
    headers: Mapping[str, str]


def arrival_of(headers: Mapping[str, str]) -> Arrival:
    def number(key: str, default: int) -> int:
        try:
            return int(headers.get(key, default))
        except (TypeError, ValueError):
            return default

    return Arrival(
        priority=min(max(number("priority", 4), 0), 9),
        enqueued_ms=number("timestamp", int(time.time() * 1000)),
        message_id=str(headers.get("message-id", "")),
        attempt=max(number("autoreduce-attempt", 1), 1),
        memory=memory_from(headers),
    )


class Dispatcher:
    def __init__(
        self,
        *,
        settings: DispatcherSettings,
        kube: Kube,
        controller: Controller,
        reporter: Reporter,
        template: jinja2.Template,
        metrics: Metrics | None = None,
        direct: DirectAdmission | None = None,
    ) -> None:
        self.settings = settings
        self.kube = kube
        self.controller = controller
        self.direct = direct
        self.reporter = reporter
        self.template = template
        self.labels = Labels(settings.jobs.label_prefix)
        self.metrics = metrics if metrics is not None else Metrics()
        self.cancels = Cancels(settings=settings, kube=kube, controller=controller,
                               reporter=reporter, template=template, metrics=self.metrics)

    # -- entry point ---------------------------------------------------------------

    def handle(self, received: Received) -> Verdict:
        verdict = self._handle(received)
        # Counted once settled (TryLater raised above): received adds up to
        # accepted + duplicate + rejected + cancel requests + cancelled before dispatch.
        self.metrics.received.inc()
        return verdict

    def _handle(self, received: Received) -> Verdict:
        try:
            raw, message = parse_run(received.body)
        except MessageError as error:
            return self._reject(received, error.reason, raw=error.raw)
        if message.cancel and not (message.instrument and message.rb_number):
            return self._reject(
                received, "cancel message needs instrument, rb_number and run_number", raw=raw
            )
        try:
            if message.cancel:
                self.cancels.cancel(raw, message)
                return Verdict.ACK
            return self._accept(received, raw, message)
        except (Unavailable, Forbidden, BrokerError) as error:
            # Forbidden is an RBAC fault of the deployment, not of the message:
            # keep the message until an operator fixes it. So is a 401 that re-read
            # credentials did not cure (Unauthorized, an Unavailable): keep it too.
            raise TryLater(str(error)) from error
        except (Invalid, TemplateError) as error:
            return self._reject(received, f"the cluster refused the run's Job: {error}", raw=raw)
        except VoidTooYoung as void:
            raise TryLater(str(void)) from None

    # -- runs ----------------------------------------------------------------------

    def _accept(
        self, received: Received, raw: dict[str, Any], message: ReductionMessage
    ) -> Verdict:
        key = run_key(message)
        size = message_size(raw)
        if size > self.settings.max_message_bytes:
            return self._reject(
                received,
                f"message is {size} bytes; a run's message (with its script) may be at most "
                f"{self.settings.max_message_bytes} bytes (Kubernetes ConfigMap limit)",
                raw=raw,
            )
        started = time.monotonic()
        grant = self.direct.claim(key) if self.direct is not None else None
        try:
            job = self._ensure_job(key, arrival_of(received.headers), grant,
                                   inline_message(self.settings, raw))
            if self.cancels.is_marker(job):
                self.cancels.drop_cancelled(key, raw, job)
                return Verdict.ACK
            if not carries_message(self.labels, job):
                self._ensure_config_map(key, raw, job)
            if grant is not None and self.direct is not None:
                self.direct.stored()
        finally:
            if grant is not None and self.direct is not None:
                self.direct.done(grant)
        self.controller.observe(job)
        self.controller.enqueue(key.rb_number)
        self.metrics.dispatch_latency.observe(time.monotonic() - started)
        run_logger(log, key).info("accepted %s as Job %s", key.describe(), job_name(key))
        return Verdict.ACK

    def _ensure_job(self, key: RunKey, arrival: Arrival, grant: Grant | None,
                    message: str | None) -> dict[str, Any]:
        """The run's Job: created running when ``grant`` (its RB's Lease) allows, else
        suspended; or the one already there (a redelivery, a cancel marker). It carries
        ``message`` when that is not None."""
        manifest = render_job(
            settings=self.settings, template=self.template, key=key, arrival=arrival,
            message=message,
        )
        running = grant is not None and self.direct is not None and self.direct.in_window(grant)
        if running:
            manifest["spec"]["suspend"] = False
        try:
            job = self._create_job(manifest, grant)
        except AlreadyExists:
            # A redelivery (or a duplicate): the run is already in the cluster.
            existing = self.kube.get_job(job_name(key))
            if existing is None:
                raise TryLater(f"Job {job_name(key)} exists and vanished; retrying") from None
            if grant is not None and self.direct is not None and (
                    voids.is_void(self.labels, existing) or self.cancels.is_marker(existing)):
                self.direct.release(grant)  # its Job will never run under this Lease
            if voids.is_void(self.labels, existing):
                self.controller.voids.clear(existing)
                return self._ensure_job(key, arrival, None, message)
            if not self.cancels.is_marker(existing):
                self.metrics.duplicates.inc()
            return existing
        self.metrics.accepted.inc()
        if running and self.direct is not None:
            self.direct.created(job)
        return job

    def _create_job(self, manifest: dict[str, Any], grant: Grant | None) -> dict[str, Any]:
        try:
            return self.kube.create_job(manifest)
        except (Invalid, TemplateError):
            if grant is not None and self.direct is not None:
                self.direct.release(grant)
            raise

    def _ensure_config_map(self, key: RunKey, raw: dict[str, Any], job: dict[str, Any]) -> None:
        config_map = owned_by(
            render_config_map(settings=self.settings, key=key, raw=raw),
            job_uid=job["metadata"]["uid"],
            job=job_name(key),
        )
        with contextlib.suppress(AlreadyExists):
            self.kube.create_config_map(config_map)

    # -- cancellations -------------------------------------------------------------

    def park(self, received: Received, reason: str) -> Verdict:
        """Dead-letter a message we failed on repeatedly (TryLater if the broker is away)."""
        try:
            raw = parse_run(received.body)[0]
        except MessageError:
            raw = None
        verdict = self._reject(received, reason, raw=raw)
        self.metrics.received.inc()
        return verdict

    # -- rejects -------------------------------------------------------------------

    def _reject(self, received: Received, reason: str, *, raw: dict[str, Any] | None) -> Verdict:
        """Dead-letter with the reason; ReductionError too when the run is identifiable."""
        self.metrics.rejected.labels(reason=reason.split(":", maxsplit=1)[0][:60]).inc()
        try:
            self.reporter.dead_letter(
                body=received.body, headers=dict(received.headers), reason=reason
            )
            if raw is not None and _identifiable(raw):
                # A redelivery of the same broker message is rejected the same way.
                self.reporter.post(
                    Outcome.ERROR, error_body(raw, message=reason),
                    outcome_id=f"rejected-{received.headers.get('message-id', '')}",
                    possible_repeat=bool(received.headers.get("redelivered") == "true"))
                self.metrics.outcome_posted(Outcome.ERROR.value, "Rejected")
        except BrokerError as error:
            raise TryLater(f"could not dead-letter: {error}") from error
        return Verdict.ACK


def _identifiable(raw: dict[str, Any]) -> bool:
    """Consumers find a run by its run number (and instrument); without it, no error post."""
    return raw.get("run_number") not in (None, "", []) and bool(raw.get("instrument"))


__all__ = ["Dispatcher", "KubeError", "Received", "TryLater", "Verdict"]
