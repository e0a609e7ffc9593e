"""ReadEvents: a Kafka source in pure Python, as a splittable DoFn.

Built the way Java KafkaIO's SDF read is: one restriction per topic partition,
an offset range tracker (unbounded for streaming, bounded for replay), a
watermark estimator that follows record timestamps, self-checkpointing when a
partition has no data, and offsets committed to the consumer group only in
bundle finalization, i.e. after the runner has durably taken the bundle's
output. It needs no Java, no expansion service and no Docker.

Setup::

    from transforms.kafka_read import KafkaReadConfig, ReadEvents
    config = KafkaReadConfig(brokers="127.0.0.1:9092", group_id="analytics")
    batches = p | ReadEvents(config, topics=["learning.events.v1"])

Each output element is a list of :class:`KafkaRecord` from one poll of one
partition: Python runners pay per element, so a batch is the unit of work.

Watermark: the newest record timestamp seen on the partition minus
``max_out_of_orderness_s``. Producers set the record timestamp to the event's
own time (CreateTime; scripts/produce.py does), so this is an event-time
watermark; events whose own time falls behind it are late data, which the
windows handle by their allowed lateness. A partition with nothing to read
advances its watermark with the wall clock (minus the same margin), so windows
close even when traffic stops.

``idle_timeout_s``: when set, a partition that delivers nothing for that long
ends its restriction; once all have, the watermark reaches infinity, every
window fires, and the pipeline finishes. That is ``--until_idle``.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection
from apache_beam.runners.sdf_utils import RestrictionTrackerView
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Duration, Timestamp
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas.settings import LOCAL_STACK
from transforms import latency_trace
from transforms.latency import LatencyHistogram
from transforms.records import KafkaRecord

LOG = logging.getLogger(__name__)
UNBOUNDED = sys.maxsize
IDLE_COMMIT_EVERY_S = 60.0  # an idle partition's offset is committed again this often
# A reader that is behind the end of its partition, with the broker answering,
# yet receives nothing for this long has a fetcher that stopped: its consumer
# is replaced, at the same position.
STUCK_FETCH_S = 10.0


# (read id, topic, partition) -> when a record last came, over every DoFn
# instance of the process: a partition's calls move between instances, and
# an instance's own reader may not have seen the partition for a long time.
_LAST_RECORD_AT: dict = {}


class _PartitionWatermarks:
    """The watermark of every partition of one read, shared by the readers in a process.

    Each partition's restriction reports the minimum over all partitions of
    the read, not its own: Prism takes a stage's output watermark from the
    last bundle's residuals alone, even while other bundles of the stage are
    still running, so a partition that ran ahead would otherwise pull the
    watermark past data that another bundle has read but not yet handed
    over, and make it late. So a partition's entry moves only when a bundle
    is finalized, i.e. once its output is committed. A partition not heard
    from yet holds the watermark back; one that finished no longer does. On
    runners that take the minimum over all residuals themselves this is
    merely conservative.
    """
    _lock = threading.Lock()
    _tables: dict = {}

    @classmethod
    def advance(cls, read_id: str, partitions: tuple, key: tuple, to: Timestamp) -> None:
        """Moves partition ``key`` forward to ``to``."""
        with cls._lock:
            table = cls._tables.setdefault(read_id, dict.fromkeys(partitions))
            if table.get(key) is None or to > table[key]:
                table[key] = to

    @classmethod
    def current(cls, read_id: str, partitions: tuple) -> Optional[Timestamp]:
        """The read's watermark: the least over its partitions; None while one is unknown."""
        with cls._lock:
            values = cls._tables.setdefault(read_id, dict.fromkeys(partitions)).values()
            return None if any(v is None for v in values) else min(values)


