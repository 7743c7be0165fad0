"""The objects we write: Jobs, the ConfigMaps they own, and Leases (compare-and-swap).

Each class is one kind's calls on one namespace's collection, over ``Kube``'s
transport; ``Kube`` holds one of each and forwards its public calls to them, which is
where the defaults of those calls are stated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from dispatcher.kube.errors import NotFound
from dispatcher.kube.paging import list_all
from dispatcher.kube.transport import Obj, Transport
from dispatcher.kube.watch import WatchEvent, watch


class Jobs:
    def __init__(self, transport: Transport, namespace: str) -> None:
        self._t = transport
        self._path = f"/apis/batch/v1/namespaces/{namespace}/jobs"

    def create_job(self, body: Obj) -> Obj:
        return self._t._call(f"create Job {body['metadata']['name']}", "POST", self._path,
                             body=body)  # fmt: skip

    def dry_run_job(self, body: Obj) -> Obj:
        return self._t._call("dry-run Job", "POST", self._path, body=body,
                             query={"dryRun": "All"})  # fmt: skip

    def get_job(self, name: str) -> Obj | None:
        try:
            return self._t._call(f"get Job {name}", "GET", f"{self._path}/{name}")
        except NotFound:
            return None

    def list_jobs(
        self, *, selector: str, keep: Callable[[Obj], Obj] | None, page_size: int
    ) -> tuple[list[Obj], str]:
        def fetch(token: str | None) -> bytes:
            query = {"labelSelector": selector, "limit": page_size, "continue": token}
            return self._t._call_raw("list Jobs", "GET", self._path, query=query)

        return list_all(fetch, keep=keep)

    def watch_jobs(
        self, *, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        return watch(self._t, "Jobs", self._path, selector=selector,
                     resource_version=resource_version, timeout_s=timeout_s)  # fmt: skip

    def _patch(self, what: str, path: str, patch: Obj) -> Obj:
        return self._t._call(
            what, "PATCH", path, body=patch, content_type="application/merge-patch+json"
        )

    def set_suspend(self, name: str, *, suspend: bool) -> Obj:
        patch: Obj = {"spec": {"suspend": suspend}}
        return self._patch(f"set suspend={suspend} on Job {name}", f"{self._path}/{name}", patch)

    def annotate_job(
        self, name: str, annotations: dict[str, str | None], resource_version: str | None
    ) -> Obj:
        patch: Obj = {"metadata": {"annotations": annotations}}
        if resource_version:
            patch["metadata"]["resourceVersion"] = resource_version
        return self._patch(f"annotate Job {name}", f"{self._path}/{name}", patch)

    def delete_job(
        self, name: str, *, propagation: str, grace_s: int | None, uid: str | None
    ) -> None:
        body: Obj = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        if grace_s is not None:
            body["gracePeriodSeconds"] = grace_s
        if uid:
            body["preconditions"] = {"uid": uid}
        with contextlib.suppress(NotFound):
            self._t._call(f"delete Job {name}", "DELETE", f"{self._path}/{name}", body=body)


class ConfigMaps:
    def __init__(self, transport: Transport, namespace: str) -> None:
        self._t = transport
        self._path = f"/api/v1/namespaces/{namespace}/configmaps"

    def create_config_map(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        return self._t._call(f"create ConfigMap {name}", "POST", self._path, body=body)

    def get_config_map(self, name: str) -> Obj | None:
        try:
            return self._t._call(f"get ConfigMap {name}", "GET", f"{self._path}/{name}")
        except NotFound:
            return None


class Leases:
    def __init__(self, transport: Transport, namespace: str) -> None:
        self._t = transport
        self._path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    def get_lease(self, name: str) -> Obj | None:
        try:
            return self._t._call(f"get Lease {name}", "GET", f"{self._path}/{name}")
        except NotFound:
            return None

    def create_lease(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        return self._t._call(f"create Lease {name}", "POST", self._path, body=body)

    def replace_lease(self, body: Obj) -> Obj:
        name = body["metadata"]["name"]
        return self._t._call(f"update Lease {name}", "PUT", f"{self._path}/{name}", body=body)

    def delete_lease(self, name: str, *, resource_version: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"resourceVersion": resource_version},
        }
        self._t._call(f"delete Lease {name}", "DELETE", f"{self._path}/{name}", body=body)

    def list_leases(self, *, selector: str) -> list[Obj]:
        page = self._t._call("list Leases", "GET", self._path, query={"labelSelector": selector})
        return page.get("items") or []
