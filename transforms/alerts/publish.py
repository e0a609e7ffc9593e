"""PublishAlerts: AlertSignals in, one alert per episode out, on Kafka, in Postgres and in Redis.

    signals | PublishAlerts(AlertTargets(brokers, alerts_topic, postgres_dsn, redis_url, retry))

Most signals are in range for a (kind, entity) with no open episode, and
change nothing; so per bundle one query first finds which (kind, entity) of
its in-range signals have an open episode, and an in-range signal with none
(and no out-of-range signal of its (kind, entity) before it in the bundle:
:func:`transforms.alerts.episodes.needs_decision`) is ignored as
``nothing_open`` without a transaction. That is the decision a locked
transaction would have made at the query's time, and it writes nothing, so
no guarantee below depends on it. Every other signal is decided by
:func:`transforms.alerts.episodes.decide` in a
Postgres transaction that holds the (kind, entity) advisory lock; an alert it
makes is a row of ``alerts`` (schemas/postgres.sql) inserted with ``ON
CONFLICT DO NOTHING RETURNING``: the id is deterministic (uuid5 of kind,
entity, window start, status) and a partial unique index allows one open
episode per (kind, entity), so only the worker whose insert returned a row
publishes it, on any run. Postgres is the authority: Beam state plays no part,
so a restart (which re-reads and re-judges windows) never raises an episode twice.

Then, at the end of the bundle, each new alert is produced (Avro, subject
``alert``, key = alert id) to the alerts topic and flushed, pushed to the
Redis list ``RECENT_ALERTS_KEY`` (newest first, trimmed to
``RECENT_ALERTS_KEPT``; a push skips an id the list holds already), and only
then its row is marked ``published``. A crash in between leaves rows
unpublished. Each publisher records its rows under an owner name whose
session advisory lock it holds while it lives; when a publisher starts, and
every SWEEP_EVERY_S, it publishes again the unpublished rows whose owner's
lock is free (a publisher that is gone; a live one's rows are on their way). So the alerts
topic is at-least-once with a stable id (a consumer de-duplicates on
``alert_id``); Postgres and the Redis list hold each alert once.

Outages: each of Postgres, Kafka and Redis has its own circuit breaker
(transforms/sinks/resilience.py); the bundle waits while one is away, nothing
is dropped. Counters (namespace ``Alerts``): raised, resolved,
ignored.<reason>, published, republished.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Iterable, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from confluent_kafka import KafkaException, Producer

from schemas import default_registry
from schemas.postgres import ALERT_LOCK, ALERT_OWNER_LOCK
from schemas.serving import RECENT_ALERTS_KEPT, RECENT_ALERTS_KEY
from schemas.topics import ALERTS_TOPIC
from schemas.wire import encode_avro, plain_parsed, produce_waiting
from transforms.alerts.episodes import (IGNORE, NOTHING_OPEN, RAISE, RESOLVE, LastResolved, OpenEpisode, alert_id,
                                        decide, needs_decision)
from transforms.alerts.signal import AlertSignal
from transforms.sinks.resilience import BreakerCounters, CircuitBreaker, SinkRetryConfig

LOG = logging.getLogger(__name__)

_COLUMNS = ("alert_id", "episode_id", "status", "kind", "severity", "entity_type", "entity_id", "window_seconds",
            "window_start", "window_end", "observed", "expected_low", "expected_high", "message", "created_at")
_INSERTED = _COLUMNS + ("owner",)
_TIMES = ("window_start", "window_end", "created_at")
_SELECT = ", ".join(f"(extract(epoch FROM {c}) * 1000)::bigint" if c in _TIMES else
                    (f"{c}::text" if c in ("alert_id", "episode_id") else c) for c in _COLUMNS)
_INSERT = (f"INSERT INTO alerts ({', '.join(_INSERTED)}) VALUES "
           f"({', '.join('to_timestamp(%s / 1000.0)' if c in _TIMES else '%s' for c in _INSERTED)}) "
           "ON CONFLICT DO NOTHING RETURNING alert_id")

# LPUSH unless an entry of the list already holds this alert id; then LTRIM.
_PUSH_ONCE = """
for _, item in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if string.find(item, ARGV[2], 1, true) then return 0 end
end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
return 1
"""


# How often a publisher looks for rows a gone publisher left unpublished (besides at its start).
SWEEP_EVERY_S = 60


@dataclass(frozen=True)
class AlertTargets:
    """Where alerts go: the topic, Postgres (the authority) and Redis; and how writes ride out outages."""
    brokers: str
    postgres_dsn: str
    redis_url: Optional[str]      # None: no Redis list (a job run without the Redis sink)
    topic: str = ALERTS_TOPIC
    retry: Optional[SinkRetryConfig] = None


class BrokerUnavailable(Exception):
    """Alerts still unacknowledged after a flush attempt."""


def alert_record(signal: AlertSignal, status: str, episode_id: str, created_at_ms: int) -> dict:
    """The Alert record (schemas/avro/alert/v1.avsc) of ``signal``, timestamps as epoch millis."""
    return {"alert_id": alert_id(signal, status), "episode_id": episode_id, "status": status,
            "kind": signal.kind, "severity": signal.severity, "entity_type": signal.entity_type,
            "entity_id": signal.entity_id, "window_seconds": signal.window_seconds,
            "window_start": signal.window_start_ms, "window_end": signal.window_end_ms,
            "observed": float(signal.observed), "expected_low": float(signal.expected_low),
            "expected_high": float(signal.expected_high), "message": signal.message, "created_at": created_at_ms}


class AlertStore:
    """The ``alerts`` table: decides signals into alerts, lists and marks what is unpublished."""

    def __init__(self, conn, owner: str = ""):
        self.conn, self.owner = conn, owner

    def record(self, signal: AlertSignal) -> tuple[str, Optional[dict]]:
        """Decides ``signal`` in one transaction; (action or ignore reason, the new alert or None)."""
        with self.conn, self.conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                        (ALERT_LOCK, f"{signal.kind}:{signal.entity_id}"))
            cur.execute("SELECT alert_id::text, (extract(epoch FROM window_start) * 1000)::bigint FROM alerts "
                        "WHERE kind = %s AND entity_id = %s AND status = 'RAISED' AND resolved_by IS NULL",
                        (signal.kind, signal.entity_id))
            row = cur.fetchone()
            open_episode = OpenEpisode(*row) if row else None
            cur.execute("SELECT (extract(epoch FROM window_start) * 1000)::bigint, "
                        "(extract(epoch FROM window_end) * 1000)::bigint FROM alerts "
                        "WHERE kind = %s AND entity_id = %s AND status = 'RESOLVED' "
                        "ORDER BY window_start DESC LIMIT 1", (signal.kind, signal.entity_id))
            row = cur.fetchone()
            decision = decide(signal, open_episode, LastResolved(*row) if row else None)
            if decision.action == IGNORE:
                return decision.reason, None
            now = int(time.time() * 1000)
            if decision.action == RAISE:
                record = alert_record(signal, "RAISED", alert_id(signal, "RAISED"), now)
                cur.execute(_INSERT, [record[c] for c in _COLUMNS] + [self.owner])
                return (RAISE, record) if cur.fetchone() else ("conflict", None)
            record = alert_record(signal, "RESOLVED", open_episode.alert_id, now)
            cur.execute(_INSERT, [record[c] for c in _COLUMNS] + [self.owner])
            if cur.fetchone() is None:
                return "conflict", None
            cur.execute("UPDATE alerts SET resolved_by = %s WHERE alert_id = %s AND resolved_by IS NULL",
                        (record["alert_id"], open_episode.alert_id))
            return RESOLVE, record

    def open_keys(self, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Which of ``keys`` (kind, entity_id) have an open episode now: one query, no lock."""
        keys = list(keys)
        if not keys:
            return set()
        kinds, entities = zip(*keys)
        with self.conn, self.conn.cursor() as cur:
            cur.execute("SELECT a.kind, a.entity_id FROM alerts a "
                        "JOIN unnest(%s::text[], %s::text[]) AS k(kind, entity_id) "
                        "ON a.kind = k.kind AND a.entity_id = k.entity_id "
                        "WHERE a.status = 'RAISED' AND a.resolved_by IS NULL", (list(kinds), list(entities)))
            return {(kind, entity) for kind, entity in cur.fetchall()}

    def unpublished(self) -> list[dict]:
        """Unpublished rows of this owner (not in flight: a publisher publishes before it sweeps)
        and of owners that are gone (their advisory lock is free)."""
        with self.conn, self.conn.cursor() as cur:
            cur.execute("SELECT DISTINCT owner FROM alerts WHERE NOT published AND owner <> %s", (self.owner,))
            gone = [self.owner]
            for (owner,) in cur.fetchall():
                cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (ALERT_OWNER_LOCK, owner))
                if cur.fetchone()[0]:
                    cur.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (ALERT_OWNER_LOCK, owner))
                    gone.append(owner)
            cur.execute(f"SELECT {_SELECT} FROM alerts WHERE NOT published AND owner = ANY(%s) "
                        "ORDER BY created_at, status", (gone,))
            return [dict(zip(_COLUMNS, row)) for row in cur.fetchall()]

    def mark_published(self, ids: list[str]) -> None:
        with self.conn, self.conn.cursor() as cur:
            cur.execute("UPDATE alerts SET published = true, published_at = now() "
                        "WHERE alert_id = ANY(%s::uuid[])", (ids,))