class _GroupCommits:
    """A consumer group's offset commits from this process: in order, never backwards.

    A bundle's offsets are committed when the runner finalizes it, and two
    bundles of a partition may be finalized on DoFn instances with consumers
    of their own: asynchronous commits from two clients can land in either
    order, and a lower offset landing last would move the group back. The
    ledger compactor may meanwhile have merged rows above that offset, which
    a restart would then drop while reading on from below them: events lost.
    So every commit of a group goes through one client, in the order asked,
    and an offset below one already committed is skipped. (Workers in several
    processes each have their own; see README "Known limits".)
    """
    _lock = threading.Lock()
    _groups: dict = {}

    def __init__(self, consumer: Consumer):
        self.consumer = consumer
        self.highest: dict = {}
        self.skipped = 0

    @classmethod
    def of(cls, config: "KafkaReadConfig") -> "_GroupCommits":
        with cls._lock:
            key = (config.brokers, config.group_id)
            if key not in cls._groups:
                cls._groups[key] = cls(config.consumer())
            return cls._groups[key]

    def commit(self, tp: TopicPartition) -> bool:
        """Commits ``tp`` (offset and metadata) unless a higher offset was committed; True if sent."""
        with self._lock:
            key = (tp.topic, tp.partition)
            if tp.offset < self.highest.get(key, -1):
                self.skipped += 1
                return False
            self.highest[key] = tp.offset
            self.consumer.commit(offsets=[tp], asynchronous=True)
            return True


@dataclass(frozen=True)
class KafkaReadConfig:
    """How to read: brokers, consumer group, batching, watermark and idleness."""
    brokers: str = LOCAL_STACK["KAFKA_BROKERS"]
    group_id: str = "learning-analytics"
    batch_size: int = 2000
    poll_timeout_s: float = 0.2
    max_bundle_s: float = 1.0
    idle_resume_s: float = 0.2
    max_out_of_orderness_s: float = 5.0
    idle_timeout_s: Optional[float] = None
    commit_offsets: bool = True
    # Bounded reads only: commit the position to the group this often while
    # reading, so another process can report progress (see
    # pipelines.replay); such a group is a gauge, never a place to resume from.
    progress_commit_s: Optional[float] = None
    # Streaming only: exit the process (status 3) when no read of it has run for
    # this long while partitions are still open, so a supervisor restarts a job
    # whose runner stopped scheduling it (see _StallWatchdog). None: never.
    stall_exit_s: Optional[float] = None
    start_from: str = "committed"  # committed offsets, else earliest; or "earliest"/"latest"
    consumer_config: dict = field(default_factory=dict)
    # Debug: append when each poll read which events here (transforms.latency_trace).
    trace_path: Optional[str] = None

    def consumer(self) -> Consumer:
        conf = {"bootstrap.servers": self.brokers, "group.id": self.group_id,
                "enable.auto.commit": False, "enable.auto.offset.store": False,
                "enable.partition.eof": False, "fetch.wait.max.ms": 100,
                # Never jump: a position the broker does not know (say, while
                # it restarts) is an error the reader waits out and reads
                # again from, not a silent reset to the end of the log.
                "auto.offset.reset": "error",
                "queued.min.messages": max(10000, self.batch_size * 2)}
        conf.update(self.consumer_config)
        return Consumer(conf)


class PartitionSpec(NamedTuple):
    """One partition to read, from ``start`` up to ``stop`` (exclusive; None = forever).

    ``since_ms``: when the committed ``start`` was read (the wall-clock time of
    the commit's bundle, kept in the commit's metadata); a run that died after
    it can only have published dead letters for this partition since then.
    ``horizon_ms``: the watermark to start from (what an earlier run reached).
    """
    topic: str
    partition: int
    start: int
    stop: Optional[int] = None
    since_ms: Optional[int] = None
    horizon_ms: Optional[int] = None
    # The highest offset an earlier run already dead-lettered: until the
    # commits pass it, they keep ``since_ms`` as the time to look back to.
    dead_lettered_up_to: Optional[int] = None


class UnknownTopicError(ValueError):
    """A topic asked for does not exist on the cluster."""


def topic_partitions(consumer: Consumer, topics: Iterable[str], timeout_s: float = 10.0) -> list[TopicPartition]:
    """Every partition of ``topics``, in order; raises UnknownTopicError."""
    meta = consumer.list_topics(timeout=timeout_s)
    tps = []
    for topic in topics:
        t = meta.topics.get(topic)
        if t is None or t.error is not None:
            raise UnknownTopicError(f"topic '{topic}' does not exist")
        tps += [TopicPartition(topic, p) for p in sorted(t.partitions)]
    return tps


