"""Per-RB lanes: one message of an RB handled at a time, in the broker's order.

Before the lanes, two consumer workers could take two runs of one RB at once and
store them in either order; admission then started the later run first whenever it
saw that run's Job alone (two CI runs met it). The consumer test runs the real
``Consumer`` with four workers over an in-memory stand-in for our ``StompClient``
and a recording stand-in for the dispatcher.
"""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

from dispatcher.consumer import Consumer
from dispatcher.dispatch import Received, Verdict
from dispatcher.lanes import Lanes, lane_of
from tests.unit.test_consumer_unauthorized import MemoryBroker, wait_until


def test_lane_of_is_the_rb_whatever_its_json_type_and_unique_without_one() -> None:
    assert lane_of(b'{"rb_number": 42}', fallback="m1") == lane_of(b'{"rb_number": " 42"}',
                                                                   fallback="m2") == "rb:42"
    assert lane_of(b"not json", fallback="m1") == "message:m1"
    assert lane_of(b'{"rb_number": null}', fallback="m2") == "message:m2"
    assert lane_of(b'{"rb_number": true}', fallback="m3") == "message:m3"
    assert lane_of(b'["rb_number"]', fallback="m4") == "message:m4"


def test_a_held_lane_waits_while_other_lanes_go_in_arrival_order() -> None:
    lanes: Lanes[str] = Lanes()
    for key, item in (("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1"), ("b", "b2")):
        lanes.put(key, item)
    assert lanes.take(timeout=0) == ("a", "a1")
    assert lanes.take(timeout=0) == ("b", "b1")  # a2 waits for a1
    assert lanes.take(timeout=0) == ("c", "c1")
    assert lanes.take(timeout=0) is None  # a and b are held, c is empty
    lanes.done("b")
    assert lanes.take(timeout=0) == ("b", "b2")
    lanes.done("a")
    assert lanes.take(timeout=0) == ("a", "a2")
    assert lanes.pending() == 0


def test_take_wakes_when_a_held_lane_is_done() -> None:
    lanes: Lanes[str] = Lanes()
    lanes.put("a", "a1")
    lanes.put("a", "a2")
    assert lanes.take(timeout=0) == ("a", "a1")
    timer = threading.Timer(0.05, lanes.done, args=("a",))
    timer.start()
    assert lanes.take(timeout=5) == ("a", "a2")
    timer.join()


class RecordingDispatcher:
    """Handles each message after a random pause; records order and overlap per RB."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.handled: dict[str, list[int]] = {}
        self.active: dict[str, int] = {}
        self.most_at_once: dict[str, int] = {}
        self.overall_at_once = 0
        self.rng = random.Random(7)

    def handle(self, received: Received) -> Verdict:
        raw = json.loads(received.body)
        rb = str(raw["rb_number"])
        with self.lock:
            self.active[rb] = self.active.get(rb, 0) + 1
            self.most_at_once[rb] = max(self.most_at_once.get(rb, 0), self.active[rb])
            self.overall_at_once = max(self.overall_at_once, sum(self.active.values()))
            pause = self.rng.uniform(0, 0.01)
        time.sleep(pause)
        with self.lock:
            self.active[rb] -= 1
            self.handled.setdefault(rb, []).append(int(raw["run_number"]))
        return Verdict.ACK

    def park(self, received: Received, reason: str) -> Verdict:  # pragma: no cover
        raise AssertionError(reason)


def test_four_workers_keep_each_rbs_runs_in_order_and_one_at_a_time() -> None:
    bodies: list[bytes] = []
    for run in range(60):
        message: dict[str, Any] = {"rb_number": 100 + run % 3, "run_number": run}
        bodies.append(json.dumps(message).encode())
    broker = MemoryBroker(bodies)
    dispatcher = RecordingDispatcher()
    consumer = Consumer(client=broker, dispatcher=dispatcher, destination="/queue/x",  # type: ignore[arg-type]
                        workers=4)  # fmt: skip
    consumer.start()
    try:
        wait_until(lambda: len(broker.acked) == len(bodies))
    finally:
        consumer.stop(timeout=5)
    for rb in ("100", "101", "102"):
        offset = int(rb) - 100
        assert dispatcher.handled[rb] == list(range(offset, 60, 3)), rb
        assert dispatcher.most_at_once[rb] == 1, rb
    assert dispatcher.overall_at_once > 1  # different RBs did go in parallel
