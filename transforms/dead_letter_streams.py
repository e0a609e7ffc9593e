"""PublishDeadLetterStreams: every stream of dead letters of a job, to the dead-letter topic.

A job refuses records at several steps (validation, lateness, folding, the
archive); each step's dead letters are one stream:

    {"": decoded.dead_letters, "TooLate": windowed.too_late} | PublishDeadLetterStreams(
        DeadLetterTopic(brokers, "analytics.dlq.v1"), already_published=point.dead_lettered)

Each stream gets its own producer step rather than a Flatten into one: a
Flatten would start a stage of its own on some runners, and each producer
must stay fused with the step that made its dead letters, so that a streaming
job commits a batch's offsets only once that batch's dead letters are flushed
(the invariant "one dead letter per record, also across restarts").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import apache_beam as beam
from apache_beam.pvalue import PCollection

from schemas.topics import DLQ_TOPIC
from transforms.resume import SkipPublishedDeadLetters
from transforms.sinks.kafka_sink import PublishDeadLetters
from transforms.sinks.resilience import SinkRetryConfig


@dataclass(frozen=True)
class DeadLetterTopic:
    """Where dead letters go, and how a write rides out a broker outage."""
    brokers: str
    topic: str = DLQ_TOPIC
    retry: Optional[SinkRetryConfig] = None


class PublishDeadLetterStreams(beam.PTransform):
    """{label: PCollection of DeadLetter} -> (nothing): each published by its own producer.

    The steps are ``SkipPublished<label>`` and ``PublishDeadLetters<label>``.
    ``already_published``: (topic, partition, offset) of source records an
    earlier run already dead-lettered (transforms.resume); they are not
    published again.
    """

    def __init__(self, target: DeadLetterTopic, already_published: frozenset = frozenset()):
        super().__init__()
        self.target, self.already_published = target, already_published

    def expand(self, streams: Mapping[str, PCollection]) -> None:
        t = self.target
        for label, letters in streams.items():
            (letters | f"SkipPublished{label}" >> SkipPublishedDeadLetters(self.already_published)
             | f"PublishDeadLetters{label}" >> PublishDeadLetters(t.brokers, t.topic, t.retry))