def list_partitions(config: KafkaReadConfig, topics: Iterable[str],
                    timeout_s: float = 10.0) -> list[PartitionSpec]:
    """Every partition of ``topics`` with its start offset resolved; raises on unknown topics.

    A partition with a committed offset starts there (or at the log's start,
    if retention deleted it); ``start_from`` applies to one without. With
    ``commit_offsets``, a start that is not the committed offset is committed
    now: a restart then resumes where this run began, and the commit's time
    bounds what it looks back at (see PartitionSpec.since_ms).
    """
    consumer = config.consumer()
    try:
        tps = topic_partitions(consumer, topics, timeout_s)
        committed = _committed(consumer, tps, timeout_s)
        now_ms = int(time.time() * 1000)
        specs, to_commit = [], []
        for tp, c in zip(tps, committed):
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
            if c.offset >= 0:
                start = max(c.offset, low)  # retention may have deleted the committed records
            else:
                start = high if config.start_from == "latest" else low
            since = _since_ms(c.metadata) if c.offset >= 0 else None
            if since is None or start != c.offset:
                since = now_ms if since is None else since
                to_commit.append(TopicPartition(tp.topic, tp.partition, start, metadata=str(since)))
            specs.append(PartitionSpec(tp.topic, tp.partition, start, since_ms=since))
        if to_commit and config.commit_offsets:
            consumer.commit(offsets=to_commit, asynchronous=False)
        return specs
    finally:
        consumer.close()


_COORDINATOR_NOT_READY = {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                          KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._TIMED_OUT, KafkaError._TRANSPORT}


def _committed(consumer: Consumer, tps: list[TopicPartition], timeout_s: float) -> list[TopicPartition]:
    """The group's committed offsets, asked again while the broker answers that
    its group coordinator is not ready (a broker that just started is loading
    its offsets topic: NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS)."""
    deadline = time.monotonic() + max(timeout_s, 30.0)
    while True:
        try:
            return consumer.committed(tps, timeout=timeout_s)
        except KafkaException as e:
            err = e.args[0] if e.args else None
            if not isinstance(err, KafkaError) or time.monotonic() > deadline or not (
                    err.retriable() or err.code() in _COORDINATOR_NOT_READY):
                raise
            LOG.info("committed offsets not available yet (%s); asking again", err.str())
            time.sleep(1.0)


def _since_ms(metadata: Optional[str]) -> Optional[int]:
    try:
        return int(metadata) if metadata else None
    except ValueError:
        return None  # committed by another tool


class _PartitionRestrictions(RestrictionProvider):
    def initial_restriction(self, spec: PartitionSpec) -> OffsetRange:
        return OffsetRange(spec.start, UNBOUNDED if spec.stop is None else spec.stop)

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return _CheckpointOnlyTracker(restriction)

    def restriction_size(self, spec, restriction: OffsetRange) -> int:
        # An unbounded partition has no size; report a nominal one.
        return 1 if restriction.stop == UNBOUNDED else restriction.size()

    def split(self, spec, restriction):
        yield restriction  # one partition is one unit of parallelism, like KafkaIO

    def truncate(self, spec, restriction):
        # On drain an unbounded read stops; a bounded one finishes its range.
        return None if restriction.stop == UNBOUNDED else restriction


class _CheckpointOnlyTracker(OffsetRestrictionTracker):
    """Offsets of one partition; splits only to checkpoint (fraction 0).

    A partition is read in order by one reader, as in KafkaIO: a runner's
    dynamic split would hand the rest of the partition to a second reader
    running concurrently, and the partition's watermark would no longer
    follow one position.
    """

    def try_split(self, fraction_of_remainder):
        return super().try_split(0) if fraction_of_remainder == 0 else None


class _RecordTimeWatermark(WatermarkEstimatorProvider):
    def initial_estimator_state(self, spec, restriction):
        # A restarted job resumes from the watermark its ledger reached, so that
        # what was too late before the restart is too late after it.
        return None if spec.horizon_ms is None else Timestamp(micros=spec.horizon_ms * 1000)

    def create_watermark_estimator(self, state) -> ManualWatermarkEstimator:
        return ManualWatermarkEstimator(state)


