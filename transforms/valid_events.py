"""ReadValidEvents: Kafka offsets in, validated events and dead letters out.

The first half of both jobs, streaming and replay:

    decoded = p | ReadValidEvents(config, partitions, max_future_ms=300_000)
    decoded.events        # batches of Event, in event time
    decoded.dead_letters  # one DeadLetter per record that failed validation

Both steps are ParDos on the reader's output, so a runner fuses them with the
reader: a streaming job commits a batch's offsets only once whatever consumes
these outputs in the same stage has finished with them.
"""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam

from transforms.decode import DecodeAndValidate, DecodeResult
from transforms.kafka_read import KafkaReadConfig, PartitionSpec, ReadEvents


class ReadValidEvents(beam.PTransform):
    """PBegin -> DecodeResult(events=batches of Event, dead_letters=DeadLetters).

    ``partitions``: where each partition starts (and, for a bounded read,
    stops); ``max_future_ms``: how far ahead of the clock an event time may be
    before the event is a dead letter.
    """

    def __init__(self, config: KafkaReadConfig, partitions: Iterable[PartitionSpec], max_future_ms: int):
        super().__init__()
        self.config, self.partitions, self.max_future_ms = config, list(partitions), max_future_ms

    def expand(self, pbegin: beam.pvalue.PBegin) -> DecodeResult:
        return (pbegin | "ReadEvents" >> ReadEvents(self.config, partitions=self.partitions)
                | "DecodeAndValidate" >> DecodeAndValidate(max_future_ms=self.max_future_ms))
