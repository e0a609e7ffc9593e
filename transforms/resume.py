"""Where a (re)starting streaming job resumes: offsets, window totals, decided records.

A run can stop at any moment (a drain, SIGTERM, SIGKILL, a crash). What the
next run needs, all resolved before its pipeline is built:

- to be the group's only run: it takes the group's lease first
  (transforms.lease), waiting while an earlier run still holds it;
- the offset of every partition: the group's committed offsets (committed
  only after everything below them is durable: see transforms.ledger);
- each open window's total so far: the window ledger's seeds, which
  WindowedMetrics starts its windows from;
- the watermark the old run had reached, so lateness is judged as before;
- the dead letters the old run published for records at or above those
  offsets (it died before committing them): those records are not
  dead-lettered again, so a record has one dead letter, also across restarts.

Setup::

    point = resume_point(config, topics, ledger, dlq_topic="analytics.dlq.v1",
                         finest_s=60, lateness_ms=3_600_000)
    events = p | ReadEvents(config, partitions=point.partitions) | ...
    events | WindowedMetrics(..., seeds=point.read_seeds(), dead_lettered=point.dead_lettered)
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from confluent_kafka import TopicPartition

from transforms.lease import GroupLease
from transforms.kafka_read import KafkaReadConfig, PartitionSpec, list_partitions, topic_partitions
from transforms.ledger import Committed, Seeds, WindowLedger, compact, prepare_resume, read_seeds
from transforms.records import DeadLetter
from transforms.sinks.postgres_sink import apply_schema

LOG = logging.getLogger(__name__)
# The dead-letter topic is read from this long before the oldest commit's
# time: the producer stamps a record when it is sent, after it was read.
LOOKBACK_MARGIN_MS = 10_000

Coordinates = tuple  # (topic, partition, offset)


class ResumePoint(NamedTuple):
    partitions: list          # of PartitionSpec, from the committed offsets, with the old watermark
    seeds: Seeds              # what the ledger holds for the job to start its windows from
    dead_lettered: frozenset  # of Coordinates at or above the committed offsets
    ledger: WindowLedger
    lease: Optional[GroupLease] = None  # held until the process exits

    def committed(self) -> dict:
        return {(s.topic, s.partition): s.start for s in self.partitions}

    def read_seeds(self) -> "ReadWindowSeeds":
        return ReadWindowSeeds(self.ledger, self.committed())


def resume_point(config: KafkaReadConfig, topics: Iterable[str], ledger: WindowLedger, dlq_topic: str,
                 finest_s: int, lateness_ms: int) -> ResumePoint:
    """Resolves where a streaming job starts; see the module docstring.

    Blocks while another run of the group holds its lease: that run's last
    commits must be final before the offsets and the ledger are read.
    """
    lease = GroupLease(ledger.dsn, ledger.group_id)
    lease.acquire()
    apply_schema(ledger.dsn)  # the ledger's table, on a database the job has not used yet
    specs = list_partitions(config, topics)
    committed = {(s.topic, s.partition): s.start for s in specs}
    seeds = prepare_resume(ledger, committed, finest_s, lateness_ms)
    decided = published_dead_letters(config, dlq_topic, specs)
    highest: dict = {}
    for topic, partition, offset in decided:
        highest[(topic, partition)] = max(offset, highest.get((topic, partition), offset))
    specs = [s._replace(horizon_ms=seeds.horizon_ms, dead_lettered_up_to=highest.get((s.topic, s.partition)))
             for s in specs]
    return ResumePoint(specs, seeds, frozenset(decided), ledger, lease)


def parse_dead_letter_key(key: Optional[bytes]) -> Optional[Coordinates]:
    """The source coordinates in a dead letter's key, ``topic:partition:offset``
    (transforms.sinks.kafka_sink writes it)."""
    try:
        topic, partition, offset = key.decode().rsplit(":", 2)
        return topic, int(partition), int(offset)
    except (AttributeError, UnicodeDecodeError, ValueError):
        return None


def published_dead_letters(config: KafkaReadConfig, dlq_topic: str,
                           specs: list[PartitionSpec]) -> set[Coordinates]:
    """Coordinates at or above each partition's start that already have a dead
    letter on ``dlq_topic``: read from the oldest commit's time (less a margin)
    to the end of the topic, so a restart reads only what the last run wrote."""
    starts = {(s.topic, s.partition): s.start for s in specs}
    since = min((s.since_ms for s in specs if s.since_ms is not None), default=0) - LOOKBACK_MARGIN_MS
    consumer = config.consumer()
    found: set = set()
    try:
        tps = topic_partitions(consumer, [dlq_topic])
        begins = consumer.offsets_for_times([TopicPartition(tp.topic, tp.partition, max(since, 0)) for tp in tps],
                                            timeout=10)
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        todo = {b.partition: b.offset for b in begins if 0 <= b.offset < ends[b.partition]}
        if not todo:
            return found
        consumer.assign([TopicPartition(dlq_topic, p, o) for p, o in todo.items()])
        deadline = time.monotonic() + 120
        while todo and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=1):
                if m.error() is not None:
                    continue
                coords = parse_dead_letter_key(m.key())
                if coords and coords[:2] in starts and coords[2] >= starts[coords[:2]]:
                    found.add(coords)
                if m.offset() + 1 >= ends[m.partition()]:
                    todo.pop(m.partition(), None)
        if todo:
            raise TimeoutError(f"could not read {dlq_topic} to its end in 120 s (partitions {sorted(todo)})")
        return found
    finally:
        consumer.close()


class SkipPublishedFn(beam.DoFn):
    """Input: DeadLetters. Output: those whose source record has no dead letter yet."""

    def __init__(self, published: frozenset):
        self.published = published
        self.skipped = Metrics.counter("DeadLetters", "already_published")

    def process(self, letter: DeadLetter):
        if (letter.source_topic, letter.source_partition, letter.source_offset) in self.published:
            self.skipped.inc()
            return
        yield letter


class SkipPublishedDeadLetters(beam.PTransform):
    """DeadLetters -> the ones an earlier run did not publish already."""

    def __init__(self, published: frozenset):
        super().__init__()
        self.published = published

    def expand(self, dead_letters):
        if not self.published:
            return dead_letters
        return dead_letters | "Skip" >> beam.ParDo(SkipPublishedFn(self.published))


class ReadWindowSeedsFn(beam.DoFn):
    """Input: one impulse. Output: ((window seconds, window start ms), Partial)
    for every window the ledger seeds (see transforms.ledger.read_seeds)."""

    def __init__(self, ledger: WindowLedger, committed: Committed):
        self.ledger, self.committed = ledger, committed
        self.windows = Metrics.counter("WindowedMetrics", "windows_seeded")

    def process(self, _):
        for item in read_seeds(self.ledger, self.committed):
            self.windows.inc()
            yield item


class ReadWindowSeeds(beam.PTransform):
    """PBegin -> the ledger's seeds, read by the job when it starts (not by the
    launcher: they can be large, and must not travel in the pipeline)."""

    def __init__(self, ledger: WindowLedger, committed: Committed):
        super().__init__()
        self.ledger, self.committed = ledger, committed

    def expand(self, pbegin):
        return pbegin | "Impulse" >> beam.Impulse() | "Read" >> beam.ParDo(
            ReadWindowSeedsFn(self.ledger, self.committed))


class LedgerCompactor(threading.Thread):
    """Compacts the window ledger every ``ledger.compact_every_s`` while the job
    runs, against the offsets the group has committed by then, so that a
    restart reads a bounded ledger. Runs in the launching process."""

    def __init__(self, config: KafkaReadConfig, specs: list[PartitionSpec], ledger: WindowLedger,
                 finest_s: int, lateness_ms: int):
        super().__init__(daemon=True, name="ledger-compactor")
        self.config, self.ledger = config, ledger
        self.tps = [TopicPartition(s.topic, s.partition) for s in specs]
        self.finest_s, self.lateness_ms = finest_s, lateness_ms
        self.started_at = {(s.topic, s.partition): s.start for s in specs}
        self.stopped = threading.Event()

    def run(self):
        consumer = self.config.consumer()
        try:
            while not self.stopped.wait(self.ledger.compact_every_s):
                try:
                    committed = {(c.topic, c.partition): c.offset
                                 for c in consumer.committed(self.tps, timeout=10) if c.offset >= 0}
                    merged, expired = compact(self.ledger, committed, self.finest_s, self.lateness_ms,
                                              keep_below=self.started_at)
                    LOG.info("ledger compacted: %d rows merged, %d expired", merged, expired)
                except Exception as e:  # the next round tries again; the job does not depend on it
                    LOG.warning("ledger compaction failed (will retry): %s", e)
        finally:
            consumer.close()

    def stop(self) -> None:
        self.stopped.set()
