"""Sinks ride out an outage of their service: writes wait, nothing is lost or raised.

Every test stops a *private* Redis, Postgres or Kafka broker (started here with
``scripts/stack.sh instance up``, on free ports, purged at the end even when a
test fails), never the shared stack. The DoFns run as Beam runs them (setup,
process, finish_bundle) on this thread; a write made while the service is
away must block until it is back, then complete: the test compares what is
stored with what it wrote, and checks that the sink's circuit breaker opened
once and closed once, each transition logged once. The last test runs the
streaming job while Redis and Postgres are both away for 30 s and checks the
exact totals afterwards.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from scripts.produce import TrafficConfig, generate, produce
from tests.helpers import BASE_MS, answer, event
from tests.integration.conftest import BROKERS, REPO
from tests.integration.instances import OUTAGE_S, STACK_SH, Instance, private
from tests.integration.expected import assert_metrics_match, expected_metrics
from tests.integration.test_profiles import assert_profiles, expected_profiles, postgres_profiles, redis_profiles
from tests.integration.readback import postgres_metrics, postgres_scalar, redis_metrics
from transforms.aggregate import MetricRow, WindowAggregate
from transforms.sinks.kafka_sink import PublishAggregatesFn
from transforms.sinks.postgres_sink import ArchiveRawEventsFn, WriteMetricsToPostgresFn, apply_schema
from transforms.sinks.redis_sink import WriteMetricsToRedisFn, metric_key
from transforms.sinks.resilience import CLOSED, SinkRetryConfig

pytestmark = pytest.mark.integration

# Quick to open and to notice the service is back: tests measure outages of seconds.
FAST = SinkRetryConfig(retries=3, backoff_base_s=0.05, probe_interval_s=0.5, probe_timeout_s=2.0,
                       write_timeout_s=1.0)


@pytest.fixture(scope="module")
def private_redis():
    with private("redis") as inst:
        yield inst


@pytest.fixture(scope="module")
def private_postgres():
    with private("postgres") as inst:
        yield inst


@pytest.fixture(scope="module")
def private_kafka():
    with private("kafka", span=2) as inst:
        yield inst


def within(seconds: float, fn, *args):
    """Calls ``fn(*args)`` on a helper thread; fails the test if it has not returned in time."""
    outcome: list = []

    def run():
        try:
            outcome.append((True, fn(*args)))
        except BaseException as e:
            outcome.append((False, e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert outcome, f"{getattr(fn, '__name__', fn)} still blocked after {seconds}s"
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def transitions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "transforms.sinks.resilience" and "circuit breaker" in r.getMessage()]


def assert_one_outage(breaker, caplog, sink_words: str, cause: str) -> None:
    """Opened once, closed once, each logged once with the sink and the cause."""
    assert (breaker.openings, breaker.closings, breaker.state) == (1, 1, CLOSED)
    logged = transitions(caplog)
    opened = [m for m in logged if "OPEN after" in m]
    closed = [m for m in logged if "CLOSED" in m]
    assert len(opened) == 1 and len(closed) == 1, logged
    assert sink_words in opened[0] and sink_words in closed[0]
    assert f"failed attempt(s): {cause}" in opened[0], opened[0]


def panes(seconds: int, start_ms: int, users: int, pane_index: int, scale: int = 1) -> WindowAggregate:
    rows = [MetricRow("user", f"u{i}", {"events": float(scale * (i + 1)), "answers": float(i)})
            for i in range(users)]
    rows.append(MetricRow("overall", "all", {"events": float(scale * users)}))
    return WindowAggregate(seconds, start_ms, start_ms + seconds * 1000, "EARLY", pane_index, rows)


def expected_hashes(aggs: list[WindowAggregate]) -> dict:
    """Key -> the hash the last write of that key leaves (Redis' view: strings)."""
    out = {}
    for a in aggs:
        for r in a.rows:
            key = metric_key("analytics", a.window_seconds, a.window_start_ms, r.family, r.entity_id)
            out[key] = {**{k: repr(float(v)) for k, v in r.metrics.items()}, "pane_timing": a.pane_timing,
                        "pane_index": str(a.pane_index), "window_end": str(a.window_end_ms)}
    return out


# ---------------------------------------------------------------- Redis
def test_redis_writes_wait_for_redis_and_land_exactly(private_redis, caplog):
    caplog.set_level(logging.WARNING, logger="transforms.sinks.resilience")
    url = f"redis://127.0.0.1:{private_redis.port}/1"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    fn = WriteMetricsToRedisFn(url, retry=FAST)
    fn.setup()
    before = [panes(60, BASE_MS + i * 60_000, 50, 0) for i in range(3)]
    for a in before:
        fn.process(a)
    # While Redis is away: a refire of a written window (new values) and new windows.
    during = [panes(60, BASE_MS, 60, 1, scale=2)] + [panes(300, BASE_MS, 40, 0)]
    began = time.monotonic()
    with private_redis.outage():
        for a in during:
            within(60, fn.process, a)
    waited = time.monotonic() - began
    fn.teardown()

    assert waited >= OUTAGE_S, "the write should have waited for Redis"
    want = expected_hashes(before + during)
    got = {k: r.hgetall(k) for k in r.scan_iter("analytics:*") if not k.endswith(":latest")}
    assert got == want
    assert all(r.ttl(k) > 0 for k in want)
    assert r.get("analytics:1m:latest") == str(BASE_MS + 2 * 60_000)
    assert_one_outage(fn.breaker, caplog, f"WriteMetricsToRedis(127.0.0.1:{private_redis.port}/1)",
                      "ConnectionError: Error 111 connecting")


def test_a_redis_restart_between_two_writes_costs_nothing(private_redis, caplog):
    caplog.set_level(logging.WARNING, logger="transforms.sinks.resilience")
    url = f"redis://127.0.0.1:{private_redis.port}/2"
    r = redis.Redis.from_url(url, decode_responses=True)
    r.flushdb()
    fn = WriteMetricsToRedisFn(url, retry=FAST)
    fn.setup()
    fn.process(panes(60, BASE_MS, 5, 0))
    private_redis.stop()      # the client's pooled connection dies with the server
    private_redis.start()
    within(30, fn.process, panes(60, BASE_MS, 8, 1, scale=3))
    fn.teardown()
    assert {k: r.hgetall(k) for k in r.scan_iter("analytics:*") if not k.endswith(":latest")} == \
        expected_hashes([panes(60, BASE_MS, 5, 0), panes(60, BASE_MS, 8, 1, scale=3)])
    assert fn.breaker.openings == 0   # a dead pooled connection is replaced, at worst by a retry
    assert transitions(caplog) == []


# ---------------------------------------------------------------- Postgres
def private_schema(instance: Instance) -> str:
    base = f"postgresql://analytics:analytics@127.0.0.1:{instance.port}/analytics"
    schema = f"o_{uuid.uuid4().hex[:8]}"
    with psycopg2.connect(base) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{base}?options=-csearch_path%3D{schema}"
    apply_schema(dsn)
    return dsn


def stored_rows(dsn: str) -> dict:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT window_seconds, (extract(epoch FROM window_start) * 1000)::bigint, family, "
                    "entity_id, metrics, pane_timing, pane_index FROM window_metrics")
        return {(s, w, f, e): (m, t, i) for s, w, f, e, m, t, i in cur.fetchall()}


