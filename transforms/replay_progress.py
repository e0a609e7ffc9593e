"""ReplayProgress: "read X of Y records" on stderr while a bounded job runs.

    progress = ReplayProgress(brokers, offsets, every_s=5)
    config = KafkaReadConfig(..., **progress.reader_settings())
    progress.start(); ...run the job...; progress.finish()

The readers run in the batch runner's worker processes, out of this process's
sight; so they commit their positions to a throwaway consumer group as they go
(``reader_settings``), and this thread reads that group's offsets. The group is
a gauge, never a place to resume from, and is deleted by ``finish``.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from transforms.kafka_range import ResolvedRange

LOG = logging.getLogger(__name__)


class ReplayProgress(threading.Thread):
    """Prints the records read of ``offsets`` every ``every_s`` seconds, and once more at the end."""

    def __init__(self, brokers: str, offsets: ResolvedRange, every_s: float = 5.0, suffix: str = ""):
        """``suffix`` ends every line (the replay's correlation id, when it has one)."""
        super().__init__(daemon=True, name="replay-progress")
        self.brokers, self.offsets, self.every_s, self.suffix = brokers, offsets, every_s, suffix
        self.group = f"replay-progress-{uuid.uuid4().hex[:12]}"
        self.done = threading.Event()

    def reader_settings(self) -> dict:
        """KafkaReadConfig fields that make the readers commit their positions for this thread."""
        return {"group_id": self.group, "progress_commit_s": self.every_s / 2}

    def read_so_far(self, consumer: Consumer) -> int:
        specs = self.offsets.partitions
        committed = consumer.committed([TopicPartition(s.topic, s.partition) for s in specs], timeout=5)
        return sum(min(c.offset, s.stop) - s.start for c, s in zip(committed, specs) if c.offset > s.start)

    def run(self) -> None:
        total, began = self.offsets.total_records, time.monotonic()
        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": self.group})
        try:
            while True:
                finishing = self.done.wait(self.every_s)  # one last line once the job ended
                read = self.read_so_far(consumer)
                rate = read / (time.monotonic() - began)
                print(f"replay: read {read:,} of {total:,} records ({100 * read / max(total, 1):.0f}%), "
                      f"{rate:,.0f}/s{self.suffix}", file=sys.stderr, flush=True)
                if finishing:
                    break
        except Exception as e:  # progress is a courtesy; it never fails the replay
            LOG.warning("progress reporting stopped: %s", e)
        finally:
            consumer.close()

    def finish(self) -> None:
        """Prints the last line and deletes the gauge group; safe to call when never started."""
        self.done.set()
        if self.is_alive():
            self.join(10)
        admin = AdminClient({"bootstrap.servers": self.brokers})  # kept: its futures die with it
        try:
            for future in admin.delete_consumer_groups([self.group], request_timeout=10).values():
                future.result(timeout=15)
        except Exception:
            pass  # a group that never committed does not exist
