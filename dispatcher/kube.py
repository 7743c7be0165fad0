"""The one module that imports ``kubernetes``: a thin, typed shell over the API.

Responses are parsed as plain JSON dicts (``_preload_content=False``) because the
client's model deserialisation costs more CPU than the request itself at 10,000
Jobs. HTTP failures are mapped here to our own exceptions, chained with ``from``,
so callers decide on meaning (409 on create = already done; 409 on a Lease =
someone else holds it; 403 is never contention) without knowing the client. A 401
re-reads our credentials from disk and retries once: tokens rotate and expire.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3.exceptions
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

log = logging.getLogger(__name__)
T = TypeVar("T")
Obj = dict[str, Any]

# (connect, read) seconds: a frozen apiserver must not hang a worker forever.
REQUEST_TIMEOUT = (5.0, 30.0)


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AlreadyExists(KubeError):
    """409 on create: the object is there already (an earlier attempt made it)."""


class Conflict(KubeError):
    """409 on update: the resourceVersion moved; someone else changed it first."""


class NotFound(KubeError):
    """404."""


class Forbidden(KubeError):
    """403: RBAC says no. Never retried, never read as contention."""


class Invalid(KubeError):
    """422 (or 400): the object itself is wrong; retrying cannot help."""


class Unavailable(KubeError):
    """The API could not answer (connection refused, timeout, 429, 5xx): retry later."""


class Gone(KubeError):
    """410 on a watch: the resourceVersion is too old; re-list."""


class Unauthorized(Unavailable):
    """401: the API server rejected our credentials (an expired or rotated token).

    Raised by ``Kube`` only once re-reading the credentials did not help. It is an
    Unavailable because it means the same to every caller: the deployment, not the
    message, is at fault, so messages stay in the broker and readiness goes false
    until valid credentials are in place (the kubelet rewrites a projected token).
    """


def _map_api_exception(error: ApiException, what: str) -> KubeError:
    return _map_status(error.status or 0, error.body, what)


def _map_status(status: int, payload: Any, what: str) -> KubeError:
    reason = ""
    detail = ""
    try:
        body = json.loads(payload or "{}")
        reason = body.get("reason", "")
        detail = body.get("message", "")
    except (ValueError, AttributeError, TypeError):
        detail = str(payload)[:300]
    if status == 401:
        return Unauthorized(
            f"{what}: API server rejected our credentials (401) {detail}".rstrip(), status=401
        )
    message = f"{what}: {status} {detail}"
    if status == 409:
        return (
            AlreadyExists(message, status=409)
            if reason == "AlreadyExists"
            else Conflict(message, status=409)
        )
    kinds: dict[int, type[KubeError]] = {
        400: Invalid,
        403: Forbidden,
        404: NotFound,
        410: Gone,
        422: Invalid,
        429: Unavailable,
    }
    if status in kinds:
        return kinds[status](message, status=status)
    if status >= 500 or status == 0:
        return Unavailable(message, status=status)
    return KubeError(message, status=status)


class RateLimiter:
    """Token bucket: ``qps`` sustained, ``burst`` at once (client-side API budget)."""

    def __init__(self, *, qps: float, burst: int) -> None:
        self._rate = qps
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self._capacity, self._tokens + (now - self._last) * self._rate)
                self._last = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                wait = (1 - self._tokens) / self._rate
            time.sleep(wait)


@dataclass(frozen=True)
class Credentials:
    """Where our credentials are read from, so that a 401 can read them again."""

    source: str  # for the log: the kubeconfig, or the in-cluster token file
    load: Callable[[], client.Configuration]  # reads them from disk on each call


def _configuration(kubeconfig: Path | None) -> client.Configuration:
    """Credentials as they are on disk now: in-cluster when ``kubeconfig`` is None."""
    configuration = client.Configuration()
    if kubeconfig is None:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        # A kubeconfig's tokenFile is read here, once: re-loading is how it is re-read.
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
    # Enough pooled connections for the dispatch workers, the watch and probes.
    configuration.connection_pool_maxsize = 32
    # No hidden urllib3 retries: a failed call surfaces at once as Unavailable and
    # our callers retry (the message stays unacked). With urllib3's default 3
    # retries a frozen apiserver held a worker 4 x 30 s per call, and a readiness
    # probe outlived its own timeout (found by tests/faults).
    configuration.retries = False
    return configuration


def _identity(configuration: client.Configuration) -> tuple[Any, ...]:
    """What a request authenticates with: equal means re-reading changed nothing."""
    c = configuration
    return (c.host, sorted(c.api_key.items()), sorted(c.api_key_prefix.items()),
            c.cert_file, c.key_file, c.ssl_ca_cert, c.username, c.password)  # fmt: skip


def _credentials_for(kubeconfig: Path | None) -> Credentials:
    """In-cluster (the token file the kubelet rewrites) or the kubeconfig (and any
    tokenFile it names): read when connecting, and again on a 401."""
    source = str(kubeconfig) if kubeconfig is not None else "the in-cluster token file"
    return Credentials(source=source, load=lambda: _configuration(kubeconfig))


@dataclass(frozen=True)
class _Request:
    what: str  # for messages: "create Job red-wish-..."
    method: str
    path: str
    query: dict[str, Any]
    body: Any
    content_type: str
    timeout: tuple[float, float]


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    obj: Obj


class Kube:
    """Namespaced calls used by the dispatcher. Every call is rate limited and mapped.

    Requests go through the client's own transport (auth, TLS, proxies from the
    kubeconfig) but as raw JSON on explicit paths: the generated models would
    validate and rebuild every object for nothing.
    """

    def __init__(
        self,
        *,
        api_client: client.ApiClient,
        namespace: str,
        limiter: RateLimiter,
        credentials: Credentials | None = None,
    ) -> None:
        self._api = api_client
        self._credentials = credentials  # None: nothing to re-read on a 401
        self._renew_lock = threading.Lock()
        self._rejected = False  # the last 401 outlived a re-read (logged once)
        self.namespace = namespace
        self._limiter = limiter
        ns = namespace
        self._jobs = f"/apis/batch/v1/namespaces/{ns}/jobs"
        self._config_maps = f"/api/v1/namespaces/{ns}/configmaps"
        self._leases = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
        self._pods = f"/api/v1/namespaces/{ns}/pods"
        self._events = f"/apis/events.k8s.io/v1/namespaces/{ns}/events"

    @classmethod
    def connect(cls, *, kubeconfig: Path | None, namespace: str, qps: float, burst: int) -> Kube:
        """In-cluster credentials when running in a pod, else the given kubeconfig."""
        credentials = _credentials_for(kubeconfig)
        return cls(
            api_client=client.ApiClient(credentials.load()),
            namespace=namespace,
            limiter=RateLimiter(qps=qps, burst=burst),
            credentials=credentials,
        )

    # -- plumbing ------------------------------------------------------------------

    def _send(
        self,
        what: str,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> Any:
        """One HTTP exchange; returns the raw urllib3 response (status checked)."""
        request = _Request(what=what, method=method, path=path, query=query or {}, body=body,
                           content_type=content_type, timeout=timeout)  # fmt: skip
        try:
            response = self._authenticated(request)
        except Unauthorized as error:
            self._note_rejected(error)
            raise
        if self._rejected:
            self._rejected = False
            log.info("API server accepts our credentials again (%s)", self._source())
        return response

    def _authenticated(self, request: _Request) -> Any:
        """The exchange; after a 401, once more if the credentials on disk changed
        (a rotated token). A 401 with the credentials as they are now raises."""
        api = self._api
        try:
            return self._exchange(api, request)
        except Unauthorized:
            renewed = self._renew(used=api)
            if renewed is None:
                raise
            return self._exchange(renewed, request)

    def _renew(self, *, used: client.ApiClient) -> client.ApiClient | None:
        """A client with the credentials now on disk; None when they are the ones
        ``used`` was refused with (asking again with them would be refused again)."""
        with self._renew_lock:
            if self._api is not used:
                return self._api  # another thread renewed since our request left
            if self._credentials is None:
                return None
            try:
                fresh = self._credentials.load()
            except (config.ConfigException, OSError, ValueError, yaml.YAMLError) as error:
                # Say, a kubeconfig caught half-written: keep what we have.
                log.warning("could not re-read credentials (%s): %s", self._source(), error)
                return None
            if _identity(fresh) == _identity(used.configuration):
                return None
            # A new client rather than a new header on the old one: a rotated client
            # certificate needs new connections, and a watch streaming on the old
            # client's pool finishes undisturbed.
            self._api = client.ApiClient(fresh)
            log.info("re-read our credentials (%s) after a 401", self._source())
            return self._api

    def _source(self) -> str:
        return self._credentials.source if self._credentials else "no source to re-read"

    def _note_rejected(self, error: Unauthorized) -> None:
        """Say it once per outage: every retrying caller would repeat it."""
        if self._rejected:
            return
        self._rejected = True
        log.error(
            "API server rejected our credentials (401), also after re-reading them (%s): "
            "the API counts as unavailable (messages stay in the broker, readiness is "
            "false) until valid credentials are there; each 401 re-reads them. %s",
            self._source(), error,
        )  # fmt: skip

    def _exchange(self, api: client.ApiClient, request: _Request) -> Any:
        self._limiter.acquire()
        what = request.what
        headers = {"Accept": "application/json", "Content-Type": request.content_type}
        params = [(k, v) for k, v in request.query.items() if v is not None]
        try:
            method, url, headers, payload, _ = api.param_serialize(
                method=request.method,
                resource_path=request.path,
                query_params=params,
                header_params=headers,
                body=request.body,
                auth_settings=["BearerToken"],
            )
            response = api.call_api(
                method, url, header_params=headers, body=payload, _request_timeout=request.timeout
            )
        except ApiException as error:
            raise _map_api_exception(error, what) from error
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"{what}: API unreachable: {error}") from error
        if not 200 <= response.status < 300:
            raise _map_status(response.status, response.read(), what)  # type: ignore[no-untyped-call]
        return response

    def _call(self, what: str, method: str, path: str, **kwargs: Any) -> Obj:
        response = self._send(what, method, path, **kwargs)
        try:
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"{what}: connection lost reading the answer: {error}") from error
        return json.loads(data) if data else {}

    # -- jobs ----------------------------------------------------------------------

    def create_job(self, body: Obj) -> Obj:
        return self._call(f"create Job {body['metadata']['name']}", "POST", self._jobs, body=body)

    def dry_run_job(self, body: Obj) -> Obj:
        """Server-side dry run: the API validates the Job without storing it."""
        return self._call("dry-run Job", "POST", self._jobs, body=body, query={"dryRun": "All"})

    def get_job(self, name: str) -> Obj | None:
        try:
            return self._call(f"get Job {name}", "GET", f"{self._jobs}/{name}")
        except NotFound:
            return None

    def list_jobs(
        self, *, selector: str, keep: Callable[[Obj], Obj] | None = None, page_size: int = 500
    ) -> tuple[list[Obj], str]:
        """All matching Jobs and the list's resourceVersion (to start a watch from).

        ``keep`` trims each Job as its page arrives: with 10,000 Jobs the whole list
        of full objects (pod templates, managedFields) is hundreds of MB at once, and
        Python keeps that high-water mark as resident memory.
        """
        items: list[Obj] = []
        token: str | None = None
        while True:
            page = self._call(
                "list Jobs",
                "GET",
                self._jobs,
                query={"labelSelector": selector, "limit": page_size, "continue": token},
            )
            got = page.get("items") or []
            items.extend(got if keep is None else (keep(job) for job in got))
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items, str((page.get("metadata") or {}).get("resourceVersion", ""))

    def watch_jobs(
        self, *, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        """Events after ``resource_version``; raises Gone when it is too old."""
        return self._watch("Jobs", self._jobs, selector=selector,
                           resource_version=resource_version, timeout_s=timeout_s)

    def watch_pods(
        self, *, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        """Pod events after ``resource_version``; raises Gone when it is too old."""
        return self._watch("Pods", self._pods, selector=selector,
                           resource_version=resource_version, timeout_s=timeout_s)

    def _watch(
        self, kind: str, path: str, *, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        response = self._send(
            f"watch {kind}",
            "GET",
            path,
            query={
                "labelSelector": selector,
                "watch": "true",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": timeout_s,
            },
            timeout=(REQUEST_TIMEOUT[0], timeout_s + 15.0),
        )
        try:
            for line in iter_resp_lines(response.response):  # type: ignore[no-untyped-call]
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    if status.get("code") == 410:
                        raise Gone(f"watch {kind}: resourceVersion too old", status=410)
                    raise Unavailable(f"watch {kind}: {status.get('message', status)}")
                yield WatchEvent(kind=event["type"], obj=event["object"])
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"watch {kind}: connection lost: {error}") from error
        finally:
            response.release_conn() if hasattr(response, "release_conn") else None

    def _patch(self, what: str, path: str, patch: Obj) -> Obj:
        return self._call(
            what, "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    def set_suspend(self, name: str, *, suspend: bool) -> Obj:
        patch: Obj = {"spec": {"suspend": suspend}}
        return self._patch(f"set suspend={suspend} on Job {name}", f"{self._jobs}/{name}", patch)

    def annotate_job(
        self, name: str, annotations: dict[str, str | None], resource_version: str | None = None
    ) -> Obj:
        patch: Obj = {"metadata": {"annotations": annotations}}
        if resource_version:
            patch["metadata"]["resourceVersion"] = resource_version
        return self._patch(f"annotate Job {name}", f"{self._jobs}/{name}", patch)

    def delete_job(
        self,
        name: str,
        *,
        propagation: str = "Background",
        grace_s: int | None = None,
        uid: str | None = None,
    ) -> None:
        body: Obj = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if grace_s is not None:
            body["gracePeriodSeconds"] = grace_s
        if uid:
            body["preconditions"] = {"uid": uid}
        with contextlib.suppress(NotFound):
            self._call(f"delete Job {name}", "DELETE", f"{self._jobs}/{name}", body=body)

    # -- config maps ---------------------------------------------------------------

    def create_config_map(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        return self._call(f"create ConfigMap {name}", "POST", self._config_maps, body=body)

    def get_config_map(self, name: str) -> Obj | None:
        try:
            return self._call(f"get ConfigMap {name}", "GET", f"{self._config_maps}/{name}")
        except NotFound:
            return None

    # -- leases --------------------------------------------------------------------

    def get_lease(self, name: str) -> Obj | None:
        try:
            return self._call(f"get Lease {name}", "GET", f"{self._leases}/{name}")
        except NotFound:
            return None

    def create_lease(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        return self._call(f"create Lease {name}", "POST", self._leases, body=body)

    def replace_lease(self, body: Obj) -> Obj:
        """Compare-and-swap: body carries the resourceVersion it was read at."""
        name = body["metadata"]["name"]
        return self._call(f"update Lease {name}", "PUT", f"{self._leases}/{name}", body=body)

    def delete_lease(self, name: str, *, resource_version: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"resourceVersion": resource_version},
        }
        self._call(f"delete Lease {name}", "DELETE", f"{self._leases}/{name}", body=body)

    def list_leases(self, *, selector: str) -> list[Obj]:
        page = self._call("list Leases", "GET", self._leases, query={"labelSelector": selector})
        return page.get("items") or []

    # -- pods ----------------------------------------------------------------------

    def list_pods(self, *, selector: str) -> list[Obj]:
        return self.list_pods_at(selector=selector)[0]

    def list_pods_at(self, *, selector: str) -> tuple[list[Obj], str]:
        """Matching Pods and the list's resourceVersion (to start a watch from)."""
        page = self._call("list Pods", "GET", self._pods, query={"labelSelector": selector})
        return page.get("items") or [], str((page.get("metadata") or {}).get("resourceVersion", ""))

    def remove_pod_finalizer(self, name: str, *, finalizer: str) -> None:
        """Drop one finalizer of a Pod (a strategic-merge delete: no read, no conflict)."""
        patch = {"metadata": {"$deleteFromPrimitiveList/finalizers": [finalizer]}}
        with contextlib.suppress(NotFound):
            self._call(f"release Pod {name}", "PATCH", f"{self._pods}/{name}", body=patch,
                       content_type="application/strategic-merge-patch+json")

    def pod_log_tail(self, name: str, *, container: str, lines: int) -> str:
        response = self._send(
            f"log of Pod {name}",
            "GET",
            f"{self._pods}/{name}/log",
            query={"container": container, "tailLines": lines},
        )
        try:
            return bytes(response.read()).decode("utf-8", errors="replace")
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"log of Pod {name}: {error}") from error

    # -- events --------------------------------------------------------------------

    def record_event(self, *, job: Obj, reason: str, note: str, warning: bool = False) -> None:
        """An Event on the Job, so `kubectl describe job` tells what we decided."""
        meta = job.get("metadata", {})
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                # Named as kubectl's recorder does (<object>.<unique>): a generateName
                # ending in "." is not a valid prefix and the API refuses the Event.
                "name": f"{meta.get('name', 'job')}.{uuid.uuid4().hex[:16]}",
                "namespace": self.namespace,
            },
            "eventTime": now,
            "reportingController": "autoreduce.io/dispatcher",
            "reportingInstance": "dispatcher",
            "action": reason,
            "reason": reason,
            "note": note[:1000],
            "type": "Warning" if warning else "Normal",
            "regarding": {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": meta.get("name"),
                "namespace": self.namespace,
                "uid": meta.get("uid"),
            },
        }
        try:
            self._call("create Event", "POST", self._events, body=body)
        except KubeError as error:  # an Event is commentary: never fail the run for it
            log.debug("event not recorded: %s", error)

    # -- health --------------------------------------------------------------------

    def healthy(self) -> bool:
        try:
            self._send("readyz", "GET", "/readyz", timeout=(1.0, 1.5))
        except KubeError:
            return False
        return True