def expected_rows(aggs: list[WindowAggregate]) -> dict:
    out = {}
    for a in aggs:
        for row in a.rows:
            out[(a.window_seconds, a.window_start_ms, row.family, row.entity_id)] = (
                row.metrics, a.pane_timing, a.pane_index)
    return out


def test_postgres_upserts_wait_for_postgres_and_land_exactly(private_postgres, caplog):
    caplog.set_level(logging.WARNING, logger="transforms.sinks.resilience")
    dsn = private_schema(private_postgres)
    fn = WriteMetricsToPostgresFn(dsn, retry=FAST)
    fn.setup()
    before = [panes(60, BASE_MS + i * 60_000, 40, 0) for i in range(3)]
    for a in before:
        fn.process(a)
    during = [panes(60, BASE_MS + 60_000, 45, 1, scale=5), panes(3600, BASE_MS, 30, 0)]
    began = time.monotonic()
    with private_postgres.outage():
        for a in during:
            within(60, fn.process, a)
    waited = time.monotonic() - began
    fn.teardown()

    assert waited >= OUTAGE_S
    assert stored_rows(dsn) == expected_rows(before + during)
    assert_one_outage(fn.breaker, caplog, f"WriteMetricsToPostgres(127.0.0.1:{private_postgres.port}/analytics)",
                      "OperationalError")


