"""Direct admission and voids over a fake of our own Kube boundary (no stack).

The real ``Dispatcher``, ``Controller`` and ``DirectAdmission`` run; ``FakeKube`` keeps
objects with resourceVersions and answers 409s the way ``dispatcher.kube`` maps them.
Races are played out in a fixed order with its ``before`` hooks. The real-stack proof
(every crash point between the writes, on the real apiserver and node) is in
``tests/faults/test_fault_points.py``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from autoreduce_common.broker_settings import QueueNames

from dispatcher import voids
from dispatcher.admission import Caps, is_suspended
from dispatcher.config import DispatcherSettings
from dispatcher.controller import Controller
from dispatcher.direct import DirectAdmission
from dispatcher.dispatch import Dispatcher, Received, TryLater, Verdict
from dispatcher.identity import Labels, RunKey, job_name, lease_name
from dispatcher.kube import Invalid
from dispatcher.kube.pacing import MAX_THROTTLED_S
from dispatcher.leases import holder_of
from dispatcher.manifests import load_template
from dispatcher.reporting import Reporter
from tests.harness.fake_kube import FakeKube

RB = "1234567"
LABELS = Labels("autoreduce.io")


def message(run: int, *, rb: str = RB) -> Received:
    body = {
        "data": f"/isis/NDXWISH/WISH{run:08d}.nxs", "facility": "ISIS", "instrument": "WISH",
        "rb_number": int(rb), "run_number": run, "run_version": 0, "reduction_script": "x",
        "reduction_arguments": {}, "started_by": 0,
    }  # fmt: skip
    return Received(body=json.dumps(body).encode(), headers={"message-id": f"ID:{run}"})


def name(run: int, *, rb: str = RB) -> str:
    return job_name(RunKey("ISIS", "WISH", (run,), 0, rb))


class NoBroker:
    connected = True

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def send(self, *, destination: str, body: bytes, **_: Any) -> None:
        self.sent.append((destination, body))


class Node:
    """One dispatcher replica over the shared fake API."""

    def __init__(self, kube: FakeKube, *, caps: Caps | None = None, direct: bool = True,
                 inline_bytes: int = 16_384) -> None:
        settings = DispatcherSettings.model_validate(
            {"direct_admission": direct, "jobs": {"inline_message_max_bytes": inline_bytes}})
        self.controller = Controller(kube=kube, labels=LABELS, identity="test",  # type: ignore[arg-type]
                                     caps=caps or Caps(None, {}), resync_seconds=300)  # fmt: skip
        self.controller.cache.synced.set()  # as after its first list: nothing there yet
        self.controller.pods.synced.set()
        self.dispatcher = Dispatcher(
            settings=settings, kube=kube, controller=self.controller,  # type: ignore[arg-type]
            reporter=Reporter(client=NoBroker(), queues=QueueNames()),  # type: ignore[arg-type]
            template=load_template(settings.jobs.template_path),
            direct=DirectAdmission(controller=self.controller, enabled=settings.direct_admission),
        )  # fmt: skip

    def handle(self, received: Received) -> Verdict:
        return self.dispatcher.handle(received)

    def reconcile(self) -> None:
        self.controller.reconcile(RB)

    def see(self, kube: FakeKube) -> None:
        """What its Job watch would deliver: every run Job as the API has it."""
        for job in kube.of_kind("Job").values():
            if (job["metadata"].get("labels") or {}).get(LABELS.managed) == "true":
                self.controller.cache.upsert(job)


def lease(kube: FakeKube) -> dict[str, Any]:
    return kube.of_kind("Lease")[lease_name(RB)]


def test_a_run_whose_rb_is_free_costs_three_writes_and_no_unsuspend() -> None:
    kube = FakeKube()
    node = Node(kube)
    assert node.handle(message(1)) is Verdict.ACK
    node.controller.waiting_events.start()
    node.controller.waiting_events.stop()  # writes what it queued, then ends
    # The message travels in the Job: no ConfigMap.
    assert kube.writes == [("create Lease", lease_name(RB)), ("create Job", name(1))]
    assert [(job, reason) for job, reason, _ in kube.events] == [(name(1), "Admitted")]
    assert kube.write_count() == 3
    assert kube.get_job(name(1))["spec"]["suspend"] is False  # type: ignore[index]
    assert holder_of(lease(kube)) == name(1)
    assert voids.is_direct(LABELS, lease(kube))
    node.reconcile()  # the controller agrees: nothing to do
    assert len(kube.writes) == 2


def test_a_message_too_large_for_its_job_costs_a_configmap_more() -> None:
    kube = FakeKube()
    node = Node(kube, inline_bytes=0)
    assert node.handle(message(1)) is Verdict.ACK
    node.controller.waiting_events.start()
    node.controller.waiting_events.stop()
    assert kube.writes == [("create Lease", lease_name(RB)), ("create Job", name(1)),
                           ("create ConfigMap", name(1))]
    assert kube.write_count() == 4
    node.handle(message(2))  # a waiting one too
    assert kube.writes[3:] == [("create Job", name(2)), ("create ConfigMap", name(2))]


def test_a_run_that_arrives_while_its_rb_reduces_waits_suspended_without_a_lease_write() -> None:
    kube = FakeKube()
    node = Node(kube)
    node.handle(message(1))
    node.handle(message(2))
    assert kube.writes[2:] == [("create Job", name(2))]
    assert is_suspended(kube.get_job(name(2)))  # type: ignore[arg-type]
    # When run 1 ends, the suspended path hands the RB on: Lease CAS, then unsuspend.
    kube.finish(name(1))
    node.see(kube)
    node.reconcile()
    assert kube.writes[3:] == [("update Lease", lease_name(RB)), ("patch Job", name(2))]
    assert holder_of(lease(kube)) == name(2)


def test_the_next_run_after_a_finished_one_is_direct_again_by_lease_cas() -> None:
    kube = FakeKube()
    node = Node(kube)
    node.handle(message(1))
    kube.finish(name(1))
    node.see(kube)
    node.handle(message(2))
    assert kube.writes[2:] == [("update Lease", lease_name(RB)), ("create Job", name(2))]
    assert kube.get_job(name(2))["spec"]["suspend"] is False  # type: ignore[index]


def test_caps_or_the_switch_keep_the_suspended_path() -> None:
    for node_of in (lambda k: Node(k, caps=Caps(5, {})), lambda k: Node(k, direct=False)):
        kube = FakeKube()
        node_of(kube).handle(message(1))
        assert kube.writes == [("create Job", name(1))]
        assert is_suspended(kube.get_job(name(1)))  # type: ignore[arg-type]


def old_direct_lease(kube: FakeKube, holder: str) -> None:
    """A replica took the RB for ``holder`` directly and died before creating it."""
    grant = Node(kube).controller.leases.grant(rb=RB, job=holder, base=None, direct=True)
    assert grant is not None
    kube.objects[("Lease", lease_name(RB))]["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"
    kube.writes.clear()


def test_a_lease_naming_a_job_never_created_is_voided_before_it_moves() -> None:
    kube = FakeKube()
    old_direct_lease(kube, name(1))
    other = Node(kube)
    other.handle(message(2))  # the RB is not free (the Lease is held): suspended
    other.reconcile()
    assert kube.writes == [("create Job", name(2)),
                           ("create Job", name(1)), ("update Lease", lease_name(RB)),
                           ("patch Job", name(2))]
    assert voids.is_void(LABELS, kube.get_job(name(1)))
    assert is_suspended(kube.get_job(name(1)))  # type: ignore[arg-type]
    assert holder_of(lease(kube)) == name(2)


def test_a_late_create_meets_the_void_and_never_runs_beside_the_new_holder() -> None:
    """The run's dispatcher sends its running create after another replica voided its
    name and moved the Lease: the create is refused, and the run waits its turn."""
    kube = FakeKube()
    old_direct_lease(kube, name(1))
    other = Node(kube)
    other.handle(message(2))
    other.reconcile()
    late = Node(kube)
    with pytest.raises(TryLater, match="is a void made"):
        late.handle(message(1))  # a void younger than VOID_DELETABLE_AFTER_S stays
    running = [n for n, job in kube.of_kind("Job").items()
               if not is_suspended(job) and not voids.is_void(LABELS, job)]
    assert running == [name(2)]
    # Once the void is old enough the run is stored, suspended, behind run 2.
    kube.objects[("Job", name(1))]["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    assert late.handle(message(1)) is Verdict.ACK
    assert is_suspended(kube.get_job(name(1)))  # type: ignore[arg-type]
    assert not voids.is_void(LABELS, kube.get_job(name(1)))
    assert holder_of(lease(kube)) == name(2)


def test_when_the_runs_own_create_wins_the_race_the_void_is_refused_and_the_lease_stays() -> None:
    """Another replica reads the Lease and misses the Job; the run's own create lands
    just before that replica's void: the void is refused and the Lease stays."""
    kube = FakeKube()
    old_direct_lease(kube, name(1))
    creator, other = Node(kube), Node(kube)
    other.handle(message(2))  # another run of the RB, waiting on the other replica
    kube.before["create Job"] = lambda: creator.handle(message(1))  # lands first
    other.reconcile()
    assert not voids.is_void(LABELS, kube.get_job(name(1)))
    assert kube.get_job(name(1))["spec"]["suspend"] is False  # type: ignore[index]
    assert holder_of(lease(kube)) == name(1)
    assert is_suspended(kube.get_job(name(2)))  # type: ignore[arg-type]
    other.reconcile()  # and on every later pass: run 2 waits for run 1
    assert is_suspended(kube.get_job(name(2)))  # type: ignore[arg-type]


