"""An in-memory fake of our own ``dispatcher.kube.Kube`` boundary, for unit tests.

It keeps Jobs, ConfigMaps and Leases by name with a resourceVersion, and answers the
way ``dispatcher.kube`` maps the API's statuses: 409 on create is ``AlreadyExists``,
a stale resourceVersion is ``Conflict``, a missing object is ``NotFound`` (or None on
a get). It records every write, so a test can count writes per run. ``before`` lets a
test run code at the moment a named call is made (a race, played out in order).
It fakes our boundary, never the kubernetes client.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dispatcher.kube import AlreadyExists, Conflict, NotFound

Obj = dict[str, Any]


class FakeKube:
    namespace = "ns"

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], Obj] = {}
        self.writes: list[tuple[str, str]] = []  # (verb + kind, name)
        self.lists: list[str] = []  # the selectors of every Job list
        self.events: list[tuple[str, str, str]] = []  # (job, reason, note)
        self.before: dict[str, Callable[[], None]] = {}  # "create Job" -> hook, run once
        self._versions = itertools.count(1)
        # creationTimestamp of new objects: now, as the apiserver would stamp them
        # (a fixed stamp made "a void made a moment ago" depend on the time of day).
        self.now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    # -- plumbing ------------------------------------------------------------------

    def _hook(self, call: str) -> None:
        hook = self.before.pop(call, None)
        if hook is not None:
            hook()

    def _create(self, kind: str, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        self._hook(f"create {kind}")
        if (kind, name) in self.objects:
            raise AlreadyExists(f"{kind} {name} exists", status=409)
        stored = copy.deepcopy(body)
        stored["metadata"].update(uid=f"uid-{kind}-{name}-{next(self._versions)}",
                                  resourceVersion=str(next(self._versions)),
                                  creationTimestamp=self.now)
        stored.setdefault("status", {})
        self.objects[(kind, name)] = stored
        self.writes.append((f"create {kind}", name))
        return copy.deepcopy(stored)

    def _get(self, kind: str, name: str) -> Obj | None:
        found = self.objects.get((kind, name))
        return copy.deepcopy(found) if found is not None else None

    def _stored(self, kind: str, name: str) -> Obj:
        found = self.objects.get((kind, name))
        if found is None:
            raise NotFound(f"{kind} {name} not found", status=404)
        return found

    def _bump(self, obj: Obj) -> Obj:
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        return copy.deepcopy(obj)

    def of_kind(self, kind: str) -> dict[str, Obj]:
        return {name: obj for (k, name), obj in self.objects.items() if k == kind}

    def write_count(self) -> int:
        return len(self.writes) + len(self.events)

    # -- Jobs ----------------------------------------------------------------------

    def create_job(self, body: Obj) -> Obj:
        return self._create("Job", body)

    def get_job(self, name: str) -> Obj | None:
        return self._get("Job", name)

    def list_jobs(self, *, selector: str,
                  keep: Callable[[Obj], Obj] | None = None) -> tuple[list[Obj], str]:
        """Jobs matching an equality selector (``k=v,k2=v2``), and a resourceVersion."""
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        found = [copy.deepcopy(job) for job in self.of_kind("Job").values()
                 if all((job["metadata"].get("labels") or {}).get(k) == v
                        for k, v in wanted.items())]
        self.lists.append(selector)
        return [keep(job) for job in found] if keep else found, str(next(self._versions))

    def set_suspend(self, name: str, *, suspend: bool) -> Obj:
        job = self._stored("Job", name)
        job["spec"]["suspend"] = suspend
        self.writes.append(("patch Job", name))
        return self._bump(job)

    def annotate_job(self, name: str, annotations: dict[str, str | None],
                     resource_version: str | None = None) -> Obj:
        job = self._stored("Job", name)
        if resource_version is not None and resource_version != job["metadata"]["resourceVersion"]:
            raise Conflict(f"Job {name} changed", status=409)
        current = job["metadata"].setdefault("annotations", {})
        for key, value in annotations.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        self.writes.append(("patch Job", name))
        return self._bump(job)

    def delete_job(self, name: str, *, propagation: str = "Background",
                   grace_s: int | None = None, uid: str | None = None) -> None:
        job = self.objects.get(("Job", name))
        if job is None:
            return
        if uid is not None and job["metadata"]["uid"] != uid:
            raise Conflict(f"Job {name} has another uid", status=409)
        del self.objects[("Job", name)]
        self.writes.append(("delete Job", name))

    def finish(self, name: str, *, condition: str = "Complete") -> Obj:
        """What the Job controller does when the Job's pod ends (a test's stand-in)."""
        job = self._stored("Job", name)
        job["status"] = {"conditions": [{"type": condition, "status": "True"}]}
        return self._bump(job)

    # -- ConfigMaps ----------------------------------------------------------------

    def create_config_map(self, body: Obj) -> Obj:
        return self._create("ConfigMap", body)

    def get_config_map(self, name: str) -> Obj | None:
        return self._get("ConfigMap", name)

    # -- Leases --------------------------------------------------------------------

    def get_lease(self, name: str) -> Obj | None:
        self._hook("get Lease")
        return self._get("Lease", name)

    def create_lease(self, body: Obj) -> Obj:
        return self._create("Lease", body)

    def replace_lease(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        self._hook("update Lease")
        lease = self._stored("Lease", name)
        if body["metadata"].get("resourceVersion") != lease["metadata"]["resourceVersion"]:
            raise Conflict(f"Lease {name} changed", status=409)
        replaced = copy.deepcopy(body)
        replaced["metadata"]["uid"] = lease["metadata"]["uid"]
        self.objects[("Lease", name)] = replaced
        self.writes.append(("update Lease", name))
        return self._bump(replaced)

    def delete_lease(self, name: str, *, resource_version: str) -> None:
        lease = self._stored("Lease", name)
        if resource_version != lease["metadata"]["resourceVersion"]:
            raise Conflict(f"Lease {name} changed", status=409)
        del self.objects[("Lease", name)]
        self.writes.append(("delete Lease", name))

    # -- Pods (put there by a test, as the Job controller and kubelet would) ---------

    def add_pod(self, pod: Obj) -> None:
        self.objects[("Pod", pod["metadata"]["name"])] = copy.deepcopy(pod)

    def list_pods(self, *, selector: str) -> list[Obj]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        return [copy.deepcopy(pod) for pod in self.of_kind("Pod").values()
                if all((pod["metadata"].get("labels") or {}).get(k) == v
                       for k, v in wanted.items())]

    def remove_pod_finalizer(self, name: str, *, finalizer: str) -> None:
        pod = self.objects.get(("Pod", name))
        if pod is not None and finalizer in (pod["metadata"].get("finalizers") or []):
            pod["metadata"]["finalizers"].remove(finalizer)
            self.writes.append(("patch Pod", name))

    def pod_log_tail(self, name: str, *, container: str, lines: int) -> str:
        return ""

    # -- Events and health ---------------------------------------------------------

    def record_event(self, *, job: Obj, reason: str, note: str, warning: bool = False) -> None:
        self.events.append((job["metadata"]["name"], reason, note))

    def healthy(self) -> bool:
        return True
