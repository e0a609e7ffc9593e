"""ReadArchivedEvents: events back from the Postgres raw-event archive, for replay.

Used for the part of a replay range that Kafka no longer holds (retention):
the archive stored every valid event with its source coordinates, so the
events come back exactly as DecodeAndValidate produced them.
"""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from schemas.postgres import connect, utc
from transforms.kafka_range import ArchiveGap
from transforms.records import Event

_SELECT = """
SELECT event_type, (extract(epoch FROM occurred_at) * 1000)::bigint, payload, schema_id, schema_version,
       source_topic, source_partition, source_offset
FROM raw_events
WHERE source_topic = %s AND source_partition = %s AND source_offset < %s
  AND occurred_at >= %s AND occurred_at < %s
ORDER BY source_offset"""


class ReadArchiveGapFn(beam.DoFn):
    """Input: an ArchiveGap. Output: lists of up to ``batch_size`` archived Events."""

    def __init__(self, dsn: str, batch_size: int = 2000):
        self.dsn, self.batch_size = dsn, batch_size
        self.read = Metrics.counter("ReadArchivedEvents", "events_read")

    def process(self, gap: ArchiveGap) -> Iterable[list]:
        conn = connect(self.dsn)
        try:
            with conn, conn.cursor(name="archive_gap") as cur:  # server-side: no full fetch
                cur.itersize = self.batch_size
                cur.execute(_SELECT, (gap.topic, gap.partition, gap.below_offset,
                                      utc(gap.start_ms), utc(gap.end_ms)))
                batch = []
                for event_type, ms, payload, sid, version, topic, partition, offset in cur:
                    batch.append(Event(event_type, ms, payload, sid, version, topic, partition, offset))
                    if len(batch) >= self.batch_size:
                        self.read.inc(len(batch))
                        yield batch
                        batch = []
                if batch:
                    self.read.inc(len(batch))
                    yield batch
        finally:
            conn.close()


class ReadArchivedEvents(beam.PTransform):
    """ArchiveGaps (given at construction) -> batches of Events from ``raw_events``."""

    def __init__(self, dsn: str, gaps: list):
        super().__init__()
        self.dsn, self.gaps = dsn, list(gaps)

    def expand(self, pbegin):
        return (pbegin | "Gaps" >> beam.Create(self.gaps)
                | "ReadGaps" >> beam.ParDo(ReadArchiveGapFn(self.dsn)))
