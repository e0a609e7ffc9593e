"""What the pipeline produced: aggregates by window size, dead letters by error code.

    python -m scripts.summary [--brokers ...] [--redis_url ...] [--postgres_dsn ...] [--dlq_topic ...]

Reads Postgres (window_metrics, raw_events), Redis (real-time keys) and the
dead-letter topic (every record on it, with a throwaway consumer group).
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter

import psycopg2
import redis
from confluent_kafka import Consumer, TopicPartition

from schemas import default_registry
from schemas.serving import HARDEST_CONCEPTS_KEY
from schemas.settings import setting
from schemas.topics import DLQ_TOPIC
from schemas.wire import decode_avro


def dead_letters_by_code(brokers: str, topic: str, timeout_s: float = 60.0) -> Counter:
    """Error codes of every record on ``topic``, read from its first retained offset."""
    reg = default_registry()
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"summary-{uuid.uuid4()}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    counts: Counter = Counter()
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        bounds = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in parts}
        consumer.assign([TopicPartition(topic, p, low) for p, (low, _) in bounds.items()])
        pending = {p for p, (low, high) in bounds.items() if high > low}
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for m in consumer.consume(1000, timeout=1):
                if m.error():
                    continue
                counts[decode_avro(m.value(), reg)[1]["error_code"]] += 1
                if m.offset() + 1 >= bounds[m.partition()][1]:
                    pending.discard(m.partition())
        if pending:
            print(f"(dead letters: stopped after {timeout_s:.0f}s with partitions {sorted(pending)} unread)",
                  file=sys.stderr)
    finally:
        consumer.close()
    return counts


def print_alerts(cur, limit: int = 10) -> None:
    """The newest alerts (Postgres ``alerts``), one line each, and the sentence of each raised one."""
    cur.execute("SELECT to_regclass('alerts') IS NOT NULL")
    if not cur.fetchone()[0]:
        return
    cur.execute("SELECT count(*) FILTER (WHERE status = 'RAISED'), count(*) FILTER (WHERE status = 'RESOLVED') "
                "FROM alerts")
    raised, resolved = cur.fetchone()
    print(f"\nalerts (Postgres alerts, newest first): {raised} raised, {resolved} resolved")
    cur.execute("""SELECT status, severity, kind, entity_id, window_start, window_seconds, message
                   FROM alerts ORDER BY window_start DESC, status DESC LIMIT %s""", (limit,))
    for status, severity, kind, entity, start, seconds, message in cur.fetchall():
        print(f"  {status:8s} {severity:8s} {kind:22s} {entity:22s} {start:%H:%M:%S}+{seconds}s")
        if status == "RAISED":
            print(f"           {message}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.summary", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--brokers", default=setting("KAFKA_BROKERS"), help="Kafka bootstrap servers [KAFKA_BROKERS]")
    ap.add_argument("--redis_url", default=setting("REDIS_URL"), help="where the real-time values are [REDIS_URL]")
    ap.add_argument("--postgres_dsn", default=setting("POSTGRES_DSN"),
                    help="holds raw_events and window_metrics [POSTGRES_DSN]")
    ap.add_argument("--dlq_topic", default=DLQ_TOPIC, help="the dead-letter topic")
    a = ap.parse_args(argv)

    with psycopg2.connect(a.postgres_dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT event_type) FROM raw_events")
        events, types = cur.fetchone()
        print(f"raw_events: {events:,} archived events of {types} types")
        cur.execute("""
            SELECT window_seconds, count(DISTINCT window_start), count(*),
                   sum((metrics->>'events')::float) FILTER (WHERE family = 'overall'),
                   sum((metrics->>'answers')::float) FILTER (WHERE family = 'overall'),
                   sum((metrics->>'correct')::float) FILTER (WHERE family = 'overall')
            FROM window_metrics GROUP BY 1 ORDER BY 1""")
        print("\naggregates in Postgres (window_metrics):")
        print(f"  {'window':>8} {'windows':>8} {'rows':>8} {'events':>10} {'answers':>9} {'accuracy':>9}")
        for size, windows, rows, ev, answers, correct in cur.fetchall():
            acc = f"{correct / answers:.3f}" if answers else "-"
            print(f"  {size:>7}s {windows:>8,} {rows:>8,} {int(ev or 0):>10,} {int(answers or 0):>9,} {acc:>9}")
        cur.execute("""SELECT window_seconds, family, count(*) FROM window_metrics
                       GROUP BY 1, 2 ORDER BY 1, 2""")
        by_family = Counter()
        for size, family, n in cur.fetchall():
            by_family[family] += n
        print("  rows by family: " + ", ".join(f"{f} {n:,}" for f, n in sorted(by_family.items())))
        print_alerts(cur)

    r = redis.Redis.from_url(a.redis_url)
    keys = Counter(k.split(b":")[1].decode() for k in r.scan_iter("analytics:*", count=5000)
                   if not k.endswith(b":latest"))
    windows = {w: n for w, n in keys.items() if w[:-1].isdigit()}
    print("\nreal-time keys in Redis: " + (", ".join(f"{w} {n:,}" for w, n in sorted(windows.items()))
                                          or "none") + f"; learner profiles {keys.get('profile', 0):,}")
    hardest = r.zrange(HARDEST_CONCEPTS_KEY, 0, 4, withscores=True)
    if hardest:
        print("  hardest concepts now: " + ", ".join(f"{c.decode()} {acc:.0%}" for c, acc in hardest))

    dl = dead_letters_by_code(a.brokers, a.dlq_topic)
    print(f"\ndead letters on {a.dlq_topic}: {sum(dl.values()):,}")
    for code, n in dl.most_common():
        print(f"  {code:22s} {n:>8,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
