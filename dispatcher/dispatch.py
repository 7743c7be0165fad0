"""Turning one pending-queue message into durable cluster state.

``handle`` returns ACK only when the run is safely in the cluster (its Job and
ConfigMap exist), was cancelled, or was dead-lettered with a reason; it raises
``TryLater`` when the API or broker is away, and the message stays unacked.
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

from dispatcher import admission, failures, voids
from dispatcher.config import DispatcherSettings
from dispatcher.controller import Controller
from dispatcher.direct import DirectAdmission, Grant
from dispatcher.identity import Labels, RunKey, job_name, run_key
from dispatcher.kube import AlreadyExists, Forbidden, Invalid, Kube, KubeError, Unavailable
from dispatcher.logs import run_logger
from dispatcher.manifests import (
    Arrival,
    TemplateError,
    message_of,
    message_size,
    owned_by,
    render_config_map,
    render_job,
)
from dispatcher.metrics import Metrics
from dispatcher.oom_retry import memory_from
from dispatcher.outcome_state import OUTCOME_KEY, VERDICT_KEY, OutcomeState, state_of
from dispatcher.reporting import Reporter, error_body

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    ACK = "ack"


class TryLater(Exception):
    """Transient: leave the message unacked and try again (or let it be redelivered)."""


class _Void(Exception):
    """The run's name is taken by a void too young to delete (``dispatcher.voids``)."""


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

    # -- entry point ---------------------------------------------------------------

    def handle(self, received: Received) -> Verdict:
        verdict = self._handle(received)
        # Counted once settled (TryLater raised above): received adds up to
        # accepted + duplicate + rejected + cancel requests + cancelled before dispatch.
        self.metrics.received.inc()
        return verdict

    def _count_outcome(self, reason: str) -> None:
        """A ReductionError we posted for a run (the lifecycle counts its own)."""
        self.metrics.outcomes.labels(kind=Outcome.ERROR.value, reason=reason).inc()

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
                return self._cancel(raw, message)
            return self._accept(received, raw, message)
        except (Unavailable, Forbidden, BrokerError) as error:
            # Forbidden is an RBAC fault of the deployment, not of the message:
            # keep the message until an operator fixes it. So is a 401 that re-read
            # credentials did not cure (Unauthorized, an Unavailable): keep it too.
            raise TryLater(str(error)) from error
        except (Invalid, TemplateError) as error:
            return self._reject(received, f"the cluster refused the run's Job: {error}", raw=raw)
        except _Void as void:
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
            job = self._ensure_job(key, arrival_of(received.headers), grant)
            if self._is_cancel_marker(job):
                self._drop_cancelled(key, raw, job)
                return Verdict.ACK
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

    def _ensure_job(self, key: RunKey, arrival: Arrival, grant: Grant | None) -> dict[str, Any]:
        """The run's Job: created running when ``grant`` (its RB's Lease) allows, else
        suspended; or the one already there (a redelivery, a cancel marker)."""
        manifest = render_job(
            settings=self.settings, template=self.template, key=key, arrival=arrival
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
                    voids.is_void(self.labels, existing) or self._is_cancel_marker(existing)):
                self.direct.release(grant)  # its Job will never run under this Lease
            if voids.is_void(self.labels, existing):
                self._clear_void(existing)
                return self._ensure_job(key, arrival, None)
            if not self._is_cancel_marker(existing):
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

    def _clear_void(self, void: dict[str, Any]) -> None:
        """Delete the void under the run's name once no late create can meet the gap
        (``voids.VOID_DELETABLE_AFTER_S``); until then the message waits in the broker."""
        name = admission.name_of(void)
        wait = voids.delete_wait(void, now=time.time())
        if wait > 0:
            raise _Void(f"Job {name} is a void made {voids.VOID_DELETABLE_AFTER_S - wait:.0f} s "
                        f"ago; its run is stored once it is {voids.VOID_DELETABLE_AFTER_S:.0f} s "
                        "old")
        self.kube.delete_job(name, uid=(void.get("metadata") or {}).get("uid"))
        log.info("deleted the void %s: its run arrived again and is stored, waiting", name)

    def _ensure_config_map(self, key: RunKey, raw: dict[str, Any], job: dict[str, Any]) -> None:
        config_map = owned_by(
            render_config_map(settings=self.settings, key=key, raw=raw),
            job_uid=job["metadata"]["uid"],
            job=job_name(key),
        )
        with contextlib.suppress(AlreadyExists):
            self.kube.create_config_map(config_map)

    # -- cancellations -------------------------------------------------------------

    def _is_cancel_marker(self, job: dict[str, Any]) -> bool:
        labels = (job.get("metadata") or {}).get("labels") or {}
        return labels.get(self.labels.key("cancel")) == "true"

    def _drop_cancelled(self, key: RunKey, raw: dict[str, Any], marker: dict[str, Any]) -> None:
        """The run arrived after its cancellation: report it once, never run it.

        The marker stays (annotated) so a redelivery or a resend of the run is
        dropped too instead of running; it is a suspended Job, so it costs nothing.
        """
        outcome_key = self.labels.key(OUTCOME_KEY)
        annotations = (marker.get("metadata") or {}).get("annotations") or {}
        if annotations.get(outcome_key) == OutcomeState.CANCELLED:
            run_logger(log, key).info("dropped %s again: it was cancelled", key.describe())
            return
        self.reporter.post(
            Outcome.ERROR, error_body(raw, message="Run cancelled before it was dispatched"),
            outcome_id=job_name(key), possible_repeat=annotations.get(outcome_key) is not None,
        )
        self.kube.annotate_job(job_name(key), {outcome_key: OutcomeState.CANCELLED})
        self.metrics.dropped.inc()
        self._count_outcome("CancelledBeforeDispatch")
        run_logger(log, key).info("dropped %s: it was cancelled before it arrived", key.describe())

    def _cancel(self, raw: dict[str, Any], message: ReductionMessage) -> Verdict:
        key = run_key(message)
        job = self.kube.get_job(job_name(key))
        if job is not None and voids.is_void(self.labels, job):
            # The run is not in the cluster, but a void has its name: deleting the void
            # early would let a late create run it (dispatcher.voids), so the cancel
            # waits in the broker until the void may go, and is then remembered.
            self._clear_void(job)
            job = None
        self.metrics.cancels.inc()
        if job is None:
            self._remember_cancel(key)
            return Verdict.ACK
        if self._is_cancel_marker(job):
            run_logger(log, key).info("cancel for %s already remembered", key.describe())
            return Verdict.ACK
        if admission.is_finished(job) or admission.is_deleting(job):
            run_logger(log, key).info("cancel for %s ignored: it already finished", key.describe())
            return Verdict.ACK
        running = not admission.is_suspended(job)
        name = job_name(key)
        state = state_of(((job.get("metadata") or {}).get("annotations") or {}).get(
            self.labels.key(OUTCOME_KEY)))
        if running and self.controller.pods.of_job(name):
            # Its runner may be about to post (or posting) its own outcome: stop the
            # pods first; the outcome path settles it from the runner's record once they
            # have stopped, so a run never gets both a Complete and "cancelled".
            if state is None:
                self.kube.annotate_job(name, {self.labels.key(OUTCOME_KEY):
                                              OutcomeState.CANCELLING})
                self.kube.record_event(job=job, reason="Cancelled",
                                       note="Run cancelled while reducing: stopping its pod")
        elif state not in (OutcomeState.CANCELLED, OutcomeState.CANCELLING):
            self._post_cancelled(key, job, raw, state=state, running=running)
        self.kube.delete_job(name, propagation="Foreground" if running else "Background",
                             grace_s=30)
        self.controller.enqueue(key.rb_number)
        run_logger(log, key).info(
            "cancelled %s (%s)", key.describe(), "running" if running else "waiting"
        )
        return Verdict.ACK

    def _post_cancelled(self, key: RunKey, job: dict[str, Any], raw: dict[str, Any], *,
                        state: OutcomeState | None, running: bool) -> None:
        """A waiting run (or a running one whose pod does not exist yet): no runner can
        have posted, so the cancellation's error is the outcome."""
        note = "Run cancelled while reducing" if running else "Run cancelled while waiting"
        stored = message_of(self.kube.get_config_map(job_name(key)))
        run_raw = stored or {k: v for k, v in raw.items() if k != "cancel"}
        name, outcome_key = job_name(key), self.labels.key(OUTCOME_KEY)
        # Claim first so the outcome path never posts a second one; mark it posted only
        # after the broker confirmed the send.
        verdict = failures.Verdict(False, "Cancelled", note, transient=False)
        recorded = failures.render_verdict(verdict)
        self.kube.annotate_job(name, {outcome_key: OutcomeState.HANDLING,
                                      self.labels.key(VERDICT_KEY): recorded})
        self.reporter.post(Outcome.ERROR, error_body(run_raw, message=note), outcome_id=name,
                           possible_repeat=state is OutcomeState.HANDLING)
        self._count_outcome("Cancelled")
        self.kube.annotate_job(name, {outcome_key: OutcomeState.CANCELLED})
        self.kube.record_event(job=job, reason="Cancelled", note=note)

    def _remember_cancel(self, key: RunKey) -> None:
        """Park a cancellation for a run we have not seen, as a Job under the run's name.

        When the run arrives, its create answers 409 and the read that follows finds
        the marker: the happy path pays no extra read for cancellations that are rare.
        The marker has no managed label, so the controller never sees it as a run.
        """
        marker = render_job(
            settings=self.settings,
            template=self.template,
            key=key,
            arrival=Arrival(priority=0, enqueued_ms=int(time.time() * 1000), message_id=""),
        )
        metadata = marker["metadata"]
        metadata["labels"] = {
            **{k: v for k, v in metadata["labels"].items() if k != self.labels.managed},
            self.labels.key("cancel"): "true",
        }
        marker["spec"]["suspend"] = True  # never runs, whatever the template says
        with contextlib.suppress(AlreadyExists):
            self.kube.create_job(marker)
        log.info("cancel for unknown %s remembered", key.describe())

    def sweep_cancel_markers(self, *, now: float) -> int:
        """Delete cancel markers and voids older than ``jobs.cancel_marker_ttl_seconds``.

        Both are suspended, so the TTL controller never takes them; without this
        they pile up for ever. Each replica may sweep: the uid precondition and a
        404 make a second delete harmless. A void is never swept before it may be
        deleted at all (``voids.VOID_DELETABLE_AFTER_S``). Returns how many were deleted.
        """
        ttl = self.settings.jobs.cancel_marker_ttl_seconds
        if ttl <= 0:
            return 0
        deleted = 0
        for label, ttl_s in (("cancel", ttl), (voids.VOID_LABEL,
                                               max(ttl, voids.VOID_DELETABLE_AFTER_S))):
            found, _ = self.kube.list_jobs(selector=f"{self.labels.key(label)}=true")
            deleted += sum(self._sweep(job, kind=label, ttl_s=ttl_s)
                           for job in admission.expired(found, now=now, ttl_s=ttl_s))
        return deleted

    def _sweep(self, job: dict[str, Any], *, kind: str, ttl_s: float) -> bool:
        name = admission.name_of(job)
        uid = str((job.get("metadata") or {}).get("uid") or "") or None
        try:
            self.kube.delete_job(name, uid=uid)
        except KubeError as error:
            log.warning("%s Job %s not deleted (%s); next sweep retries", kind, name, error)
            return False
        log.info("%s Job %s expired after %d s: deleted", kind, name, ttl_s)
        return True

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
                self._count_outcome("Rejected")
        except BrokerError as error:
            raise TryLater(f"could not dead-letter: {error}") from error
        return Verdict.ACK


def _identifiable(raw: dict[str, Any]) -> bool:
    """Consumers find a run by its run number (and instrument); without it, no error post."""
    return raw.get("run_number") not in (None, "", []) and bool(raw.get("instrument"))


__all__ = ["Dispatcher", "KubeError", "Received", "TryLater", "Verdict"]