def test_a_young_direct_lease_is_left_alone_and_looked_at_again_later() -> None:
    kube = FakeKube()
    node = Node(kube)
    node.controller.leases.grant(rb=RB, job=name(1), base=None, direct=True)
    kube.writes.clear()
    node.handle(message(2))
    node.reconcile()
    assert kube.writes == [("create Job", name(2))]
    assert voids.reclaim_wait(lease(kube), now=time.time()) > 0


def test_a_redelivery_after_a_crash_between_lease_and_job_finds_its_own_lease() -> None:
    kube = FakeKube()
    Node(kube).controller.leases.grant(rb=RB, job=name(1), base=None, direct=True)
    kube.writes.clear()
    successor = Node(kube)
    assert successor.handle(message(1)) is Verdict.ACK
    assert kube.writes == [("create Job", name(1))]
    assert kube.get_job(name(1))["spec"]["suspend"] is False  # type: ignore[index]


def test_a_run_the_cluster_refuses_gives_its_lease_back() -> None:
    kube = FakeKube()
    node = Node(kube)
    def refuse(body: dict[str, Any]) -> dict[str, Any]:
        raise Invalid("Job is invalid", status=422)

    kube.create_job = refuse  # type: ignore[method-assign]
    node.dispatcher.reporter.dead_letter = lambda **_: None  # type: ignore[method-assign]
    assert node.handle(message(1)) is Verdict.ACK  # dead-lettered with the reason
    assert kube.writes == [("create Lease", lease_name(RB)), ("delete Lease", lease_name(RB))]
    assert not kube.of_kind("Lease")


