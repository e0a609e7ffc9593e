"""Redis sink: real-time window values for dashboards and adaptive features.

Each (window, family, entity) is one hash::

    analytics:<window label>:<window start, epoch ms>:<family>:<entity>
      -> {metric: value, ..., pane_timing, pane_index, window_end}

written with one pipelined round trip per pane and a TTL per window size, so
old windows expire by themselves. An accumulating pane carries the full value,
so writing it again (a refire, a replay, a retry) overwrites, never adds.
``analytics:<label>:latest`` holds the start of the newest window written.

The hardest concepts now: the sorted set ``schemas.serving.HARDEST_CONCEPTS_KEY``
(concept -> accuracy, lowest first) of the newest hour window, written with
each 1-hour pane by one Lua script (atomic, so parallel writers agree):
concepts with fewer than :data:`HARDEST_MIN_ANSWERS` answers are left out, a
pane of a newer hour replaces the set, a late pane of an older hour leaves it
alone (``HARDEST_CONCEPTS_WINDOW_KEY`` holds the hour it is of). A dashboard
reads it with ``ZRANGE analytics:concepts:hardest 0 9 WITHSCORES``.

When Redis is away, a pane's write is retried on a new client, then held by
the DoFn's circuit breaker until Redis answers a PING again (see
``transforms/sinks/resilience.py``): the bundle waits, nothing is dropped.
"""
from __future__ import annotations

import time
from typing import Optional

import apache_beam as beam
import redis
from apache_beam.metrics import Metrics
from redis.backoff import NoBackoff
from redis.retry import Retry

from schemas.serving import HARDEST_CONCEPTS_KEY, HARDEST_CONCEPTS_WINDOW_KEY, latest_window_key, window_key
from transforms.aggregate import CONCEPT, WindowAggregate, window_label
from transforms.sinks.resilience import BreakerCounters, CircuitBreaker, SinkRetryConfig
from transforms.sinks.written import PaneWritten

# How long values stay readable after a write, per window size (seconds).
DEFAULT_TTL_S = {60: 2 * 3600, 300: 12 * 3600, 3600: 3 * 86400, 86400: 8 * 86400}


# The hardest concepts are those of the hour window; a concept counts once it
# has this many answers in it, so that one wrong answer does not top the set.
HARDEST_WINDOW_S = 3600
HARDEST_MIN_ANSWERS = 20

# KEYS: the set, its window key. ARGV: window start ms, TTL s, then concept,
# accuracy pairs ("" as accuracy: not (yet) enough answers, so not in the set).
_HARDEST_LUA = """
local current = tonumber(redis.call('GET', KEYS[2]))
local start = tonumber(ARGV[1])
if current and start < current then return 0 end
if current == nil or start > current then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[1])
end
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '' then redis.call('ZREM', KEYS[1], ARGV[i])
  else redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""


def hardest_concepts_args(agg: WindowAggregate) -> list:
    """The concept rows of an hour pane as the script's (concept, accuracy or "") pairs."""
    args: list = []
    for row in agg.rows:
        if row.family == CONCEPT:
            m = row.metrics
            enough = m.get("answers", 0) >= HARDEST_MIN_ANSWERS and "accuracy" in m
            args += [row.entity_id, repr(m["accuracy"]) if enough else ""]
    return args


def metric_key(prefix: str, window_seconds: int, window_start_ms: int, family: str, entity: str) -> str:
    return window_key(window_label(window_seconds), window_start_ms, family, entity, prefix)


# Errors that mean "Redis is not there" (BusyLoadingError, a restart reading its
# snapshot, is a ConnectionError); anything else fails the bundle.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)


def _client(url: str, connect_timeout_s: float, socket_timeout_s: float) -> redis.Redis:
    # No retries inside the client: the breaker owns retrying (redis-py's own
    # default would back off for up to a minute before we ever saw the error).
    return redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                socket_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0))


