"""The reader's stall watchdog: it fires only when no read runs, none ran for
its limit, and partitions are still open (no broker needed)."""
from __future__ import annotations

import time

import pytest

import transforms.kafka_read as kr


@pytest.fixture
def watchdog(monkeypatch):
    fired = []
    monkeypatch.setattr(kr._StallWatchdog, "on_stall", staticmethod(fired.append))
    monkeypatch.setattr(kr._StallWatchdog, "check_every_s", 0.05)
    monkeypatch.setattr(kr._StallWatchdog, "limit_s", None)
    monkeypatch.setattr(kr._StallWatchdog, "running", 0)
    monkeypatch.setattr(kr._StallWatchdog, "open", set())
    yield kr._StallWatchdog, fired


def test_no_call_for_the_limit_with_partitions_open_exits(watchdog):
    dog, fired = watchdog
    dog.arm(0.3, "r1", (("t", 0), ("t", 1)))
    dog.call_began()
    dog.call_ended(("r1", "t", 0), finished=False)
    deadline = time.monotonic() + 5
    while not fired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fired and "2 partitions open" in fired[0]


def test_a_call_in_progress_or_recent_is_no_stall(watchdog):
    dog, fired = watchdog
    dog.arm(0.2, "r2", (("t", 0),))
    dog.call_began()             # say, held by a sink's back-pressure
    time.sleep(0.4)
    assert dog.stalled_for() is None
    dog.call_ended(("r2", "t", 0), finished=False)
    assert dog.stalled_for() is None  # just ran
    time.sleep(0.3)
    assert dog.stalled_for() is not None


def test_finished_partitions_disarm_it(watchdog):
    dog, fired = watchdog
    dog.arm(0.2, "r3", (("t", 0),))
    dog.call_began()
    dog.call_ended(("r3", "t", 0), finished=True)  # --until_idle: the range is done
    time.sleep(0.3)
    assert dog.stalled_for() is None


def test_off_unless_configured_and_never_for_bounded_reads():
    assert kr.KafkaReadConfig().stall_exit_s is None
    spec = kr.PartitionSpec("t", 0, 0, stop=10)
    fn = kr.ReadPartitionFn(kr.KafkaReadConfig(stall_exit_s=1.0), [spec])
    assert fn.bounded
