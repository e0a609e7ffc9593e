"""Consumer lag of the job's group: per topic-partition, end offset minus committed offset.

    lag = ConsumerLag(brokers, group_id, topics)
    lag.read()     # LagReading(partitions=[PartitionLag(...)], error=None), cached ~1 s

Read from Kafka itself (the group's committed offsets and each partition's
end offset), not from the job: it is what the broker will hand a restarted
run. A client that never subscribes reads the group's offsets without joining
the group, so it cannot disturb the job's commits. Every request is bounded
(``TIMEOUT_S``); a broker that does not answer gives an ``error``, never a hang.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

TIMEOUT_S = 2.0
CACHE_S = 1.0


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: Optional[int]   # None: the group has committed nothing there yet
    end: int

    @property
    def lag(self) -> int:
        """Records not yet committed: the whole partition when nothing is committed."""
        return max(0, self.end - (self.committed or 0))


@dataclass(frozen=True)
class LagReading:
    partitions: list = field(default_factory=list)
    error: Optional[str] = None


class ConsumerLag:
    """Lag of ``group_id`` on ``topics``; thread-safe, cached for ``cache_s``, never raises."""

    def __init__(self, brokers: str, group_id: str, topics: list[str], cache_s: float = CACHE_S):
        self.topics, self.cache_s = topics, cache_s
        conf = {"bootstrap.servers": brokers, "socket.connection.setup.timeout.ms": int(TIMEOUT_S * 1000)}
        self._admin = AdminClient(conf)
        self._consumer = Consumer(dict(conf, **{"group.id": group_id, "enable.auto.commit": False}))
        self._lock = threading.Lock()
        self._last, self._last_at = LagReading(error="not read yet"), -1e9

    def read(self) -> LagReading:
        with self._lock:
            if time.monotonic() - self._last_at >= self.cache_s:
                try:
                    self._last = LagReading(self._read())
                except Exception as e:  # a broker away: say so; /health and /events/status show it
                    self._last = LagReading(error=f"{type(e).__name__}: {e}")
                self._last_at = time.monotonic()
            return self._last

    def _read(self) -> list[PartitionLag]:
        meta = self._admin.list_topics(timeout=TIMEOUT_S)
        tps = [TopicPartition(t, p) for t in self.topics for p in sorted(meta.topics[t].partitions)]
        ends = self._admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=TIMEOUT_S)
        committed = {(tp.topic, tp.partition): tp.offset
                     for tp in self._consumer.committed(tps, timeout=TIMEOUT_S)}
        out = []
        for tp in tps:
            end = ends[tp].result(timeout=TIMEOUT_S).offset
            offset = committed.get((tp.topic, tp.partition))
            out.append(PartitionLag(tp.topic, tp.partition, offset if offset is not None and offset >= 0 else None, end))
        return out

    def close(self) -> None:
        self._consumer.close()
