"""``Kube``: the namespaced calls the dispatcher and the CLI make, in one class."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kubernetes import client

from dispatcher.kube.connection import Credentials, _credentials_for
from dispatcher.kube.errors import KubeError, Throttled
from dispatcher.kube.objects import ConfigMaps, Jobs, Leases
from dispatcher.kube.pacing import PaceObserver, Pacer
from dispatcher.kube.pods import Events, Pods
from dispatcher.kube.transport import Obj, Transport
from dispatcher.kube.watch import WatchEvent


class Kube(Transport):
    """Namespaced calls used by the dispatcher. Every call is rate limited and mapped.

    Assembled from per-concern helper objects rather than mixins: a Kube *is* the
    transport (``Transport``: credentials, the QPS budget, the 401 re-read, errors
    mapped) and *has* one helper per kind (``Jobs``, ``ConfigMaps``, ``Leases``,
    ``Pods``, ``Events``), each given this Kube as its transport. Every public call is
    spelled out here, forwarding, so the class body is the whole surface in one place:
    ``vars(Kube)`` lists what we may call (tests/unit/test_chart_render.py derives the
    operator's RBAC from it, which mixins would hide). The helpers call back into
    this object, so a profile still names the plumbing ``Kube._call``
    (bench/profiled.py watches it).
    """

    def __init__(
        self,
        *,
        api_client: client.ApiClient,
        namespace: str,
        pacer: Pacer,
        credentials: Credentials | None = None,
    ) -> None:
        super().__init__(api_client=api_client, pacer=pacer, credentials=credentials)
        self.namespace = namespace
        self._jobs = Jobs(self, namespace)
        self._config_maps = ConfigMaps(self, namespace)
        self._leases = Leases(self, namespace)
        self._pods = Pods(self, namespace)
        self._events = Events(self, namespace)

    @classmethod
    def connect(
        cls,
        *,
        kubeconfig: Path | None,
        namespace: str,
        qps: float | None = None,
        burst: int | None = None,
        observer: PaceObserver | None = None,
    ) -> Kube:
        """In-cluster credentials when running in a pod, else the given kubeconfig.

        ``qps``/``burst`` None: paced by the server when it runs APF (see ``pacing``)."""
        credentials = _credentials_for(kubeconfig)
        return cls(
            api_client=client.ApiClient(credentials.load()),
            namespace=namespace,
            pacer=Pacer(qps=qps, burst=burst, observer=observer),
            credentials=credentials,
        )

    # -- jobs ----------------------------------------------------------------------

    def create_job(self, body: Obj) -> Obj:
        return self._jobs.create_job(body)

    def dry_run_job(self, body: Obj) -> Obj:
        """Server-side dry run: the API validates the Job without storing it."""
        return self._jobs.dry_run_job(body)

    def get_job(self, name: str) -> Obj | None:
        return self._jobs.get_job(name)

    def list_jobs(
        self, *, selector: str, keep: Callable[[Obj], Obj] | None = None, page_size: int = 500
    ) -> tuple[list[Obj], str]:
        """All matching Jobs and the list's resourceVersion (to start a watch from).

        ``keep`` trims each Job as its page arrives: with 10,000 Jobs the whole list
        of full objects (pod templates, managedFields) is hundreds of MB at once, and
        Python keeps that high-water mark as resident memory.
        """
        return self._jobs.list_jobs(selector=selector, keep=keep, page_size=page_size)

    def watch_jobs(
        self, *, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        """Events after ``resource_version``; raises Gone when it is too old."""
        return self._jobs.watch_jobs(selector=selector, resource_version=resource_version,
                                     timeout_s=timeout_s)  # fmt: skip

    def set_suspend(self, name: str, *, suspend: bool) -> Obj:
        return self._jobs.set_suspend(name, suspend=suspend)

    def annotate_job(
        self, name: str, annotations: dict[str, str | None], resource_version: str | None = None
    ) -> Obj:
        return self._jobs.annotate_job(name, annotations, resource_version)

    def delete_job(
        self,
        name: str,
        *,
        propagation: str = "Background",
        grace_s: int | None = None,
        uid: str | None = None,
    ) -> None:
        self._jobs.delete_job(name, propagation=propagation, grace_s=grace_s, uid=uid)

    # -- config maps ---------------------------------------------------------------

    def create_config_map(self, body: Obj) -> Obj:
        return self._config_maps.create_config_map(body)

    def get_config_map(self, name: str) -> Obj | None:
        return self._config_maps.get_config_map(name)

    # -- leases --------------------------------------------------------------------

    def get_lease(self, name: str) -> Obj | None:
        return self._leases.get_lease(name)

    def create_lease(self, body: Obj) -> Obj:
        return self._leases.create_lease(body)

    def replace_lease(self, body: Obj) -> Obj:
        """Compare-and-swap: body carries the resourceVersion it was read at."""
        return self._leases.replace_lease(body)

    def delete_lease(self, name: str, *, resource_version: str) -> None:
        self._leases.delete_lease(name, resource_version=resource_version)

    def list_leases(self, *, selector: str) -> list[Obj]:
        return self._leases.list_leases(selector=selector)

    # -- pods ----------------------------------------------------------------------

    def list_pods(self, *, selector: str) -> list[Obj]:
        return self.list_pods_at(selector=selector)[0]

    def list_pods_at(
        self, *, selector: str, keep: Callable[[Obj], Any] | None = None
    ) -> tuple[list[Any], str]:
        """Matching Pods (each through ``keep`` as its page arrives) and the list's
        resourceVersion (to start a watch from)."""
        return self._pods.list_pods_at(selector=selector, keep=keep)

    def watch_pods(
        self, *, selector: str, resource_version: str, timeout_s: int
    ) -> Iterator[WatchEvent]:
        """Pod events after ``resource_version``; raises Gone when it is too old."""
        return self._pods.watch_pods(selector=selector, resource_version=resource_version,
                                     timeout_s=timeout_s)  # fmt: skip

    def remove_pod_finalizer(self, name: str, *, finalizer: str) -> None:
        """Drop one finalizer of a Pod (a strategic-merge delete: no read, no conflict)."""
        self._pods.remove_pod_finalizer(name, finalizer=finalizer)

    def pod_log_tail(self, name: str, *, container: str, lines: int) -> str:
        return self._pods.pod_log_tail(name, container=container, lines=lines)

    # -- events --------------------------------------------------------------------

    def record_event(self, *, job: Obj, reason: str, note: str, warning: bool = False) -> None:
        """An Event on the Job, so `kubectl describe job` tells what we decided."""
        self._events.record_event(job=job, reason=reason, note=note, warning=warning)

    def list_events(self, *, regarding: str | None = None, reason: str | None = None) -> list[Obj]:
        """The Events about one object (a Job or a Pod), or of one reason (in no order)."""
        return self._events.list_events(regarding=regarding, reason=reason)

    # -- health --------------------------------------------------------------------

    def healthy(self) -> bool:
        """The apiserver answers now. Unpaced: a readiness probe held behind a throttling
        spell's wait would time out; and a 429 is an answer (busy, not unreachable)."""
        try:
            self._send("readyz", "GET", "/readyz", timeout=(1.0, 1.5), paced=False)
        except Throttled:
            return True
        except KubeError:
            return False
        return True
