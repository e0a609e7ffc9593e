"""Fixtures for integration tests: the real services of scripts/stack.sh, isolated per test.

Each test gets its own topics (same names plus a suffix, same partition
counts), its own Postgres schema (through search_path in the DSN) and its own
Redis database, so tests neither see nor disturb each other or a demo.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import psycopg2
import pytest
import redis
from confluent_kafka import Consumer, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.settings import setting
from schemas.topics import AGGREGATES_TOPIC, ALERTS_TOPIC, DLQ_TOPIC, EVENT_TOPICS, PARTITIONS

BROKERS = setting("KAFKA_BROKERS")
PG_BASE = setting("POSTGRES_DSN")
REDIS_BASE = setting("REDIS_URL").rsplit("/", 1)[0]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# logical name -> (topic, partitions); a test's copies get a suffix
TOPICS = {**{name.split(".")[0]: (name, PARTITIONS[name]) for name in EVENT_TOPICS},
          "dlq": (DLQ_TOPIC, PARTITIONS[DLQ_TOPIC]), "aggregated": (AGGREGATES_TOPIC, PARTITIONS[AGGREGATES_TOPIC]),
          "alerts": (ALERTS_TOPIC, PARTITIONS[ALERTS_TOPIC])}


@dataclass
class Stack:
    suffix: str
    topics: dict          # logical name -> real topic name
    dsn: str
    redis_url: str
    group_id: str
    brokers: str = BROKERS
    pg_base: str = PG_BASE   # the server's DSN, without the schema

    def topic_for(self, base_topic: str) -> str:
        return f"{base_topic}.{self.suffix}"

    def event_topics(self) -> str:
        return ",".join(self.topics[k] for k in ("learning", "content", "engagement"))

    def produce(self, config) -> list:
        """Generates the stream of ``config`` (a scripts.produce.TrafficConfig), sends it to
        this stack's topics and returns what was sent (each record with its real topic)."""
        from scripts.produce import generate, produce  # imported here: most fixtures need neither
        records = [r._replace(topic=self.topic_for(r.topic)) for r in generate(config)]
        produce(iter(records), self.brokers)
        return records

    def pipeline_args(self, **extra) -> list[str]:
        args = {"brokers": self.brokers, "topics": self.event_topics(), "dlq_topic": self.topics["dlq"],
                "aggregates_topic": self.topics["aggregated"], "alerts_topic": self.topics["alerts"],
                "group_id": self.group_id,
                "redis_url": self.redis_url, "postgres_dsn": self.dsn,
                # No HTTP service unless a test asks (http_port=...): jobs run side by side.
                "http_port": 0}
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
# handed back when it ends. Claimed with a lock file, so that test runs in
# other processes (helpers, a second pytest) never get the same database: each
# flushes its database at its start and end.
_free_redis_dbs = list(range(1, 16))
_REDIS_LOCKS = os.path.join(tempfile.gettempdir(), "analytics-test-redis-db-{db}.lock")


def _claim_redis_db() -> tuple[int, object]:
    """A database of the pool that no other process holds, and its lock (kept open)."""
    for _ in range(600):
        for db in sorted(_free_redis_dbs, reverse=True):  # the highest first: runs of an older conftest take from 1 up
            f = open(_REDIS_LOCKS.format(db=db), "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            _free_redis_dbs.remove(db)
            return db, f
        time.sleep(0.5)
    raise RuntimeError("no free Redis database for the test (all 15 held by other test processes)")


@contextlib.contextmanager
def isolated_stack(*, brokers: str = BROKERS, pg_base: str = PG_BASE, redis_base: str = REDIS_BASE,
                   suffix: str | None = None, schema: str | None = None,
                   redis_db: int | None = None, problems: list[str] | None = None):
    """Own topics, Postgres schema and Redis database, removed afterwards.

    The tests call it without arguments. Other callers (scripts/benchmark,
    scripts/chaos on servers of its own) may name the servers (``brokers``,
    ``pg_base``, ``redis_base``), the suffix, the schema and the Redis DB (then not one of
    the pool's), and pass ``problems``: then every cleanup step runs, waiting
    for the topics' deletion, and its failures are appended there, not raised.
    """
    suffix = suffix or uuid.uuid4().hex[:10]
    topics = {k: f"{name}.{suffix}" for k, (name, _) in TOPICS.items()}
    admin = AdminClient({"bootstrap.servers": brokers})
    futures = admin.create_topics([NewTopic(topics[k], n, 1) for k, (_, n) in TOPICS.items()])
    for f in futures.values():
        f.result(30)
    schema = schema or f"it_{suffix}"
    with psycopg2.connect(pg_base) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    db, lock = _claim_redis_db() if redis_db is None else (redis_db, None)
    redis_url = f"{redis_base}/{db}"
    redis.Redis.from_url(redis_url).flushdb()
    time.sleep(1)  # let topic metadata settle before producers and consumers use it
    sep = "&" if "?" in pg_base else "?"
    try:
        yield Stack(suffix, topics, f"{pg_base}{sep}options=-csearch_path%3D{schema}", redis_url, f"it-{suffix}",
                    brokers, pg_base)
    finally:
        _remove(admin, list(topics.values()), pg_base, schema, redis_url, problems)
        if redis_db is None:
            _free_redis_dbs.append(db)
            lock.close()  # releases the flock


def _remove(admin: AdminClient, topics: list[str], pg_base: str, schema: str, redis_url: str,
            problems: list[str] | None) -> None:
    """Deletes ``topics``, drops ``schema``, flushes ``redis_url``. Without ``problems``
    the first failure raises; with it, each step's failure is appended and the next runs."""
    def delete_topics() -> None:
        futures = admin.delete_topics(topics, request_timeout=30)
        for name, f in futures.items() if problems is not None else ():
            try:
                f.result(30)
            except Exception as e:
                problems.append(f"delete topic {name}: {e}")

    def drop_schema() -> None:
        with psycopg2.connect(pg_base, connect_timeout=10) as conn, conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")

    steps = [("delete topics", delete_topics), (f"drop schema {schema}", drop_schema),
             (f"flush {redis_url}", lambda: redis.Redis.from_url(redis_url, socket_connect_timeout=5).flushdb())]
    for what, step in steps:
        if problems is None:
            step()
            continue
        try:
            step()
        except Exception as e:
            problems.append(f"{what}: {e}")


@pytest.fixture(scope="module")
def stack(services):
    with isolated_stack() as s:
        yield s


@pytest.fixture
def fresh_stack(services):
    """A stack of its own for one test (restart and kill trials)."""
    with isolated_stack() as s:
        yield s