class _PartitionReader:
    """A consumer assigned to one partition, kept between bundles of one DoFn instance."""

    def __init__(self, config: KafkaReadConfig, topic: str, partition: int, start: int):
        self.config, self.topic, self.partition = config, topic, partition
        self.consumer = config.consumer()
        self.position = start
        self.consumer.assign([TopicPartition(topic, partition, start)])
        self.last_record_at = time.monotonic()
        self.last_progress_at = time.monotonic()
        self.trouble = None  # the error of an ongoing broker outage, logged once
        self.last_idle_commit_at = time.monotonic()
        self.behind_since: Optional[float] = None  # polls empty while the log has more
        self.known_end = -1  # the end of log the broker last reported to end_offset()
        self.in_use = threading.Lock()  # one call at a time (see _Readers)

    def got_records(self) -> None:
        self.behind_since = None

    def behind(self) -> None:
        """The last poll was empty though the broker reports records past our
        position. A fetch may just be slow; one that delivers nothing for
        STUCK_FETCH_S has stopped, and the consumer is replaced."""
        now = time.monotonic()
        if self.behind_since is None:
            self.behind_since = now
        elif now - self.behind_since >= STUCK_FETCH_S:
            LOG.warning("Kafka %s[%d]: nothing fetched for %.0fs at offset %d though the log has more; "
                        "replacing the consumer", self.topic, self.partition, now - self.behind_since,
                        self.position)
            old, self.consumer = self.consumer, self.config.consumer()
            self.consumer.assign([TopicPartition(self.topic, self.partition, self.position)])
            self.behind_since = now
            old.close()

    def close(self) -> None:
        self.consumer.close()

    def reassign(self) -> None:
        self.consumer.assign([TopicPartition(self.topic, self.partition, self.position)])

    def seek(self, offset: int) -> None:
        if offset != self.position:
            self.consumer.assign([TopicPartition(self.topic, self.partition, offset)])
            self.position = offset

    def end_offset(self) -> Optional[int]:
        """The partition's end of log; None while the broker does not answer
        (a restart or an outage: the caller waits and asks again)."""
        try:
            high = self.consumer.get_watermark_offsets(
                TopicPartition(self.topic, self.partition), timeout=5, cached=False)[1]
        except KafkaException as e:
            self.broker_trouble(e)
            return None
        if self.trouble is not None:
            LOG.warning("Kafka %s[%d]: the broker answers again", self.topic, self.partition)
            self.trouble = None
        self.known_end = max(self.known_end, high)
        return high

    def records_there(self, stop: int) -> Optional[int]:
        """How many records the broker is known to hold past our position, up to
        ``stop`` (from the last fetch response or end_offset(), no broker call);
        None when neither has told."""
        high = max(self.known_end, self.consumer.get_watermark_offsets(
            TopicPartition(self.topic, self.partition), cached=True)[1])
        return None if high < 0 else max(0, min(high, stop) - self.position)

    def broker_trouble(self, error) -> None:
        """Logs the first error of an outage once; the reader keeps waiting."""
        if self.trouble is None:
            LOG.warning("Kafka %s[%d]: %s; waiting for the broker", self.topic, self.partition, error)
        self.trouble = error

    def caught_up(self) -> bool:
        """Whether the last fetch response's end of log is read (no broker call)."""
        high = self.consumer.get_watermark_offsets(
            TopicPartition(self.topic, self.partition), cached=True)[1]
        return high < 0 or self.position >= high


