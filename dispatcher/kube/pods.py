"""What we read of Pods (lists, watches, log tails), their finalizer, and our Events."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import urllib3.exceptions

from dispatcher.kube.errors import KubeError, NotFound, Unavailable
from dispatcher.kube.paging import list_all
from dispatcher.kube.transport import Obj, Transport
from dispatcher.kube.watch import WatchEvent, watch

# One logger for the whole boundary, named "dispatcher.kube" as before it was a package.
log = logging.getLogger(__package__)


class Pods:
    def __init__(self, transport: Transport, namespace: str) -> None:
        self._t = transport
        self._path = f"/api/v1/namespaces/{namespace}/pods"

    def list_pods_at(
        self, *, selector: str, keep: Callable[[Obj], Any] | None = None, page_size: int = 500
    ) -> tuple[list[Any], str]:
        def fetch(token: str | None) -> bytes:
            query = {"labelSelector": selector, "limit": page_size, "continue": token}
            return self._t._call_raw("list Pods", "GET", self._path, query=query)

        return list_all(fetch, keep=keep)

    def watch_pods(
        self, *, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        return watch(self._t, "Pods", self._path, selector=selector,
                     resource_version=resource_version, timeout_s=timeout_s)  # fmt: skip

    def remove_pod_finalizer(self, name: str, *, finalizer: str) -> None:
        patch = {"metadata": {"$deleteFromPrimitiveList/finalizers": [finalizer]}}
        with contextlib.suppress(NotFound):
            self._t._call(f"release Pod {name}", "PATCH", f"{self._path}/{name}", body=patch,
                          content_type="application/strategic-merge-patch+json")  # fmt: skip

    def pod_log_tail(self, name: str, *, container: str, lines: int) -> str:
        response = self._t._send(
            f"log of Pod {name}",
            "GET",
            f"{self._path}/{name}/log",
            query={"container": container, "tailLines": lines},
        )
        try:
            return bytes(response.read()).decode("utf-8", errors="replace")
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise Unavailable(f"log of Pod {name}: {error}") from error


class Events:
    def __init__(self, transport: Transport, namespace: str) -> None:
        self._t = transport
        self._namespace = namespace
        self._path = f"/apis/events.k8s.io/v1/namespaces/{namespace}/events"

    def record_event(self, *, job: Obj, reason: str, note: str, warning: bool) -> None:
        meta = job.get("metadata", {})
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                # Named as kubectl's recorder does (<object>.<unique>): a generateName
                # ending in "." is not a valid prefix and the API refuses the Event.
                "name": f"{meta.get('name', 'job')}.{uuid.uuid4().hex[:16]}",
                "namespace": self._namespace,
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
                "namespace": self._namespace,
                "uid": meta.get("uid"),
            },
        }
        try:
            self._t._call("create Event", "POST", self._path, body=body)
        except KubeError as error:  # an Event is commentary: never fail the run for it
            log.debug("event not recorded: %s", error)

    def list_events(self, *, regarding: str | None = None, reason: str | None = None) -> list[Obj]:
        """The Events about the object named ``regarding`` (any kind), or with this
        ``reason``, as the API holds them: the events.k8s.io view, which carries the
        kubelet's, the scheduler's and the cluster autoscaler's core Events too."""
        fields = [f"{key}={value}" for key, value in (("regarding.name", regarding),
                                                       ("reason", reason)) if value]
        page = self._t._call(f"list Events ({', '.join(fields)})", "GET", self._path,
                             query={"fieldSelector": ",".join(fields)})
        return list(page.get("items") or [])