class WriteMetricsToRedisFn(beam.DoFn):
    """Input: a WindowAggregate. Writes its rows as hashes with a TTL; outputs nothing.

    A write that fails on the connection is retried on a new client, and
    while Redis stays away the DoFn's circuit breaker holds it (blocking the
    bundle) until a PING answers.
    """

    def __init__(self, url: str, prefix: str = "analytics", ttl_s: Optional[dict] = None,
                 retry: Optional[SinkRetryConfig] = None):
        self.url, self.prefix = url, prefix
        self.hardest_keys = [HARDEST_CONCEPTS_KEY, HARDEST_CONCEPTS_WINDOW_KEY]
        self.ttl_s = dict(DEFAULT_TTL_S, **(ttl_s or {}))
        self.retry = retry or SinkRetryConfig()
        self.written = Metrics.counter("WriteMetricsToRedis", "hashes_written")
        self.counters = BreakerCounters("WriteMetricsToRedis")
        self.panes = PaneWritten("WriteMetricsToRedis")

    def setup(self):
        self.client: Optional[redis.Redis] = None
        self.breaker = CircuitBreaker(f"WriteMetricsToRedis({_where(self.url)})", self.retry,
                                      probe=self._probe, transient=TRANSIENT)

    def teardown(self):
        self._reset()

    def _probe(self) -> None:
        c = _client(self.url, self.retry.probe_timeout_s, self.retry.probe_timeout_s)
        try:
            c.ping()
        finally:
            c.close()

    def _reset(self) -> None:
        """Drops the client and its pooled connections; the next write makes a new one."""
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            client.close()

    def process(self, agg: WindowAggregate):
        began = time.monotonic()
        self.breaker.call(lambda: self._write(agg), reset=self._reset)
        self.panes.observe(agg, time.monotonic() - began)
        self.written.inc(len(agg.rows))
        self.counters.report(self.breaker)
        return ()

    def _write(self, agg: WindowAggregate) -> None:
        """One pane in one pipelined round trip; idempotent, so a retry may repeat it whole."""
        if self.client is None:
            self.client = _client(self.url, self.retry.probe_timeout_s, self.retry.write_timeout_s)
            self.hardest = self.client.register_script(_HARDEST_LUA)
        ttl = self.ttl_s.get(agg.window_seconds, 2 * agg.window_seconds + 3600)
        pipe = self.client.pipeline(transaction=False)
        for row in agg.rows:
            key = metric_key(self.prefix, agg.window_seconds, agg.window_start_ms, row.family, row.entity_id)
            pipe.hset(key, mapping=dict(row.metrics, pane_timing=agg.pane_timing,
                                        pane_index=agg.pane_index, window_end=agg.window_end_ms))
            pipe.expire(key, ttl)
        latest = latest_window_key(window_label(agg.window_seconds), self.prefix)
        pipe.set(latest, agg.window_start_ms, ex=ttl, nx=True)
        if agg.window_seconds == HARDEST_WINDOW_S:
            # Every hour pane, with concept rows or without: a newer hour replaces the set.
            self.hardest(keys=self.hardest_keys, args=[agg.window_start_ms, ttl, *hardest_concepts_args(agg)],
                         client=pipe)
        pipe.execute()
        # Only move "latest" forward: a late pane of an old window must not pull it back.
        current = self.client.get(latest)
        if current is not None and int(current) < agg.window_start_ms:
            self.client.set(latest, agg.window_start_ms, ex=ttl)


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials, for log lines."""
    return url.split("@")[-1].split("://")[-1]


class WriteMetricsToRedis(beam.PTransform):
    """WindowAggregates -> (nothing): real-time values in Redis."""

    def __init__(self, url: str, prefix: str = "analytics", ttl_s: Optional[dict] = None,
                 retry: Optional[SinkRetryConfig] = None):
        super().__init__()
        self.url, self.prefix, self.ttl_s, self.retry = url, prefix, ttl_s, retry

    def expand(self, aggregates):
        return aggregates | "PipelinedHset" >> beam.ParDo(
            WriteMetricsToRedisFn(self.url, self.prefix, self.ttl_s, self.retry))
