"""Preflight: are the services a job needs reachable? Asked before its pipeline is built.

    check_options(options)                       # the values (pipelines.options)
    check_services(opts, redis_=False)           # then the network: Kafka and its topics, Redis, Postgres
    p = beam.Pipeline(...); build(p, ...)        # nothing build calls connects or exits

A service that does not answer ends the job with one ``error:`` line and exit
code 2, like a bad option, rather than a traceback from a worker minutes later.
"""
from __future__ import annotations

import psycopg2
import redis
from confluent_kafka import Consumer, KafkaException

from pipelines.options import AnalyticsOptions, fail, redact


def check_services(opts: AnalyticsOptions, kafka: bool = True, redis_: bool = True,
                   postgres: bool = True) -> None:
    """One clear line and exit 2 when a service is unreachable, before anything starts."""
    if kafka:
        try:
            # log_level 0: librdkafka would print a line per failed retry.
            c = Consumer({"bootstrap.servers": opts.brokers, "group.id": "preflight",
                          "socket.connection.setup.timeout.ms": 3000, "log_level": 0})
            try:
                topics = c.list_topics(timeout=5).topics
            finally:
                c.close()
        except KafkaException as e:
            fail(f"cannot reach Kafka at {opts.brokers}: {e.args[0].str() if e.args else e}")
        missing = [t for t in opts.topic_list() if t not in topics]
        if missing:
            fail(f"Kafka topics missing on {opts.brokers}: {', '.join(missing)} "
                 "(scripts/stack.sh up creates them)")
    if redis_:
        try:
            redis.Redis.from_url(opts.redis_url, socket_connect_timeout=3).ping()
        except redis.RedisError as e:
            fail(f"cannot reach Redis at {redact(opts.redis_url)}: {e}")
    if postgres:
        try:
            psycopg2.connect(opts.postgres_dsn, connect_timeout=5).close()
        except psycopg2.Error as e:
            fail(f"cannot reach Postgres at {redact(opts.postgres_dsn)}: {str(e).strip().splitlines()[0]}")
