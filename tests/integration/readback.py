"""Reading back what the pipeline wrote: Postgres rows, Redis hashes, Kafka records."""
from __future__ import annotations

import uuid

import psycopg2
import redis
from confluent_kafka import Consumer, TopicPartition

from schemas import default_registry
from schemas.wire import decode_avro

LABELS = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}


def postgres_metrics(dsn: str) -> dict:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT window_seconds, (extract(epoch FROM window_start) * 1000)::bigint, "
                    "family, entity_id, metrics FROM window_metrics")
        return {(s, w, f, e): m for s, w, f, e, m in cur.fetchall()}


def postgres_scalar(dsn: str, sql: str):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


def redis_metrics(url: str) -> dict:
    r = redis.Redis.from_url(url, decode_responses=True)
    out = {}
    for key in r.scan_iter("analytics:*", count=5000):
        parts = key.split(":")
        if len(parts) != 5:
            continue  # the "latest" pointers
        _, label, start, family, entity = parts
        h = r.hgetall(key)
        out[(LABELS[label], int(start), family, entity)] = {
            k: float(v) for k, v in h.items() if k not in ("pane_timing", "pane_index", "window_end")}
    return out


def topic_records(brokers: str, topic: str) -> list[tuple[object, dict]]:
    """Every record of ``topic``, decoded with the registry: [(message, record)]."""
    reg = default_registry()
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"readback-{uuid.uuid4()}",
                  "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        bounds = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts}
        ends = {p: high for p, (_, high) in bounds.items()}
        c.assign([TopicPartition(topic, p, low) for p, (low, _) in bounds.items()])
        out, pending = [], {p for p, (low, high) in bounds.items() if high > low}
        while pending:
            msgs = c.consume(1000, timeout=5)
            if not msgs:
                raise AssertionError(f"{topic}: could not read to the end ({pending} pending)")
            for m in msgs:
                rec = decode_avro(m.value(), reg)[1]
                out.append((m, rec))
                if m.offset() + 1 >= ends[m.partition()]:
                    pending.discard(m.partition())
        return out
    finally:
        c.close()