def test_a_postgres_sink_set_up_during_an_outage_waits_then_writes(private_postgres, caplog):
    caplog.set_level(logging.WARNING, logger="transforms.sinks.resilience")
    dsn = private_schema(private_postgres)
    fn = WriteMetricsToPostgresFn(dsn, retry=FAST)
    with private_postgres.outage(3.0):
        within(60, fn.setup)     # a new DoFn instance for a new bundle, while Postgres is away
    aggs = [panes(86400, BASE_MS, 20, 0)]
    fn.process(aggs[0])
    fn.teardown()
    assert stored_rows(dsn) == expected_rows(aggs)
    assert_one_outage(fn.breaker, caplog, "WriteMetricsToPostgres", "OperationalError: connection to server")


def archived(dsn: str) -> list[str]:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT event_id FROM raw_events")
        return [r[0] for r in cur.fetchall()]


def test_the_archive_redoes_a_failed_copy_on_a_new_connection(private_postgres, caplog):
    caplog.set_level(logging.WARNING, logger="transforms.sinks.resilience")
    dsn = private_schema(private_postgres)
    fn = ArchiveRawEventsFn(dsn, retry=FAST)
    fn.setup()
    first = [event("question_answered", answer(BASE_MS + i * 1000, user=f"u{i % 7}")) for i in range(500)]
    fn.process(first[:250])
    fn.process(first[250:])
    assert list(fn.finish_bundle()) == []
    # While Postgres is away: re-delivered events (ignored), new ones, and a new day (a new partition).
    second = first[400:] + [event("question_answered", answer(BASE_MS + 86_400_000 + i * 1000, user=f"v{i}"))
                            for i in range(300)]
    began = time.monotonic()
    with private_postgres.outage():
        fn.process(second[:200])
        fn.process(second[200:])
        within(60, lambda: list(fn.finish_bundle()))  # waits for the writer: the bundle is not done before
    waited = time.monotonic() - began
    fn.teardown()

    ids = archived(dsn)
    want = {e.fields["event_id"] for e in first + second}
    assert waited >= OUTAGE_S
    assert len(ids) == len(set(ids)) == len(want) == 800 and set(ids) == want
    assert postgres_scalar(dsn, "SELECT count(*) FROM pg_inherits WHERE inhparent = 'raw_events'::regclass") == 2
    assert_one_outage(fn.writer.breaker, caplog, "ArchiveRawEvents", "OperationalError")


# ---------------------------------------------------------------- Kafka (the producer side)
def read_all(brokers: str, topic: str) -> list[tuple[bytes, bytes]]:
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"t-{uuid.uuid4()}", "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out, pending = [], {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=1):
                if m.error() is None:
                    out.append((m.key(), m.value()))
                    if m.offset() + 1 >= ends[m.partition()]:
                        pending.discard(m.partition())
        assert not pending, f"could not read {topic} to its end"
        return out
    finally:
        c.close()


def test_kafka_flush_waits_for_the_broker_and_delivers_each_record_once(private_kafka, caplog):
    caplog.set_level(logging.WARNING, logger="transforms.sinks.resilience")
    brokers, topic = f"127.0.0.1:{private_kafka.port}", "analytics.aggregated.v1"
    admin = AdminClient({"bootstrap.servers": brokers})
    for f in admin.create_topics([NewTopic(topic, 3, 1)]).values():
        f.result(30)
    del admin
    fn = PublishAggregatesFn(brokers, topic, retry=FAST)
    fn.setup()
    fn.process(panes(60, BASE_MS, 100, 0))
    fn.finish_bundle()
    began = time.monotonic()
    with private_kafka.outage(3.0):
        fn.process(panes(60, BASE_MS + 60_000, 150, 0))
        fn.process(panes(300, BASE_MS, 150, 0))
        within(90, fn.finish_bundle)
    waited = time.monotonic() - began
    fn.teardown()

    records = read_all(brokers, topic)
    keys = [k.decode() for k, _ in records]
    assert waited >= 3.0
    assert len(keys) == len(set(keys)) == 101 + 151 + 151
    assert_one_outage(fn.breaker, caplog, f"PublishAggregatesFn({topic})",
                      "BrokerUnavailable: 302 records not acknowledged")