def test_void_timings_hold_their_margins() -> None:
    assert voids.VOID_DELETABLE_AFTER_S >= (voids.DIRECT_WINDOW_S + voids.CREATE_IN_FLIGHT_MAX_S
                                            + voids.MAX_CLOCK_SKEW_S)
    assert voids.CREATE_IN_FLIGHT_MAX_S >= MAX_THROTTLED_S + 60  # + apiserver request timeout
    stale = {"spec": {"renewTime": "not a time"}}
    assert voids.reclaim_wait(stale, now=time.time()) == voids.RECLAIM_AFTER_S


def test_the_marker_sweep_deletes_voids_only_once_no_late_create_can_land() -> None:
    kube = FakeKube()
    old_direct_lease(kube, name(1))
    node = Node(kube)
    node.handle(message(2))
    node.reconcile()
    assert voids.is_void(LABELS, kube.get_job(name(1)))
    created = voids.delete_wait(kube.get_job(name(1)) or {}, now=0.0)  # its stamp, in seconds
    made_at = created - voids.VOID_DELETABLE_AFTER_S
    node.dispatcher.settings.jobs.cancel_marker_ttl_seconds = 1  # a site's tiny TTL
    cancels = node.dispatcher.cancels
    assert cancels.sweep_markers(now=made_at + 60) == 0
    assert cancels.sweep_markers(now=made_at + voids.VOID_DELETABLE_AFTER_S + 1) == 1
    assert kube.get_job(name(1)) is None
    assert kube.get_job(name(2)) is not None  # the run itself is never swept


def test_a_duplicate_of_a_finished_run_takes_no_lease() -> None:
    kube = FakeKube()
    node = Node(kube)
    node.handle(message(1))
    kube.finish(name(1))
    node.see(kube)
    kube.writes.clear()
    assert node.handle(message(1)) is Verdict.ACK
    assert kube.writes == []  # its create answered 409; the ConfigMap is there too


def test_a_cancelled_direct_holder_keeps_its_rb_until_it_is_gone_and_voided() -> None:
    """A Job being deleted still exists, but once gone its name could be created
    again: the Lease moves only after a void has taken that name."""
    kube = FakeKube()
    node = Node(kube)
    node.handle(message(1))
    node.handle(message(2))
    kube.objects[("Lease", lease_name(RB))]["spec"]["renewTime"] = "2020-01-01T00:00:00Z"
    kube.objects[("Job", name(1))]["metadata"]["deletionTimestamp"] = "2026-12-07T08:00:01Z"
    node.see(kube)
    kube.writes.clear()
    node.reconcile()
    assert kube.writes == []  # deleting: not yet
    kube.delete_job(name(1))
    node.controller.cache.remove(name(1))
    kube.writes.clear()
    node.reconcile()  # all its known Jobs wait: it tries a Lease create, refused
    node.reconcile()  # and reads the Lease on the next pass
    assert kube.writes == [("create Job", name(1)), ("update Lease", lease_name(RB)),
                           ("patch Job", name(2))]
    assert voids.is_void(LABELS, kube.get_job(name(1)))


