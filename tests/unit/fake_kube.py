"""An in-memory fake of our own ``dispatcher.kube.Kube`` boundary, for unit tests of
the orchestration (never a stand-in for the Kubernetes API in an integration test).

It keeps Jobs, Leases, ConfigMaps and pods with resourceVersions, answers the calls
the daemon makes the way ``Kube`` maps the API's answers (``Conflict`` on a stale
resourceVersion, ``AlreadyExists`` on a second create, ``NotFound``), can be told to
fail the next calls of a method, and records every write.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from typing import Any

from dispatcher.kube import AlreadyExists, Conflict, KubeError, NotFound, WatchEvent

Obj = dict[str, Any]


def _matches(obj: Obj, selector: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, selector.split(",")):
        key, _, value = term.partition("=")
        if labels.get(key) != value:
            return False
    return True


class FakeKube:
    namespace = "ns"

    def __init__(self) -> None:
        self.jobs: dict[str, Obj] = {}
        self.leases: dict[str, Obj] = {}
        self.config_maps: dict[str, Obj] = {}
        self.pods: dict[str, Obj] = {}
        self.events: list[tuple[str, str, str]] = []  # (Job, reason, note)
        self.writes: list[tuple[str, str]] = []  # (verb, name)
        self.failures: dict[str, list[KubeError]] = {}  # method -> errors to raise next
        self.job_watch: list[Callable[[], Iterator[WatchEvent]]] = []  # scripted watches
        self._rv = itertools.count(1)

    # -- test controls -------------------------------------------------------------

    def fail_next(self, method: str, *errors: KubeError) -> None:
        self.failures.setdefault(method, []).extend(errors)

    def _maybe_fail(self, method: str) -> None:
        queued = self.failures.get(method)
        if queued:
            raise queued.pop(0)

    def _stamp(self, obj: Obj) -> Obj:
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        return obj

    def put_job(self, job: Obj) -> Obj:
        stored = copy.deepcopy(job)
        stored["metadata"].setdefault("uid", f"uid-{stored['metadata']['name']}")
        self.jobs[job["metadata"]["name"]] = self._stamp(stored)
        return copy.deepcopy(self.jobs[job["metadata"]["name"]])

    def put_pod(self, pod: Obj) -> Obj:
        self.pods[pod["metadata"]["name"]] = self._stamp(copy.deepcopy(pod))
        return copy.deepcopy(self.pods[pod["metadata"]["name"]])

    # -- Jobs ----------------------------------------------------------------------

    def create_job(self, body: Obj) -> Obj:
        self._maybe_fail("create_job")
        name = body["metadata"]["name"]
        if name in self.jobs:
            raise AlreadyExists(f"Job {name}", status=409)
        self.writes.append(("create Job", name))
        return self.put_job(body)

    def get_job(self, name: str) -> Obj | None:
        self._maybe_fail("get_job")
        return copy.deepcopy(self.jobs.get(name))

    def list_jobs(self, *, selector: str, keep: Callable[[Obj], Obj] | None = None,
                  page_size: int = 500) -> tuple[list[Obj], str]:
        self._maybe_fail("list_jobs")
        found = [copy.deepcopy(j) for j in self.jobs.values() if _matches(j, selector)]
        return [keep(j) if keep else j for j in found], str(next(self._rv))

    def watch_jobs(self, *, selector: str, resource_version: str,
                   timeout_s: int) -> Iterator[WatchEvent]:
        self._maybe_fail("watch_jobs")
        return self.job_watch.pop(0)() if self.job_watch else iter(())

    def set_suspend(self, name: str, *, suspend: bool) -> Obj:
        self._maybe_fail("set_suspend")
        job = self._job(name)
        job["spec"]["suspend"] = suspend
        self.writes.append(("unsuspend" if not suspend else "suspend", name))
        return copy.deepcopy(self._stamp(job))

    def annotate_job(self, name: str, annotations: dict[str, str | None],
                     resource_version: str | None = None) -> Obj:
        self._maybe_fail("annotate_job")
        job = self._job(name)
        if resource_version and job["metadata"]["resourceVersion"] != resource_version:
            raise Conflict(f"Job {name}", status=409)
        current = job["metadata"].setdefault("annotations", {})
        for key, value in annotations.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        self.writes.append(("annotate Job", name))
        return copy.deepcopy(self._stamp(job))

    def delete_job(self, name: str, *, propagation: str = "Background",
                   uid: str | None = None, grace_s: int | None = None) -> None:
        self._maybe_fail("delete_job")
        self.writes.append(("delete Job", name))
        self.jobs.pop(name, None)

    def _job(self, name: str) -> Obj:
        if name not in self.jobs:
            raise NotFound(f"Job {name}", status=404)
        return self.jobs[name]

    # -- ConfigMaps, Leases ----------------------------------------------------------

    def create_config_map(self, body: Obj) -> Obj:
        self._maybe_fail("create_config_map")
        name = body["metadata"]["name"]
        if name in self.config_maps:
            raise AlreadyExists(f"ConfigMap {name}", status=409)
        self.writes.append(("create ConfigMap", name))
        self.config_maps[name] = self._stamp(copy.deepcopy(body))
        return copy.deepcopy(self.config_maps[name])

    def get_config_map(self, name: str) -> Obj | None:
        self._maybe_fail("get_config_map")
        return copy.deepcopy(self.config_maps.get(name))

    def get_lease(self, name: str) -> Obj | None:
        self._maybe_fail("get_lease")
        return copy.deepcopy(self.leases.get(name))

    def create_lease(self, body: Obj) -> Obj:
        self._maybe_fail("create_lease")
        name = body["metadata"]["name"]
        if name in self.leases:
            raise AlreadyExists(f"Lease {name}", status=409)
        self.writes.append(("create Lease", name))
        self.leases[name] = self._stamp(copy.deepcopy(body))
        return copy.deepcopy(self.leases[name])

    def replace_lease(self, body: Obj) -> Obj:
        self._maybe_fail("replace_lease")
        name = body["metadata"]["name"]
        known = self.leases.get(name)
        if known is None:
            raise NotFound(f"Lease {name}", status=404)
        if body["metadata"].get("resourceVersion") != known["metadata"]["resourceVersion"]:
            raise Conflict(f"Lease {name}", status=409)
        self.writes.append(("replace Lease", name))
        self.leases[name] = self._stamp(copy.deepcopy(body))
        return copy.deepcopy(self.leases[name])

    def delete_lease(self, name: str, *, resource_version: str) -> None:
        self._maybe_fail("delete_lease")
        known = self.leases.get(name)
        if known is None:
            raise NotFound(f"Lease {name}", status=404)
        if known["metadata"]["resourceVersion"] != resource_version:
            raise Conflict(f"Lease {name}", status=409)
        self.writes.append(("delete Lease", name))
        del self.leases[name]

    # -- pods, Events ----------------------------------------------------------------

    def list_pods(self, *, selector: str) -> list[Obj]:
        return self.list_pods_at(selector=selector)[0]

    def list_pods_at(self, *, selector: str) -> tuple[list[Obj], str]:
        self._maybe_fail("list_pods")
        return ([copy.deepcopy(p) for p in self.pods.values() if _matches(p, selector)],
                str(next(self._rv)))

    def watch_pods(self, *, selector: str, resource_version: str,
                   timeout_s: int) -> Iterator[WatchEvent]:
        return iter(())

    def remove_pod_finalizer(self, name: str, *, finalizer: str) -> None:
        self._maybe_fail("remove_pod_finalizer")
        pod = self.pods.get(name)
        if pod is not None:
            finalizers = pod["metadata"].get("finalizers") or []
            pod["metadata"]["finalizers"] = [f for f in finalizers if f != finalizer]
            self.writes.append(("release Pod", name))

    def pod_log_tail(self, name: str, *, container: str, lines: int) -> str:
        return ""

    def record_event(self, *, job: Obj, reason: str, note: str, warning: bool = False) -> None:
        self.events.append((job["metadata"]["name"], reason, note))

    def healthy(self) -> bool:
        return True
