"""The Kafka reader keeps making progress: one consumer per partition however
many DoFn instances a runner makes, and a consumer whose fetch stopped is
replaced. Against the real broker; the reader's calls are driven by hand, the
way a runner calls a splittable DoFn (one restriction, checkpoints)."""
from __future__ import annotations

import glob
import json
import pickle
import time

import pytest
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from confluent_kafka import Producer, TopicPartition

import transforms.kafka_read as kr
from transforms.kafka_read import KafkaReadConfig, PartitionSpec, ReadPartitionFn

pytestmark = pytest.mark.integration


class _Finalizer:
    def __init__(self):
        self.callbacks = []

    def register(self, callback):
        self.callbacks.append(callback)


def call(fn: ReadPartitionFn, spec: PartitionSpec, start: int) -> list:
    """One process() call from ``start`` on, finalized at once; its records."""
    tracker = kr._CheckpointOnlyTracker(OffsetRange(start, kr.UNBOUNDED))
    view = RestrictionTrackerView(ThreadsafeRestrictionTracker(tracker))
    finalizer = _Finalizer()
    out = list(fn.process(spec, finalizer=finalizer, tracker=view, watermark=ManualWatermarkEstimator(None)))
    for callback in finalizer.callbacks:
        callback()
    return [r for batch in out for r in batch.value]


def produce(brokers: str, topic: str, n: int) -> None:
    p = Producer({"bootstrap.servers": brokers})
    for i in range(n):
        p.produce(topic, value=b"x%d" % i, partition=0)
    assert p.flush(30) == 0


def _rdk_threads() -> int:
    """librdkafka clients in this process: each has one thread named rdk:main."""
    n = 0
    for path in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(path) as f:
                n += f.read().strip() == "rdk:main"
        except OSError:
            pass
    return n


def read_all(fns: list, spec: PartitionSpec, want: int, timeout_s: float = 60) -> list:
    """Calls the partition's restriction on the instances in turn until ``want`` records came."""
    got, start, i = [], spec.start, 0
    deadline = time.monotonic() + timeout_s
    while len(got) < want:
        assert time.monotonic() < deadline, f"{len(got)} of {want} records after {timeout_s}s"
        records = call(fns[i % len(fns)], spec, start)
        i += 1
        got += records
        if records:
            start = records[-1].offset + 1
    return got


def test_instances_of_the_reader_share_one_consumer_per_partition(stack):
    topic = stack.topics["learning"]
    produce(stack.brokers, topic, 3000)
    config = KafkaReadConfig(brokers=stack.brokers, group_id=stack.group_id, commit_offsets=False, batch_size=500)
    spec = PartitionSpec(topic, 0, 0)
    fn = ReadPartitionFn(config, [spec])
    kr._GroupCommits.of(config)  # the group's committer, made by the first call: not counted
    before = _rdk_threads()
    instances = []
    for _ in range(4):  # what a runner does: the same DoFn, deserialized per bundle processor
        inst = pickle.loads(pickle.dumps(fn))
        inst.setup()
        instances.append(inst)
    try:
        got = read_all(instances, spec, 3000)
        assert [r.offset for r in got] == list(range(3000))  # in order, none twice, none missing
        readers = [k for k in kr._Readers._readers if k[0] == fn.read_id]
        assert readers == [(fn.read_id, topic, 0)]
        assert _rdk_threads() - before == 1  # one consumer, not one per instance
    finally:
        for inst in instances:
            inst.teardown()
    assert not [k for k in kr._Readers._readers if k[0] == fn.read_id]  # the last teardown closed it


def test_a_reader_whose_fetch_stopped_gets_a_new_consumer(stack, monkeypatch):
    monkeypatch.setattr(kr, "STUCK_FETCH_S", 1.0)
    topic = stack.topics["content"]  # a topic of its own: offsets from 0
    produce(stack.brokers, topic, 200)
    config = KafkaReadConfig(brokers=stack.brokers, group_id=stack.group_id, commit_offsets=False)
    spec = PartitionSpec(topic, 0, 0)
    fn = ReadPartitionFn(config, [spec])
    fn.setup()
    try:
        first = read_all([fn], spec, 200)
        reader = kr._Readers._readers[(fn.read_id, topic, 0)]
        stuck = reader.consumer
        # A fetcher that stops without telling (as seen after a broker restart):
        # the log grows, the consumer delivers nothing, no error.
        stuck.pause([TopicPartition(topic, 0)])
        produce(stack.brokers, topic, 100)
        more = read_all([fn], PartitionSpec(topic, 0, 200), 100, timeout_s=30)
        assert [r.offset for r in first + more] == list(range(300))
        assert reader.consumer is not stuck
    finally:
        fn.teardown()


def test_a_reader_waits_only_for_the_records_the_log_holds(stack, tmp_path):
    """A live partition with fewer new records than a batch: the reader asks the
    consumer for as many as the broker reports past its position (not a whole
    batch, which made every call wait its poll timeout), and still reads them all,
    in order, and traces them (--latency_trace: polled, then handed on)."""
    topic = stack.topics["engagement"]  # a topic of its own: offsets from 0
    trace = tmp_path / "trace.jsonl"
    config = KafkaReadConfig(brokers=stack.brokers, group_id=stack.group_id, commit_offsets=False,
                             batch_size=2000, trace_path=str(trace))
    spec = PartitionSpec(topic, 0, 0)
    fn = ReadPartitionFn(config, [spec])
    fn.setup()
    try:
        assert call(fn, spec, 0) == []  # the partition is empty: the reader is caught up
        reader = kr._Readers._readers[(fn.read_id, topic, 0)]
        produce(stack.brokers, topic, 7)
        assert reader.end_offset() == 7
        assert reader.records_there(kr.UNBOUNDED) == 7
        assert reader.records_there(5) == 5  # a bounded range's stop caps it
        got = read_all([fn], spec, 7, timeout_s=30)
        assert [r.offset for r in got] == list(range(7))
        lines = [json.loads(line) for line in trace.read_text().splitlines()]
        assert sum(line["n"] for line in lines if line["s"] == "poll") == 7
        assert sum(line["n"] for line in lines if line["s"] == "handed") == 7
        assert reader.records_there(kr.UNBOUNDED) == 0
    finally:
        fn.teardown()
