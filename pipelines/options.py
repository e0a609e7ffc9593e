"""Command-line options shared by the streaming and replay pipelines.

Every option defaults to the environment variable of the deployment seed when
it is set (KAFKA_BROKERS, REDIS_URL, ANALYTICS_GROUP_ID, BATCH_SIZE,
WINDOW_SIZE_MS, POSTGRES_DSN), else to the local stack of scripts/stack.sh.
"""
from __future__ import annotations

import os
import re
import sys

import psycopg2
import redis
from apache_beam.options.pipeline_options import PipelineOptions, PrismRunnerOptions, StandardOptions
from confluent_kafka import Consumer, KafkaException

EVENT_TOPICS = "learning.events.v1,content.events.v1,engagement.events.v1"
DEFAULT_PRISM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             ".stack", "bin", "prism")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def default_window_sizes() -> str:
    """1m, 5m, 1h, 1d; WINDOW_SIZE_MS, when set, replaces the finest size."""
    sizes = [60, 300, 3600, 86400]
    if os.environ.get("WINDOW_SIZE_MS"):
        sizes[0] = max(1, int(os.environ["WINDOW_SIZE_MS"]) // 1000)
    return ",".join(str(s) for s in sorted(set(sizes)))


class AnalyticsOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("learning analytics")
        g.add_argument("--brokers", default=_env("KAFKA_BROKERS", "127.0.0.1:9092"),
                       help="Kafka bootstrap servers [KAFKA_BROKERS]")
        g.add_argument("--topics", default=EVENT_TOPICS, help="comma-separated event topics")
        g.add_argument("--dlq_topic", default="analytics.dlq.v1")
        g.add_argument("--aggregates_topic", default="analytics.aggregated.v1")
        g.add_argument("--group_id", default=_env("ANALYTICS_GROUP_ID", "learning-analytics"),
                       help="Kafka consumer group whose offsets are committed [ANALYTICS_GROUP_ID]")
        g.add_argument("--redis_url", default=_env("REDIS_URL", "redis://127.0.0.1:6379/0"),
                       help="[REDIS_URL]")
        g.add_argument("--postgres_dsn",
                       default=_env("POSTGRES_DSN", "postgresql://analytics:analytics@127.0.0.1:5432/analytics"),
                       help="[POSTGRES_DSN]")
        g.add_argument("--batch_size", type=int, default=int(_env("BATCH_SIZE", "2000")),
                       help="most records per Kafka poll, the unit of work [BATCH_SIZE]")
        g.add_argument("--window_sizes", default=default_window_sizes(),
                       help="comma-separated window sizes in seconds [WINDOW_SIZE_MS replaces the first]")
        g.add_argument("--allowed_lateness", type=int, default=3600,
                       help="seconds after a window closes in which late events still update it")
        g.add_argument("--early_firing", type=int, default=5,
                       help="seconds between early (speculative) panes of an open window")
        g.add_argument("--max_out_of_orderness", type=float, default=5.0,
                       help="seconds the watermark trails the newest record time")
        g.add_argument("--max_future", type=int, default=300,
                       help="seconds an event time may be ahead of the clock before it is a dead letter")
        g.add_argument("--sinks", default="redis,postgres,kafka",
                       help="which aggregate sinks to write: any of redis,postgres,kafka")
        g.add_argument("--archive", default="true", choices=["true", "false"],
                       help="archive every valid event in Postgres raw_events")
        g.add_argument("--prism_path", default=_env("PRISM_PATH", DEFAULT_PRISM),
                       help="Prism runner binary, built by scripts/stack.sh [PRISM_PATH]")

    def topic_list(self) -> list[str]:
        return [t.strip() for t in self.topics.split(",") if t.strip()]

    def window_sizes_s(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.window_sizes.split(","))

    def sink_set(self) -> set[str]:
        """The chosen aggregate sinks; 'none' for none (e.g. to measure the pipeline alone)."""
        chosen = {s.strip() for s in self.sinks.split(",") if s.strip()} - {"none"}
        unknown = chosen - {"redis", "postgres", "kafka"}
        if unknown:
            fail(f"--sinks: unknown sink(s) {', '.join(sorted(unknown))}; choose from redis, postgres, kafka, none")
        return chosen


def use_local_runner(options: PipelineOptions, streaming: bool) -> None:
    """DirectRunner means Beam's local Prism runner, handed our own build.

    The Python DirectRunner would try to download Prism (impossible offline)
    and silently fall back to a runner on which event-time windows over an
    unbounded read never fire; so we select Prism explicitly.
    """
    std = options.view_as(StandardOptions)
    std.streaming = streaming
    if std.runner in (None, "DirectRunner", "PrismRunner"):
        std.runner = "PrismRunner"
        prism = options.view_as(AnalyticsOptions).prism_path
        if not os.path.exists(prism):
            fail(f"Prism runner not found at {prism}: run scripts/stack.sh up, or pass --prism_path")
        options.view_as(PrismRunnerOptions).prism_location = prism


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


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
