"""Redis sink: real-time window values for dashboards and adaptive features.

Each (window, family, entity) is one hash::

    analytics:<window label>:<window start, epoch ms>:<family>:<entity>
      -> {metric: value, ..., pane_timing, pane_index, window_end}

written by a Lua script (:data:`_PANE_LUA`) that takes the pane's rows as one
JSON argument, with a TTL per window size, so old windows expire by themselves.
An accumulating pane carries the full value, so writing it again (a refire, a
replay, a retry) overwrites, never adds. ``analytics:<label>:latest`` holds the
start of the newest window written; the same script only ever moves it forward.

Why a script: redis-py packs every argument of every command in Python, and
an HSET with a mapping plus an EXPIRE per row cost more of the worker's time
than the rest of the sink; one EVALSHA per (up to :data:`ROWS_PER_CALL` rows
of a) pane is a few arguments whatever the pane's size. Values are formatted
here as redis-py would (``repr`` of a number), so readers see the same strings.

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

import json
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


# Rows per EVALSHA: a script runs alone on the server, so a day window's
# on-time pane of every user is split into calls of this many rows (one
# pipelined round trip still), and no reader waits long behind it.
ROWS_PER_CALL = 1000

# KEYS: the ``latest`` key of the pane's window size, or none (not the last
# call of the pane). ARGV: TTL s, window start ms, pane_timing, pane_index,
# window_end, then the rows as one JSON array of [key, field, value, field,
# value, ...] (values already strings). Each row's hash gets the pane's three
# fields after its metrics (the order redis-py's HSET mapping gave them), and
# the TTL. ``latest`` is set to the window start unless it holds a later one.
_PANE_LUA = """
local ttl, start = ARGV[1], ARGV[2]
local rows = cjson.decode(ARGV[6])
for i = 1, #rows do
  local row = rows[i]
  local n = #row
  row[n + 1] = 'pane_timing'; row[n + 2] = ARGV[3]
  row[n + 3] = 'pane_index'; row[n + 4] = ARGV[4]
  row[n + 5] = 'window_end'; row[n + 6] = ARGV[5]
  redis.call('HSET', unpack(row))
  redis.call('EXPIRE', row[1], ttl)
end
if KEYS[1] then
  local current = tonumber(redis.call('GET', KEYS[1]))
  if current == nil or current < tonumber(start) then
    redis.call('SET', KEYS[1], start, 'EX', ttl)
  end
end
return #rows
"""


def pane_rows_json(agg: WindowAggregate, prefix: str, rows: list) -> str:
    """``rows`` of ``agg`` as :data:`_PANE_LUA`'s JSON: [[key, field, value, ...], ...]."""
    label = window_label(agg.window_seconds)
    out = []
    for row in rows:
        fields = [window_key(label, agg.window_start_ms, row.family, row.entity_id, prefix)]
        for name, value in row.metrics.items():
            fields.append(name)
            # As redis-py's Encoder writes a value: a number as its repr, a string as is.
            fields.append(value if value.__class__ is str else repr(value))
        out.append(fields)
    # Not ASCII-escaped: the script's cjson keeps UTF-8 bytes as they are.
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


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
            self._load_scripts()
        try:
            self._pipeline(agg).execute()
        except redis.exceptions.NoScriptError:
            # Redis restarted (or its script cache was flushed) since we loaded them.
            self._load_scripts()
            self._pipeline(agg).execute()

    def _load_scripts(self) -> None:
        self.pane_sha = self.client.script_load(_PANE_LUA)
        self.hardest_sha = self.client.script_load(_HARDEST_LUA)

    def _pipeline(self, agg: WindowAggregate):
        """The pane's EVALSHAs, queued: its rows in calls of ROWS_PER_CALL, the last
        one moving ``latest``; then, for an hour pane, the hardest-concepts script."""
        ttl = self.ttl_s.get(agg.window_seconds, 2 * agg.window_seconds + 3600)
        latest = latest_window_key(window_label(agg.window_seconds), self.prefix)
        # Not Script objects: in a pipeline, redis-py asks SCRIPT EXISTS first, one more round trip.
        pipe = self.client.pipeline(transaction=False)
        rows = agg.rows
        for at in range(0, max(len(rows), 1), ROWS_PER_CALL):
            last = at + ROWS_PER_CALL >= len(rows)
            pipe.evalsha(self.pane_sha, 1 if last else 0, *([latest] if last else []),
                         ttl, agg.window_start_ms, agg.pane_timing, agg.pane_index, agg.window_end_ms,
                         pane_rows_json(agg, self.prefix, rows[at:at + ROWS_PER_CALL]))
        if agg.window_seconds == HARDEST_WINDOW_S:
            # Every hour pane, with concept rows or without: a newer hour replaces the set.
            pipe.evalsha(self.hardest_sha, len(self.hardest_keys), *self.hardest_keys,
                         agg.window_start_ms, ttl, *hardest_concepts_args(agg))
        return pipe


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