class _StallWatchdog:
    """Exits the process when its unbounded reads stopped being called.

    A live read is called again and again (each call ends in a checkpoint
    resumed after ``idle_resume_s``, or waits out a broker outage); calls stop
    only when every partition finished (``idle_timeout_s``). A runner that
    stops scheduling them while none is running has stalled (seen once in
    about five broker-outage chaos trials on Prism 2.77); the job is exact
    across restarts, so exiting non-zero lets a supervisor restart it. A call
    in progress (say, held by a sink's back-pressure) never counts as a stall.
    """
    _lock = threading.Lock()
    _thread: Optional[threading.Thread] = None
    limit_s: Optional[float] = None
    running = 0
    last_active = time.monotonic()
    open: set = set()  # (read id, topic, partition) not finished
    check_every_s = 5.0

    @staticmethod
    def on_stall(message: str) -> None:
        LOG.error(message)
        logging.shutdown()
        os._exit(3)

    @classmethod
    def arm(cls, limit_s: float, read_id: str, partitions: tuple) -> None:
        with cls._lock:
            cls.limit_s = limit_s if cls.limit_s is None else min(cls.limit_s, limit_s)
            cls.open.update((read_id, *p) for p in partitions)
            cls.last_active = time.monotonic()
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._watch, name="kafka-read-watchdog", daemon=True)
                cls._thread.start()

    @classmethod
    def call_began(cls) -> None:
        with cls._lock:
            cls.running += 1
            cls.last_active = time.monotonic()

    @classmethod
    def call_ended(cls, key: tuple, finished: bool) -> None:
        with cls._lock:
            cls.running -= 1
            cls.last_active = time.monotonic()
            if finished:
                cls.open.discard(key)

    @classmethod
    def stalled_for(cls) -> Optional[float]:
        with cls._lock:
            quiet = time.monotonic() - cls.last_active
            if cls.limit_s is None or cls.running or not cls.open or quiet < cls.limit_s:
                return None
            return quiet

    @classmethod
    def _watch(cls) -> None:
        while True:
            time.sleep(cls.check_every_s)
            quiet = cls.stalled_for()
            if quiet is not None:
                cls.on_stall(f"error: no Kafka read ran for {quiet:.0f}s with {len(cls.open)} partitions open: "
                             "the runner stopped scheduling the job; exiting so that it is restarted")


class _Readers:
    """The partition readers of a process, shared by all DoFn instances of a read.

    A runner keeps several instances of the reading DoFn per process (the
    Python SDK makes a new one whenever a bundle starts while the others are
    busy or await finalization), and a partition's calls move between them.
    A consumer per instance and partition multiplied the clients (tens, each
    fetching the same partition in the background, each reconnecting through
    a broker outage), and every move reassigned the receiving instance's
    consumer, throwing away what it had fetched, so a call often found
    nothing to read. One reader per partition keeps one position and one
    stream. Calls of a partition run one at a time (one restriction per
    partition); should two overlap anyway, the second gets a reader of its
    own, closed after the call. Readers are closed when the read's last DoFn
    instance is torn down.
    """
    _lock = threading.Lock()
    _readers: dict = {}  # (read id, topic, partition) -> _PartitionReader
    _users: dict = {}    # read id -> DoFn instances set up

    @classmethod
    def attach(cls, read_id: str) -> None:
        with cls._lock:
            cls._users[read_id] = cls._users.get(read_id, 0) + 1

    @classmethod
    def detach(cls, read_id: str) -> None:
        with cls._lock:
            cls._users[read_id] = cls._users.get(read_id, 1) - 1
            if cls._users[read_id] > 0:
                return
            del cls._users[read_id]
            readers = [cls._readers.pop(k) for k in [k for k in cls._readers if k[0] == read_id]]
        for reader in readers:
            reader.close()

    @classmethod
    def take(cls, read_id: str, config: KafkaReadConfig, topic: str, partition: int,
             start: int) -> tuple["_PartitionReader", bool]:
        """The partition's reader, at ``start``, and whether it is the shared one."""
        key = (read_id, topic, partition)
        with cls._lock:
            reader = cls._readers.get(key)
            if reader is None:
                reader = cls._readers[key] = _PartitionReader(config, topic, partition, start)
            shared = reader.in_use.acquire(blocking=False)
        if not shared:
            reader = _PartitionReader(config, topic, partition, start)
        reader.seek(start)
        return reader, shared

    @staticmethod
    def give_back(reader: "_PartitionReader", shared: bool) -> None:
        if shared:
            reader.in_use.release()
        else:
            reader.close()