# ---------------------------------------------------------------- the streaming job
def committed(group_id: str, topics: list[str]) -> int:
    """The sum of the group's committed offsets over every partition of ``topics``."""
    c = Consumer({"bootstrap.servers": BROKERS, "group.id": group_id, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(t, p) for t in topics for p in c.list_topics(t, timeout=10).topics[t].partitions]
        return sum(max(0, tp.offset) for tp in c.committed(parts, timeout=10))
    finally:
        c.close()


def test_the_streaming_job_rides_out_postgres_down_30s_and_redis_15s(stack, private_redis, private_postgres):
    """Postgres (archive and metrics) goes away for 30 s while the job is in the
    middle of a stream, and Redis for 15 s from its last 5 s on. The job neither
    exits nor loses anything: the reader stops behind the archive (its committed
    offsets stand still), the panes wait for their sinks, and after it drains
    every total in Redis and Postgres is exact.

    The stream (two minutes of event time ending now, so early panes are
    written) is in Kafka before the job starts: with live traffic, --until_idle
    can end a partition while records still arrive, which is not this test's
    subject."""
    redis_url = f"redis://127.0.0.1:{private_redis.port}/5"
    redis.Redis.from_url(redis_url).flushdb()
    dsn = private_schema(private_postgres)
    cfg = TrafficConfig(events=40000, users=120, span_seconds=120, malformed_fraction=0.02, seed=33)
    produced = [r._replace(topic=stack.topic_for(r.topic)) for r in generate(cfg)]
    produce(iter(produced), BROKERS)
    topics = stack.event_topics().split(",")
    cmd = [sys.executable, "-m", "pipelines.streaming",
           *stack.pipeline_args(redis_url=redis_url, postgres_dsn=dsn, until_idle=8, early_firing=1,
                                batch_size=100)]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = err = ""

    def hold(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert job.poll() is None, "the job exited while its sinks were down"
            time.sleep(0.5)

    try:
        deadline = time.monotonic() + 60
        while not postgres_scalar(dsn, "SELECT count(*) FROM raw_events"):
            assert job.poll() is None and time.monotonic() < deadline, "the job archived nothing within 60 s"
            time.sleep(0.1)
        private_postgres.stop()     # the reader waits behind the archive, panes behind their upserts
        hold(5)
        frozen = committed(stack.group_id, topics)
        hold(20)
        private_redis.stop()        # so that panes meet it when Postgres is back
        hold(3)
        still = committed(stack.group_id, topics)
        hold(2)
        private_postgres.start()    # the reader goes on: panes meet Redis away
        hold(10)
        private_redis.start()
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGTERM)
            try:
                out, err = job.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                job.kill()
                out, err = job.communicate()
        for inst in (private_redis, private_postgres):  # up again for whatever runs next
            subprocess.run([STACK_SH, "instance", "up", inst.service, str(inst.port)], capture_output=True,
                           timeout=120)

    print(err[-30000:])   # shown when a check below fails
    assert job.returncode == 0, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    # Back-pressure: no offset was committed while Postgres was away, and the stream was not done.
    assert frozen == still < len(produced)
    valid = [(r.event_type, r.fields) for r in produced if r.error_code is None]
    want = expected_metrics(valid)
    assert_metrics_match(want, postgres_metrics(dsn))
    assert_metrics_match(want, redis_metrics(redis_url))
    assert postgres_scalar(dsn, "SELECT count(*) FROM raw_events") == len(valid)
    assert postgres_scalar(dsn, "SELECT count(DISTINCT event_id) FROM raw_events") == len(valid)
    assert committed(stack.group_id, topics) == len(produced)
    # The learner profiles rode out both outages too: each exact in Postgres and in Redis.
    profiles = expected_profiles(produced)
    assert_profiles(profiles, postgres_profiles(dsn), "postgres")
    assert_profiles(profiles, redis_profiles(redis_url, profiles), "redis")
    # Every breaker that opened closed again (each DoFn instance has its own). The archive
    # always meets its outage, and Redis's is met by a writer of it: the profiles (fused
    # with the reader, so the reader waits there) or the window rows, whichever runs into
    # it first. Whether a pane reached the Postgres upsert (or a bundle the window ledger,
    # fused after the archive) while the reader was held depends on Prism's scheduling.
    opened_by = {}
    for sink in ("ArchiveRawEvents", "WindowLedger", "WriteMetricsToRedis", "WriteMetricsToPostgres",
                 "UpdateProfiles"):
        opened = [line for line in err.splitlines() if sink in line and "circuit breaker OPEN" in line]
        closed = [line for line in err.splitlines() if sink in line and "circuit breaker CLOSED" in line]
        assert len(opened) == len(closed), (sink, opened, closed)
        opened_by[sink] = opened
    assert opened_by["ArchiveRawEvents"], "the archive met no outage"
    assert any(f"127.0.0.1:{private_redis.port}/5" in line
               for line in opened_by["WriteMetricsToRedis"] + opened_by["UpdateProfiles"]), \
        "no Redis writer met the Redis outage"