def test_a_short_job_ttl_turns_direct_admission_off() -> None:
    assert voids.direct_allowed(ttl_seconds_after_finished=86_400)
    assert not voids.direct_allowed(ttl_seconds_after_finished=60)


def test_a_cancel_for_a_voided_run_waits_for_the_void_then_is_remembered() -> None:
    kube = FakeKube()
    old_direct_lease(kube, name(1))
    node = Node(kube)
    node.handle(message(2))
    node.reconcile()  # voids run 1's name
    body = json.loads(message(1).body)
    cancel = Received(body=json.dumps({**body, "cancel": True}).encode(),
                      headers={"message-id": "ID:cancel"})
    with pytest.raises(TryLater, match="is a void made"):
        node.handle(cancel)  # never deleted young, never "cancelled while waiting"
    assert voids.is_void(LABELS, kube.get_job(name(1)))
    assert node.dispatcher.reporter.client.sent == []  # type: ignore[attr-defined]
    kube.objects[("Job", name(1))]["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    assert node.handle(cancel) is Verdict.ACK
    marker = kube.get_job(name(1))
    assert marker is not None and not voids.is_void(LABELS, marker)
    assert (marker["metadata"]["labels"] or {}).get(LABELS.key("cancel")) == "true"


def work_the_queue(node: Node) -> set[str]:
    """What the admission workers would do: reconcile every queued RB; which were."""
    worked = set()
    while (rb := node.controller.queue.get(timeout=0.1)) is not None:
        worked.add(rb)
        node.controller.reconcile(rb)
        node.controller.queue.done(rb)
    return worked


def test_before_the_first_job_list_a_free_rb_is_admitted_from_the_apis_view_of_it() -> None:
    # A restart at 50,000 waiting runs: the Job list takes many seconds, and the
    # dispatcher consumes meanwhile. Its cache is empty, so each arriving run's RB is
    # read from the API (one list by label) before its Lease is taken.
    kube = FakeKube()
    Node(kube).handle(message(1, rb="7000001"))  # an earlier life: RB 7000001 reduces
    restarted = Node(kube)
    restarted.controller.cache.synced.clear()  # its first list is still being read
    assert restarted.handle(message(2, rb="7000001")) is Verdict.ACK
    assert is_suspended(kube.get_job(name(2, rb="7000001")))  # type: ignore[arg-type]
    assert restarted.handle(message(3)) is Verdict.ACK
    assert kube.get_job(name(3))["spec"]["suspend"] is False  # type: ignore[index]
    assert holder_of(lease(kube)) == name(3)
    assert kube.lists == [f"{LABELS.managed}=true,{LABELS.key('rb-number')}={rb}"
                          for rb in ("7000001", RB)]
    # Admission of waiting runs waits for the list: FIFO needs every Job of the RB.
    kube.finish(name(1, rb="7000001"))
    assert work_the_queue(restarted) == {"7000001", RB}
    assert is_suspended(kube.get_job(name(2, rb="7000001")))  # type: ignore[arg-type]
    assert restarted.controller.queue.get(timeout=0.3) is None  # no requeue loop meanwhile
    # The list comes in, its snapshot older than run 3's Job (it was read before run 3
    # arrived): run 3 stays known, and the list tells every RB it holds to admission.
    listed = [kube.get_job(name(n, rb="7000001")) for n in (1, 2)]
    kube.list_jobs = lambda **_: (listed, "1")  # type: ignore[method-assign,assignment]
    restarted.controller.watch.relist()
    assert restarted.controller.cache.get(name(3)) is not None
    restarted.handle(message(4))
    assert is_suspended(kube.get_job(name(4)))  # type: ignore[arg-type]
    assert work_the_queue(restarted) == {"7000001", RB}
    assert not is_suspended(kube.get_job(name(2, rb="7000001")))  # type: ignore[arg-type]
    assert holder_of(kube.of_kind("Lease")[lease_name("7000001")]) == name(2, rb="7000001")


def test_before_the_first_job_list_a_run_behind_a_waiting_one_waits_too() -> None:
    kube = FakeKube()
    first = Node(kube)
    first.handle(message(1))
    first.handle(message(2))  # waits behind run 1
    kube.finish(name(1))  # nobody hands the RB on: the dispatcher is restarting
    restarted = Node(kube)
    restarted.controller.cache.synced.clear()
    restarted.handle(message(3))
    # Run 2 has waited longest: run 3 must not jump ahead of it.
    assert is_suspended(kube.get_job(name(3)))  # type: ignore[arg-type]
    assert holder_of(lease(kube)) == name(1)
