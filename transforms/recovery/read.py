"""Reading the dead-letter topic to its end, and choosing the dead letters to recover."""
from __future__ import annotations

import sys
import time
import uuid
from typing import Iterator, Optional

from confluent_kafka import Consumer, KafkaException, TopicPartition

from schemas.wire import decode_avro, schema_id_of
from transforms.records import DeadLetter
from transforms.recovery.request import BadRequest, RecoveryFailed, RecoveryRequest, Stored, Tally


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def kafka_partitions(brokers: str, timeout_s: float) -> dict[str, int]:
    """Every topic of the cluster and its partition count; unreachable Kafka is a bad request."""
    # Listing all topics, not just the one asked for, so nothing is ever auto-created.
    # log_level 0: librdkafka would print a line per failed connection attempt.
    c = Consumer({"bootstrap.servers": brokers, "group.id": "dlq-recovery-preflight",
                  "socket.connection.setup.timeout.ms": 3000, "log_level": 0})
    try:
        topics = c.list_topics(timeout=min(5.0, timeout_s)).topics
    except KafkaException as e:
        raise BadRequest(f"cannot reach Kafka at {brokers}: {e.args[0].str() if e.args else e}") from None
    finally:
        c.close()
    return {name: len(t.partitions) for name, t in topics.items() if t.error is None}


def _decode(value: Optional[bytes]) -> Optional[DeadLetter]:
    """A dead-letter record, or None for one this tool cannot read (not ours, tombstone)."""
    if schema_id_of(value) is None:
        return None
    try:
        entry, rec = decode_avro(value)
    except Exception:  # any body we cannot read is counted, not fatal
        return None
    if entry.subject != "dead_letter":
        return None
    return DeadLetter(**{f: rec.get(f) for f in DeadLetter._fields if f in rec})


def read_dead_letters(request: RecoveryRequest, partitions: int, tally: Tally) -> Iterator[Stored]:
    """Every dead letter of the topic up to the end offsets it has now; bounded by ``timeout_s``."""
    topic = request.dlq_topic
    c = Consumer({"bootstrap.servers": request.brokers, "group.id": f"dlq-recovery-{uuid.uuid4()}",
                  "enable.auto.commit": False, "enable.partition.eof": False, "log_level": 0})
    try:
        deadline = time.monotonic() + request.timeout_s
        ends, starts = {}, []
        for p in range(partitions):
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=min(10.0, request.timeout_s))
            if high > low:  # from the low watermark: older records were deleted by retention
                ends[p] = high
                starts.append(TopicPartition(topic, p, low))
        total = sum(ends[tp.partition] - tp.offset for tp in starts)
        c.assign(starts)
        while ends:
            if time.monotonic() > deadline:
                raise RecoveryFailed(f"could not read {topic} to its end within {request.timeout_s:g}s "
                                     f"({tally.scanned} of {total} read); retry, or raise --timeout")
            for m in c.consume(1000, timeout=1.0):
                if m.error() is not None:
                    if m.error().fatal():
                        raise RecoveryFailed(f"reading {topic}: {m.error().str()}")
                    continue
                if m.offset() >= ends.get(m.partition(), -1):
                    continue  # written after we started: the next run's business
                tally.scanned += 1
                if tally.scanned % request.progress_every == 0:
                    progress(f"  read {tally.scanned} of {total} dead letters")
                letter = _decode(m.value())
                if letter is None:
                    tally.unreadable += 1
                    continue
                yield Stored(m.partition(), m.offset(), letter)
            # Positions, not the last offset seen: they also step over gaps (compaction, markers).
            for tp in c.position([TopicPartition(topic, p) for p in list(ends)]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
    finally:
        c.close()


def select(request: RecoveryRequest, partitions: int, tally: Tally) -> list[Stored]:
    """The chosen dead letters, each failure once (the first copy of a duplicated one)."""
    codes, chosen, seen = set(request.codes), [], set()
    for s in read_dead_letters(request, partitions, tally):
        dl = s.letter
        if not request.since_ms <= dl.failed_at < request.until_ms or (codes and dl.error_code not in codes):
            continue
        if s.source_key in seen:
            continue
        seen.add(s.source_key)
        tally.selected[dl.error_code] += 1
        chosen.append(s)
    return chosen


def check_sources(chosen: list[Stored], partitions: dict[str, int], tally: Tally) -> list[Stored]:
    """Drops (and reports) dead letters whose source topic no longer exists."""
    kept = []
    for s in chosen:
        if s.letter.source_topic in partitions:
            kept.append(s)
        else:
            tally.needs_look(s, f"source topic {s.letter.source_topic} does not exist")
    return kept
