"""Sinks of the pipelines: Redis, Postgres and Kafka. All idempotent.

Each retries a failed write and then holds it behind a circuit breaker while
its service is away (``resilience.py``); ``SinkRetryConfig`` sets the timings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import apache_beam as beam

from transforms.sinks.kafka_sink import PublishAggregates
from transforms.sinks.postgres_sink import WriteMetricsToPostgres
from transforms.sinks.redis_sink import WriteMetricsToRedis
from transforms.sinks.resilience import SinkRetryConfig

__all__ = ["AggregateSinks", "SinkRetryConfig", "WriteAggregates"]


@dataclass(frozen=True)
class AggregateSinks:
    """Where aggregates go; a sink left as None is not written."""
    redis_url: Optional[str] = None
    postgres_dsn: Optional[str] = None
    postgres_table: str = "window_metrics"       # a replay writes window_metrics_replay
    kafka_brokers: Optional[str] = None
    kafka_topic: str = "analytics.aggregated.v1"
    retry: SinkRetryConfig = SinkRetryConfig()   # retries, back-off and probes of every sink

    def any(self) -> bool:
        return bool(self.redis_url or self.postgres_dsn or self.kafka_brokers)


class WriteAggregates(beam.PTransform):
    """WindowAggregates -> (nothing): written to every configured sink."""

    def __init__(self, sinks: AggregateSinks):
        super().__init__()
        self.sinks = sinks

    def expand(self, aggregates):
        s = self.sinks
        if s.redis_url:
            aggregates | "Redis" >> WriteMetricsToRedis(s.redis_url, retry=s.retry)
        if s.postgres_dsn:
            aggregates | "Postgres" >> WriteMetricsToPostgres(s.postgres_dsn, s.postgres_table, retry=s.retry)
        if s.kafka_brokers:
            aggregates | "Kafka" >> PublishAggregates(s.kafka_brokers, s.kafka_topic, retry=s.retry)
