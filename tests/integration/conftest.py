"""Fixtures for integration tests: the real services of scripts/stack.sh, isolated per test.

Each test gets its own topics (same names plus a suffix, same partition
counts), its own Postgres schema (through search_path in the DSN) and its own
Redis database, so tests neither see nor disturb each other or a demo.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import psycopg2
import pytest
import redis
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

BROKERS = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
PG_BASE = os.environ.get("POSTGRES_DSN", "postgresql://analytics:analytics@127.0.0.1:5432/analytics")
REDIS_BASE = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOPICS = {"learning": ("learning.events.v1", 6), "content": ("content.events.v1", 3),
          "engagement": ("engagement.events.v1", 3), "dlq": ("analytics.dlq.v1", 1),
          "aggregated": ("analytics.aggregated.v1", 3)}


@dataclass
class Stack:
    suffix: str
    topics: dict          # logical name -> real topic name
    dsn: str
    redis_url: str
    group_id: str

    def topic_for(self, base_topic: str) -> str:
        return f"{base_topic}.{self.suffix}"

    def event_topics(self) -> str:
        return ",".join(self.topics[k] for k in ("learning", "content", "engagement"))

    def pipeline_args(self, **extra) -> list[str]:
        args = {"brokers": BROKERS, "topics": self.event_topics(), "dlq_topic": self.topics["dlq"],
                "aggregates_topic": self.topics["aggregated"], "group_id": self.group_id,
                "redis_url": self.redis_url, "postgres_dsn": self.dsn}
        args.update(extra)
        return [f"--{k}={v}" for k, v in args.items()]

    def run_streaming(self, timeout: float = 300, **extra) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "pipelines.streaming", *self.pipeline_args(**extra)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr[-5000:], sep="\n")
        return proc


def _reachable() -> str | None:
    try:
        c = Consumer({"bootstrap.servers": BROKERS, "group.id": "probe"})
        c.list_topics(timeout=5)
        c.close()
        redis.Redis.from_url(REDIS_BASE + "/0", socket_connect_timeout=3).ping()
        psycopg2.connect(PG_BASE, connect_timeout=5).close()
    except (KafkaException, redis.RedisError, psycopg2.Error) as e:
        return str(e)
    return None


@pytest.fixture(scope="session")
def services():
    problem = _reachable()
    if problem:
        pytest.fail(f"the local stack is not up ({problem}); run scripts/stack.sh up", pytrace=False)


# Redis has 16 databases; 0 is the demo's. A test's database is flushed and
# handed back when it ends.
_free_redis_dbs = list(range(1, 16))


@contextlib.contextmanager
def isolated_stack():
    """Own topics, Postgres schema and Redis database, removed afterwards."""
    suffix = uuid.uuid4().hex[:10]
    topics = {k: f"{name}.{suffix}" for k, (name, _) in TOPICS.items()}
    admin = AdminClient({"bootstrap.servers": BROKERS})
    futures = admin.create_topics([NewTopic(topics[k], n, 1) for k, (_, n) in TOPICS.items()])
    for f in futures.values():
        f.result(30)
    schema = f"it_{suffix}"
    with psycopg2.connect(PG_BASE) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    db = _free_redis_dbs.pop(0)
    redis_url = f"{REDIS_BASE}/{db}"
    redis.Redis.from_url(redis_url).flushdb()
    time.sleep(1)  # let topic metadata settle before producers and consumers use it
    try:
        yield Stack(suffix, topics, f"{PG_BASE}?options=-csearch_path%3D{schema}", redis_url, f"it-{suffix}")
    finally:
        admin.delete_topics(list(topics.values()))
        with psycopg2.connect(PG_BASE) as conn, conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")
        redis.Redis.from_url(redis_url).flushdb()
        _free_redis_dbs.append(db)


@pytest.fixture(scope="module")
def stack(services):
    with isolated_stack() as s:
        yield s


@pytest.fixture
def fresh_stack(services):
    """A stack of its own for one test (restart and kill trials)."""
    with isolated_stack() as s:
        yield s
