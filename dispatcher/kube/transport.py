"""One HTTP exchange with the API: paced, authenticated, failures mapped.

Requests go through the client's own transport (auth, TLS, proxies from the
kubeconfig) but as raw JSON on explicit paths (``_preload_content=False``): the
generated models' deserialisation costs more CPU than the request itself at 10,000
Jobs. A 401 re-reads our credentials from disk and retries once: tokens rotate and
expire. A 429 is waited out and sent again (``pacing``): the server refused it unexecuted.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import pydantic_core
import urllib3.exceptions
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dispatcher.kube.connection import Credentials, _identity
from dispatcher.kube.errors import (
    Throttled,
    Unauthorized,
    Unavailable,
    _map_api_exception,
    _map_status,
)
from dispatcher.kube.pacing import MAX_THROTTLED_S, Pacer

# One logger for the whole boundary, named "dispatcher.kube" as before it was a package.
log = logging.getLogger(__package__)
Obj = dict[str, Any]

# (connect, read) seconds: a frozen apiserver must not hang a worker forever.
REQUEST_TIMEOUT = (5.0, 30.0)


def decode(data: bytes | str) -> Any:
    """JSON from the API server.

    pydantic_core's parser (installed with pydantic) with its string cache: the keys
    and repeated values of thousands of cached Jobs share one string object each,
    which cut a cached Job from 3.8 to 2.7 KB. On our pages, trimmed
    (``dispatcher.kube.trim``), it decodes as fast as ``json``; on untrimmed ones it
    was slower.
    """
    return pydantic_core.from_json(data, cache_strings="all")


@dataclass(frozen=True)
class _Request:
    what: str  # for messages: "create Job red-wish-..."
    method: str
    path: str
    query: dict[str, Any]
    body: Any
    content_type: str
    timeout: tuple[float, float]
    paced: bool  # False: the API's health, asked now (a probe must not queue behind a 429)


class Transport:
    """The plumbing under every ``Kube`` call: ``_send`` (the raw response) and
    ``_call`` (its JSON). ``Kube`` is one; the per-kind calls are given it."""

    def __init__(
        self,
        *,
        api_client: client.ApiClient,
        pacer: Pacer,
        credentials: Credentials | None,
    ) -> None:
        self._api = api_client
        self._credentials = credentials  # None: nothing to re-read on a 401
        self._renew_lock = threading.Lock()
        self._rejected = False  # the last 401 outlived a re-read (logged once)
        self.pacer = pacer

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
        paced: bool = True,
    ) -> Any:
        """One HTTP exchange; returns the raw urllib3 response (status checked)."""
        request = _Request(what=what, method=method, path=path, query=query or {}, body=body,
                           content_type=content_type, timeout=timeout, paced=paced)  # fmt: skip
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
        """``_once``, paced; a 429 waited out and sent again for up to MAX_THROTTLED_S."""
        throttled_s = 0.0
        attempt = 0
        while True:
            if request.paced:
                self.pacer.wait()
            try:
                return self._once(api, request)
            except Throttled as error:
                if not request.paced:
                    raise
                if throttled_s >= MAX_THROTTLED_S:
                    raise Unavailable(f"{request.what}: throttled by the API server (429) for "
                                      f"{throttled_s:.0f} s: {error}", status=429) from error
                throttled_s += self.pacer.throttled(
                    what=request.what, retry_after=error.retry_after_s, attempt=attempt)
                attempt += 1

    def _once(self, api: client.ApiClient, request: _Request) -> Any:
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
            raise _map_status(response.status, response.read(), what,  # type: ignore[no-untyped-call]
                              retry_after=response.headers.get("Retry-After"))  # fmt: skip
        self.pacer.answered(response.headers)
        return response

    def _call(self, what: str, method: str, path: str, **kwargs: Any) -> Obj:
        data = self._call_raw(what, method, path, **kwargs)
        return decode(data) if data else {}

    def _call_raw(self, what: str, method: str, path: str, **kwargs: Any) -> bytes:
        """The answer's body, not decoded."""
        response = self._send(what, method, path, **kwargs)
        try:
            return bytes(response.read())
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"{what}: connection lost reading the answer: {error}") from error
