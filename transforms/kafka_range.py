"""Resolving a replay request to exact offset ranges, and checking it first.

A range is asked for either by event time (start, end), resolved per partition
with the Kafka client's offsets-for-times lookup (record timestamps are event
times, see kafka_read), or by explicit offsets ``topic:partition:start-end``.
Every check happens here, before anything runs or is written; a bad request
raises :class:`BadRangeRequest` with a message a person can act on.

Where retention has already deleted the start of a partition's range, the
missing part is an :class:`ArchiveGap`: those events are read back from the
Postgres raw-event archive instead.
"""
from __future__ import annotations

import time
from typing import Iterable, NamedTuple, Optional

from confluent_kafka import TopicPartition

from transforms.kafka_read import KafkaReadConfig, PartitionSpec, UnknownTopicError, topic_partitions


class BadRangeRequest(ValueError):
    """The replay request cannot be served as asked."""


class ArchiveGap(NamedTuple):
    """Events of one partition below its first retained offset, within [start_ms, end_ms)."""
    topic: str
    partition: int
    below_offset: int
    start_ms: int
    end_ms: int


class ResolvedRange(NamedTuple):
    partitions: list  # of PartitionSpec, with stops
    archive_gaps: list  # of ArchiveGap
    total_records: int


def parse_offsets(text: str) -> list[tuple[str, int, int, int]]:
    """'topic:partition:start-end,...' -> [(topic, partition, start, end)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            topic, partition, span = item.rsplit(":", 2)
            start, end = span.split("-")
            out.append((topic, int(partition), int(start), int(end)))
        except ValueError:
            raise BadRangeRequest(f"offsets '{item}' are not of the form topic:partition:start-end") from None
    if not out:
        raise BadRangeRequest("no offsets given")
    return out


def _partitions(consumer, topics: Iterable[str]) -> list[TopicPartition]:
    try:
        return topic_partitions(consumer, topics)
    except UnknownTopicError as e:
        raise BadRangeRequest(str(e)) from None


def resolve_time_range(config: KafkaReadConfig, topics: Iterable[str], start_ms: int, end_ms: int,
                       now_ms: Optional[int] = None) -> ResolvedRange:
    """Offsets of every partition of ``topics`` for records with time in [start_ms, end_ms)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if end_ms <= start_ms:
        raise BadRangeRequest("the end of the range is not after its start")
    if start_ms > now_ms:
        raise BadRangeRequest("the range starts in the future")
    consumer = config.consumer()
    try:
        tps = _partitions(consumer, topics)
        starts = consumer.offsets_for_times([TopicPartition(t.topic, t.partition, start_ms) for t in tps], timeout=10)
        ends = consumer.offsets_for_times([TopicPartition(t.topic, t.partition, end_ms) for t in tps], timeout=10)
        specs, gaps, total = [], [], 0
        for tp, s, e in zip(tps, starts, ends):
            low, high = consumer.get_watermark_offsets(tp, timeout=10)
            start = high if s.offset < 0 else s.offset
            stop = high if e.offset < 0 else e.offset
            if start == low and low > 0 and _first_timestamp(consumer, tp, low) > start_ms:
                # Retention took records that may belong to the range: the archive has them.
                gaps.append(ArchiveGap(tp.topic, tp.partition, low, start_ms, end_ms))
            if stop > start:
                specs.append(PartitionSpec(tp.topic, tp.partition, start, stop))
                total += stop - start
        return ResolvedRange(specs, gaps, total)
    finally:
        consumer.close()


def resolve_offsets(config: KafkaReadConfig, wanted: list[tuple[str, int, int, int]]) -> ResolvedRange:
    """Explicit offset ranges, checked against what each partition holds."""
    consumer = config.consumer()
    try:
        known = {(t.topic, t.partition) for t in _partitions(consumer, {w[0] for w in wanted})}
        specs, total = [], 0
        for topic, partition, start, end in wanted:
            if (topic, partition) not in known:
                raise BadRangeRequest(f"{topic} has no partition {partition}")
            if end <= start:
                raise BadRangeRequest(f"{topic}:{partition}: end offset {end} is not after start {start}")
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if start < low or end > high:
                raise BadRangeRequest(f"{topic}:{partition}: offsets {start}-{end} are outside what the "
                                      f"partition holds ({low}-{high})")
            specs.append(PartitionSpec(topic, partition, start, end))
            total += end - start
        return ResolvedRange(specs, [], total)
    finally:
        consumer.close()


def _first_timestamp(consumer, tp: TopicPartition, offset: int) -> int:
    """Timestamp of the record at ``offset`` (the first retained one)."""
    consumer.assign([TopicPartition(tp.topic, tp.partition, offset)])
    try:
        for _ in range(50):
            for m in consumer.consume(1, timeout=0.2):
                if m.error() is None:
                    return m.timestamp()[1]
        raise BadRangeRequest(f"{tp.topic}:{tp.partition}: could not read its first retained record")
    finally:
        consumer.unassign()