class ReadPartitionFn(beam.DoFn):
    """Input: a PartitionSpec. Output: lists of KafkaRecord, one per poll, each
    timestamped at its records' time (never behind the watermark)."""

    def __init__(self, config: KafkaReadConfig, partitions: Iterable[PartitionSpec]):
        partitions = list(partitions)
        self.config = config
        self.partitions = tuple((p.topic, p.partition) for p in partitions)
        self.read_id = uuid.uuid4().hex  # one watermark table per read, even with several in a process
        self.bounded = all(p.stop is not None for p in partitions)
        self.records_read = Metrics.counter("ReadEvents", "records_read")
        self.polls_empty = Metrics.counter("ReadEvents", "empty_polls")
        # The service's event_processing_duration: from the poll that read a
        # record to every step fused with the reader (decode, validate, archive
        # hand-off, lateness, fold into windows, dead letters) being done with
        # its batch; a yield returns only once those steps handled the element.
        self.processing = LatencyHistogram("ReadEvents", "processing_seconds")
        self.watermark_ms = Metrics.gauge("ReadEvents", "watermark_ms")

    def setup(self):
        _Readers.attach(self.read_id)
        if self.config.stall_exit_s is not None and not self.bounded:
            _StallWatchdog.arm(self.config.stall_exit_s, self.read_id, self.partitions)

    def teardown(self):
        _Readers.detach(self.read_id)

    # The finalizer comes first: Beam passes the tracker and the watermark
    # estimator by name, and positional placeholders after them would clash.
    def process(self, spec: PartitionSpec, finalizer=beam.DoFn.BundleFinalizerParam,
                tracker: RestrictionTrackerView = beam.DoFn.RestrictionParam(_PartitionRestrictions()),
                watermark: ManualWatermarkEstimator = beam.DoFn.WatermarkEstimatorParam(_RecordTimeWatermark())):
        restriction = tracker.current_restriction()
        _StallWatchdog.call_began()
        reader, shared = None, False
        call = _CallOutcome()
        try:
            reader, shared = _Readers.take(self.read_id, self.config, spec.topic, spec.partition, restriction.start)
            yield from self._read(reader, tracker, restriction, watermark, call)
        finally:
            try:
                if reader is not None:
                    self._finalize_later(finalizer, reader, call, spec)
                    self._report_watermark(watermark)
            finally:
                if reader is not None:
                    _Readers.give_back(reader, shared)
                _StallWatchdog.call_ended((self.read_id, spec.topic, spec.partition),
                                          finished=call.watermark == MAX_TIMESTAMP)

    def _read(self, reader, tracker, restriction, watermark, call: "_CallOutcome"):
        # A bounded range is read in one call, without checkpoints: the batch
        # runner lost deferred residuals of bounded reads (a quarter of a
        # 200k-record replay went missing), and a replay gains nothing from them.
        bounded = restriction.stop != UNBOUNDED
        deadline = math.inf if bounded else time.monotonic() + self.config.max_bundle_s
        lag = Duration(seconds=self.config.max_out_of_orderness_s)
        behind = False
        while time.monotonic() < deadline:
            records = self._poll(reader, restriction.stop, wait=bounded or behind or not reader.caught_up())
            polled_at = time.monotonic()
            if not records:
                end = reader.end_offset() if bounded else None
                if bounded and (end is None or end > reader.position):
                    continue  # a slow fetch (or a broker away): the range's records are there
                behind = self._on_empty_poll(reader, tracker, restriction, call, deadline)
                if behind:
                    continue  # records are there: wait for them in this call
                return
            behind = False
            reader.got_records()
            records = self._claim(tracker, records)
            if not records:
                return  # the runner split the rest of the range away
            call.next_offset = reader.position = records[-1].offset + 1
            reader.last_record_at = _LAST_RECORD_AT[(self.read_id, reader.topic, reader.partition)] = time.monotonic()
            self.records_read.inc(len(records))
            offsets = Metrics.distribution("ReadEvents", f"offsets:{reader.topic}:{reader.partition}")
            offsets.update(records[0].offset)
            offsets.update(records[-1].offset)
            newest = Timestamp.of(max(r.timestamp_ms for r in records) / 1000.0)
            call.advance(newest - lag)
            if self.config.trace_path is not None:
                read = latency_trace.by_window(r.timestamp_ms for r in records)
                latency_trace.record(self.config.trace_path, "poll", read)
                for w, n in read.items():
                    call.traced[w] = call.traced.get(w, 0) + n
            yield TimestampedValue(records, self._horizon(watermark))
            self.processing.observe(time.monotonic() - polled_at, len(records))
            if bounded:
                self._report_progress(reader, done=call.next_offset >= restriction.stop)
            if call.next_offset >= restriction.stop:
                return
            if not bounded and reader.caught_up():
                break  # hand on what there is now rather than wait for more
        tracker.defer_remainder()

    def _report_progress(self, reader: _PartitionReader, done: bool) -> None:
        every = self.config.progress_commit_s
        if every is None or not done and time.monotonic() - reader.last_progress_at < every:
            return
        reader.last_progress_at = time.monotonic()
        reader.consumer.commit(offsets=[TopicPartition(reader.topic, reader.partition, reader.position)],
                               asynchronous=not done)

    def _poll(self, reader: _PartitionReader, stop: int, wait: bool) -> list[KafkaRecord]:
        # Caught up, a live read takes what the consumer has fetched in the
        # background (the checkpoint's resume delay bounds how often); behind,
        # it waits for the rest, but only for the records the broker is known to
        # hold: consume() returns once it has as many as asked, or at the
        # timeout, so asking a full batch of a partition with a few hundred new
        # records waited the whole poll_timeout_s (per partition, per call: most
        # of the live latency). A backlog still gets full batches.
        timeout, count = 0, self.config.batch_size
        if wait:
            timeout = self.config.poll_timeout_s
            there = reader.records_there(stop)
            if there:
                count = min(count, there)
        messages = reader.consumer.consume(count, timeout=timeout)
        records = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise KafkaException(err)
                # A broker restarting or away (transport errors, unknown
                # partition while its leader is elected, a position it does not
                # know yet): wait, and fetch again from where we are.
                reader.broker_trouble(err)
                if err.code() == KafkaError._AUTO_OFFSET_RESET:
                    reader.reassign()
                continue
            if m.offset() >= stop:
                break
            records.append(KafkaRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value(),
                                       m.timestamp()[1], tuple(m.headers() or ())))
        return records

    @staticmethod
    def _claim(tracker: RestrictionTrackerView, records: list[KafkaRecord]) -> list[KafkaRecord]:
        if tracker.try_claim(records[-1].offset):
            return records
        # A split moved the end of our range: keep what is still ours, in order.
        kept = []
        for r in records:
            if not tracker.try_claim(r.offset):
                break
            kept.append(r)
        return kept

    def _on_empty_poll(self, reader, tracker, restriction, call: "_CallOutcome", deadline: float) -> bool:
        """Ends the call (a checkpoint, or the range done) after an empty poll;
        True instead when records are there and the call has time to wait for them."""
        self.polls_empty.inc()
        # An empty poll may only mean the fetch is slow: only a reader at the
        # end of the log is idle.
        end = reader.end_offset()
        if end is not None and end > reader.position:
            reader.behind()
            if time.monotonic() < deadline:
                return True
        if end is None or end > reader.position:
            tracker.defer_remainder(Duration(seconds=self.config.idle_resume_s))
            return False
        # Another DoFn instance may have read this partition since this reader did.
        last = max(reader.last_record_at, _LAST_RECORD_AT.get((self.read_id, reader.topic, reader.partition), 0.0))
        idle_for = time.monotonic() - last
        if restriction.stop != UNBOUNDED or (self.config.idle_timeout_s is not None
                                             and idle_for >= self.config.idle_timeout_s):
            # Nothing more will come for this range: claim its end so it is
            # done, and stop holding back the other partitions' watermark.
            tracker.try_claim(restriction.stop - 1)
            call.advance(MAX_TIMESTAMP)
            return False
        # Caught up: time passes without records, so the watermark follows the clock.
        now = time.monotonic()
        if now - reader.last_idle_commit_at >= IDLE_COMMIT_EVERY_S:
            # Commit the same offset again, with this call's time: a restart
            # looks back at the dead-letter topic only to the oldest commit's
            # time, and an idle partition must not hold that back for days.
            # (Everything below the position is durable: the bundle that read
            # up to it has finished.)
            reader.last_idle_commit_at = now
            call.next_offset = reader.position
        call.advance(Timestamp.now() - Duration(seconds=self.config.max_out_of_orderness_s))
        tracker.defer_remainder(Duration(seconds=self.config.idle_resume_s))
        return False

    def _horizon(self, watermark: ManualWatermarkEstimator) -> Timestamp:
        """A batch's timestamp: the read's watermark as far as this process
        knows it (never behind what any partition reported, and never moving
        back), or the minimum while it is unknown. Downstream, lateness is
        judged against it (transforms.aggregate.RejectLateEventsFn) and the
        window ledger records it, so it must not follow one batch's records: a
        partition ahead of the others, or one record with a clock hours fast,
        would make the others' events too late."""
        shared = _PartitionWatermarks.current(self.read_id, self.partitions)
        current = watermark.current_watermark()
        known = [t for t in (shared, current) if t is not None]
        return max(known) if known else MIN_TIMESTAMP

    def _report_watermark(self, watermark: ManualWatermarkEstimator) -> None:
        shared = _PartitionWatermarks.current(self.read_id, self.partitions)
        current = watermark.current_watermark()
        if shared is not None and (current is None or shared > current):
            watermark.set_watermark(shared)
        horizon = self._horizon(watermark)
        if MIN_TIMESTAMP < horizon < MAX_TIMESTAMP:
            self.watermark_ms.set(horizon.micros // 1000)  # for the service's /events/status

    def _finalize_later(self, finalizer, reader: _PartitionReader, call: "_CallOutcome",
                        spec: PartitionSpec) -> None:
        """Once the runner has committed this bundle's output: commit the offsets
        to the consumer group and publish the partition's new watermark.

        The commit's metadata is the time this call began reading: the records
        from the committed offset on are read by later calls, so a restart
        finds any dead letter they got published after that time.

        Registered on every bundle, even with nothing to do: Prism asks every
        bundle of this stage to finalize, and the SDK only keeps a bundle
        finalizable when it has a callback.
        """
        commits, key = _GroupCommits.of(self.config), (reader.topic, reader.partition)
        commit = self.config.commit_offsets and call.next_offset is not None
        since = call.started_ms
        if spec.dead_lettered_up_to is not None and spec.since_ms is not None \
                and (call.next_offset or 0) <= spec.dead_lettered_up_to:
            since = min(since, spec.since_ms)
        offset = TopicPartition(reader.topic, reader.partition, call.next_offset,
                                metadata=str(since)) if commit else None
        read_id, partitions, to = self.read_id, self.partitions, call.watermark
        trace_path, traced = self.config.trace_path, call.traced

        def finalize():
            latency_trace.record(trace_path, "handed", traced)
            if offset is not None:
                commits.commit(offset)
            if to is not None:
                _PartitionWatermarks.advance(read_id, partitions, key, to)

        finalizer.register(finalize)


class _CallOutcome:
    """What one process call read: when it began, the next offset and the partition's watermark."""

    def __init__(self):
        self.started_ms = int(time.time() * 1000)
        self.next_offset: Optional[int] = None
        self.watermark: Optional[Timestamp] = None
        self.traced: dict = {}  # --latency_trace only: records read, by 1-minute window

    def advance(self, to: Timestamp) -> None:
        if self.watermark is None or to > self.watermark:
            self.watermark = to


class ReadEvents(beam.PTransform):
    """Kafka topics -> PCollection of lists of KafkaRecord.

    Give ``topics`` to read every partition from the group's committed offsets
    (streaming), or ``partitions`` (PartitionSpecs with stops) for a bounded
    read of exact offset ranges (replay).
    """

    def __init__(self, config: KafkaReadConfig, topics: Iterable[str] = (),
                 partitions: Iterable[PartitionSpec] = ()):
        super().__init__()
        self.config = config
        self.topics = tuple(topics)
        self.partitions = list(partitions)
        if bool(self.topics) == bool(self.partitions):
            raise ValueError("ReadEvents takes either topics or partitions")

    def expand(self, pbegin) -> PCollection:
        # Partitions are listed (and start offsets resolved) when the pipeline
        # is built: the readers need the whole set to hold the watermark.
        specs = self.partitions or list_partitions(self.config, self.topics)
        return (pbegin | "Partitions" >> beam.Create(specs)
                | "ReadPartitions" >> beam.ParDo(ReadPartitionFn(self.config, specs)))