class PublishAlertsFn(beam.DoFn):
    """Input: AlertSignals. At the end of the bundle decides them in Postgres (those that can
    change nothing with one query for the bundle, the others one transaction each), publishes
    the new alerts to Kafka and Redis and marks them published. Outputs nothing."""

    def __init__(self, targets: AlertTargets):
        self.t = targets
        self.retry = targets.retry or SinkRetryConfig()
        self.raised = Metrics.counter("Alerts", "raised")
        self.resolved = Metrics.counter("Alerts", "resolved")
        self.published = Metrics.counter("Alerts", "published")
        self.republished = Metrics.counter("Alerts", "republished")
        self._ignored: dict = {}
        self.counters = BreakerCounters("Alerts")

    # ---- connections and breakers
    def setup(self):
        from transforms.sinks.postgres_sink import apply_schema, postgres_breaker, sink_connect
        from transforms.sinks.redis_sink import TRANSIENT as REDIS_TRANSIENT
        from transforms.sinks.redis_sink import _client
        self._pg_connect = lambda: sink_connect(self.t.postgres_dsn, self.retry)
        self.conn = None
        self.pg = postgres_breaker("PublishAlerts", self.t.postgres_dsn, self.retry)
        self.pg.call(lambda: apply_schema(self.t.postgres_dsn))
        self.redis_breaker = self.push_once = None
        if self.t.redis_url:
            self.redis = _client(self.t.redis_url, self.retry.probe_timeout_s, self.retry.write_timeout_s)
            self.redis_breaker = CircuitBreaker("PublishAlerts(redis)", self.retry, probe=self.redis.ping,
                                                transient=REDIS_TRANSIENT)
            self.push_once = self.redis.register_script(_PUSH_ONCE)
        self.entry = default_registry().latest("alert")
        self.parsed = plain_parsed(self.entry)
        self.producer = Producer({"bootstrap.servers": self.t.brokers, "linger.ms": 5,
                                  "enable.idempotence": True, "message.timeout.ms": 0})
        self.kafka = CircuitBreaker(f"PublishAlerts({self.t.topic})", self.retry, probe=self._probe_kafka,
                                    transient=(BrokerUnavailable,))
        self.errors: list = []
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self.owner_conn = None
        self.swept_at = 0.0
        self._sweep()

    def _hold_owner_lock(self) -> None:
        """The session advisory lock on our owner name: while it is held, no other publisher
        takes our unpublished rows for a gone publisher's."""
        if self.owner_conn is not None and not self.owner_conn.closed:
            return
        conn = self._pg_connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (ALERT_OWNER_LOCK, self.owner))
        self.owner_conn = conn

    def _sweep(self) -> None:
        """Publishes again the alerts recorded but not published (a publisher died in between)."""
        self.swept_at = time.monotonic()
        self.pg.call(self._hold_owner_lock)
        left = self._store_call(lambda store: store.unpublished())
        if left:
            LOG.warning("publishing %d alerts again that were recorded but not published", len(left))
            self._publish(left)
            self.republished.inc(len(left))

    def teardown(self):
        for conn in (getattr(self, "conn", None), getattr(self, "owner_conn", None)):
            if conn is not None:
                conn.close()

    def _reset_pg(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _store_call(self, what):
        def call():
            if self.conn is None:
                self.conn = self._pg_connect()
            return what(AlertStore(self.conn, self.owner))
        return self.pg.call(call, reset=self._reset_pg)

    def _probe_kafka(self):
        md = self.producer.list_topics(self.t.topic, timeout=self.retry.probe_timeout_s).topics.get(self.t.topic)
        if md is None or md.error is not None:
            raise KafkaException(md.error if md is not None else f"no metadata for {self.t.topic}")

    # ---- the bundle
    def start_bundle(self):
        self.pending: list[AlertSignal] = []

    def process(self, signal: AlertSignal):
        self.pending.append(signal)
        return ()

    def finish_bundle(self):
        # In window order, so that one entity's RAISED comes before its RESOLVED.
        # (sorted is stable: one window's signals of an entity keep their arrival order.)
        signals, self.pending = sorted(self.pending, key=lambda s: (s.window_start_ms, s.kind, s.entity_id)), []
        in_range = {(s.kind, s.entity_id) for s in signals if s.in_range}
        open_keys = self._store_call(lambda store: store.open_keys(in_range)) if in_range else set()
        new = []
        for signal, decided in zip(signals, needs_decision(signals, open_keys)):
            if not decided:
                self._ignore(NOTHING_OPEN)
                continue
            outcome, record = self._store_call(lambda store: store.record(signal))
            if record is not None:
                new.append(record)
                (self.raised if outcome == RAISE else self.resolved).inc()
            else:
                self._ignore(outcome)
        if new:
            self._publish(new)
        if time.monotonic() - self.swept_at > SWEEP_EVERY_S:
            self._sweep()
        self.counters.report(self.pg)
        self.counters.report(self.kafka)
        self.counters.report(self.redis_breaker)

    def _ignore(self, reason: str) -> None:
        counter = self._ignored.get(reason)
        if counter is None:
            counter = self._ignored[reason] = Metrics.counter("Alerts", f"ignored.{reason}")
        counter.inc()

    def _publish(self, records: list[dict]) -> None:
        """Kafka (flushed), then Redis, then the rows marked published."""
        for r in records:
            produce_waiting(self.producer, self.t.topic, encode_avro(self.entry, r, self.parsed),
                            r["alert_id"].encode(), on_delivery=self._on_delivery)
        self.kafka.call(self._flush)
        if self.errors:
            errors, self.errors = self.errors, []
            raise KafkaException(f"{self.t.topic}: {len(errors)} alerts refused: {errors[:3]}")
        for r in records if self.push_once is not None else ():
            text = json.dumps(r, separators=(",", ":"), sort_keys=True)
            self.redis_breaker.call(lambda: self.push_once(keys=[RECENT_ALERTS_KEY],
                                                           args=[text, r["alert_id"], RECENT_ALERTS_KEPT]))
        self._store_call(lambda store: store.mark_published([r["alert_id"] for r in records]))
        self.published.inc(len(records))
        for r in records:
            LOG.info("alert %s %s %s %s: %s", r["status"], r["severity"], r["kind"], r["entity_id"], r["message"])

    def _on_delivery(self, err, _msg):
        if err is not None:
            self.errors.append(err)

    def _flush(self) -> None:
        left = self.producer.flush(self.retry.write_timeout_s)
        if left and not self.errors:
            raise BrokerUnavailable(f"{left} alerts not acknowledged within {self.retry.write_timeout_s:.0f}s")


class PublishAlerts(beam.PTransform):
    """AlertSignals -> (nothing): episodes as alerts on Kafka, in Postgres and in Redis (see the module)."""

    def __init__(self, targets: AlertTargets):
        super().__init__()
        self.targets = targets

    def expand(self, signals):
        return signals | "DecideAndPublish" >> beam.ParDo(PublishAlertsFn(self.targets))
