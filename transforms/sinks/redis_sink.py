"""Redis sink: real-time window values for dashboards and adaptive features.

Each (window, family, entity) is one hash::

    analytics:<window label>:<window start, epoch ms>:<family>:<entity>
      -> {metric: value, ..., pane_timing, pane_index, window_end}

written with one pipelined round trip per pane and a TTL per window size, so
old windows expire by themselves. An accumulating pane carries the full value,
so writing it again (a refire, a replay, a retry) overwrites, never adds.
``analytics:<label>:latest`` holds the start of the newest window written.
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam
import redis
from apache_beam.metrics import Metrics

from transforms.aggregate import WindowAggregate, window_label

# How long values stay readable after a write, per window size (seconds).
DEFAULT_TTL_S = {60: 2 * 3600, 300: 12 * 3600, 3600: 3 * 86400, 86400: 8 * 86400}


def metric_key(prefix: str, window_seconds: int, window_start_ms: int, family: str, entity: str) -> str:
    return f"{prefix}:{window_label(window_seconds)}:{window_start_ms}:{family}:{entity}"


class WriteMetricsToRedisFn(beam.DoFn):
    """Input: a WindowAggregate. Writes its rows as hashes with a TTL; outputs nothing."""

    def __init__(self, url: str, prefix: str = "analytics", ttl_s: Optional[dict] = None):
        self.url, self.prefix = url, prefix
        self.ttl_s = dict(DEFAULT_TTL_S, **(ttl_s or {}))
        self.written = Metrics.counter("WriteMetricsToRedis", "hashes_written")

    def setup(self):
        self.client = redis.Redis.from_url(self.url, socket_timeout=10)

    def teardown(self):
        self.client.close()

    def process(self, agg: WindowAggregate):
        ttl = self.ttl_s.get(agg.window_seconds, 2 * agg.window_seconds + 3600)
        pipe = self.client.pipeline(transaction=False)
        for row in agg.rows:
            key = metric_key(self.prefix, agg.window_seconds, agg.window_start_ms, row.family, row.entity_id)
            pipe.hset(key, mapping=dict(row.metrics, pane_timing=agg.pane_timing,
                                        pane_index=agg.pane_index, window_end=agg.window_end_ms))
            pipe.expire(key, ttl)
        latest = f"{self.prefix}:{window_label(agg.window_seconds)}:latest"
        pipe.set(latest, agg.window_start_ms, ex=ttl, nx=True)
        pipe.execute()
        # Only move "latest" forward: a late pane of an old window must not pull it back.
        current = self.client.get(latest)
        if current is not None and int(current) < agg.window_start_ms:
            self.client.set(latest, agg.window_start_ms, ex=ttl)
        self.written.inc(len(agg.rows))
        return ()


class WriteMetricsToRedis(beam.PTransform):
    """WindowAggregates -> (nothing): real-time values in Redis."""

    def __init__(self, url: str, prefix: str = "analytics", ttl_s: Optional[dict] = None):
        super().__init__()
        self.url, self.prefix, self.ttl_s = url, prefix, ttl_s

    def expand(self, aggregates):
        return aggregates | "PipelinedHset" >> beam.ParDo(
            WriteMetricsToRedisFn(self.url, self.prefix, self.ttl_s))
