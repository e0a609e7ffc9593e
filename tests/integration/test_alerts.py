"""Anomaly alerts on the real stack: each injected anomaly is one episode, a clean stream none.

Two hours of event time (24,000 events, 8 concepts: about 60 answers per
concept per 5 minutes and 90 answers a minute) are sent at once and drained
with --until_idle; the stream ends on a 5-minute boundary so that its last
windows are whole. The expected alerts come from the injections alone: one
RAISED in the window the injection starts, one RESOLVED in the first window
after it ends, for its kind and entity, on the alerts topic, in Postgres and
in the Redis list alike.
"""
from __future__ import annotations

import json
import time
from collections import Counter

import psycopg2
import pytest
import redis

from schemas.serving import RECENT_ALERTS_KEY
from scripts.produce import FAST_ANSWER_SPACING_MS, FAST_ANSWERS_IN_A_ROW, TrafficConfig, parse_injection
from transforms.profiles.profile import FAST_STREAK_ALERT
from tests.integration.conftest import BROKERS
from tests.integration.readback import topic_records

pytestmark = pytest.mark.integration

SPAN_S = 7200
# (injection, window seconds of its rule, alert kind, entity as the test's topic names it)
INJECTED = [
    ("accuracy_drop:concept-003@1800", 300, "concept_accuracy_drop"),
    ("rate_spike:question_answered@3000+120", 60, "event_rate_spike"),
    ("dead_letters:learning.events.v1@4200+120", 60, "dead_letter_rate"),
    ("rate_drop:question_answered@6000+60", 60, "event_rate_drop"),
]
# fast_answers (the behaviour profiles' rule): its window is the streak itself, not a fixed size.
FAST = "fast_answers:user-00042@5400"


def config(end_ms: int, injections=()) -> TrafficConfig:
    return TrafficConfig(events=24000, users=200, concepts=8, content_items=60, span_seconds=SPAN_S,
                         end_time_ms=end_ms, malformed_fraction=0.02, json_fraction=0.2, seed=11,
                         injections=tuple(parse_injection(i) for i in injections))


def stream_end() -> int:
    """A 5-minute boundary in the past: the stream's last windows are whole."""
    now = int(time.time() * 1000)
    return now - now % 300_000


def expected_alerts(stack, start_ms: int) -> set:
    """{(status, kind, entity, window seconds, window start ms)} from the injections alone."""
    out = set()
    for text, size, kind in INJECTED:
        inj = parse_injection(text)
        entity = stack.topic_for(inj.entity) if kind == "dead_letter_rate" else inj.entity
        begin = start_ms + int(inj.start_s * 1000)
        out.add(("RAISED", kind, entity, size, begin))
        out.add(("RESOLVED", kind, entity, size, begin + int(inj.duration_s * 1000)))
    return out


def key(rec: dict) -> tuple:
    return rec["status"], rec["kind"], rec["entity_id"], rec["window_seconds"], rec["window_start"]


def on_topic(stack) -> list[dict]:
    return [rec for _, rec in topic_records(BROKERS, stack.topics["alerts"])]


def in_postgres(stack) -> list[dict]:
    with psycopg2.connect(stack.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass('alerts') IS NOT NULL")
        if not cur.fetchone()[0]:
            return []
        cur.execute("SELECT alert_id::text, episode_id::text, status, kind, entity_id, window_seconds, "
                    "(extract(epoch FROM window_start) * 1000)::bigint, published, resolved_by::text FROM alerts")
        cols = ("alert_id", "episode_id", "status", "kind", "entity_id", "window_seconds", "window_start",
                "published", "resolved_by")
        return [dict(zip(cols, row)) for row in cur.fetchall()]


def in_redis(stack) -> list[dict]:
    return [json.loads(x) for x in redis.Redis.from_url(stack.redis_url).lrange(RECENT_ALERTS_KEY, 0, -1)]


@pytest.fixture(scope="module")
def injected(stack):
    end = stream_end()
    stack.produce(config(end, [text for text, _, _ in INJECTED] + [FAST]))
    proc = stack.run_streaming(until_idle=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return end - SPAN_S * 1000


def fixed_window(rec: dict) -> bool:
    return rec["kind"] != "fast_answers"


def test_each_injected_anomaly_is_one_episode_everywhere(stack, injected):
    want = expected_alerts(stack, injected)
    topic, rows, listed = on_topic(stack), in_postgres(stack), in_redis(stack)
    assert Counter(key(r) for r in topic if fixed_window(r)) == Counter(want)
    assert Counter(key(r) for r in rows if fixed_window(r)) == Counter(want)
    assert Counter(key(r) for r in listed if fixed_window(r)) == Counter(want)
    assert all(r["published"] for r in rows)
    # A RESOLVED record names its episode: the RAISED record's id, which it closed.
    by_id = {r["alert_id"]: r for r in rows}
    for r in rows:
        if r["status"] == "RESOLVED":
            raised = by_id[r["episode_id"]]
            assert (raised["status"], raised["kind"], raised["entity_id"]) == ("RAISED", r["kind"], r["entity_id"])
            assert raised["resolved_by"] == r["alert_id"]
    for rec in topic:
        assert rec["message"] and rec["expected_low"] <= rec["expected_high"]
        if rec["status"] == "RAISED" and rec["kind"] in ("event_rate_drop", "dead_letter_rate"):
            assert rec["severity"] == "CRITICAL"   # a drop to zero; half the records dead


def test_injected_fast_answers_are_one_episode_of_their_user(stack, injected):
    """FAST_ANSWERS_IN_A_ROW answers under 1 s, FAST_ANSWER_SPACING_MS apart from the injection's
    start: the profiles' rule raises once when the streak reaches its threshold (the window: the
    streak's first to its threshold-th answer) and resolves once on the user's next normal answer
    (the window: the streak's last fast answer to that one)."""
    inj = parse_injection(FAST)
    begin = injected + int(inj.start_s * 1000)
    streak_span_s = max(1, (FAST_STREAK_ALERT - 1) * FAST_ANSWER_SPACING_MS // 1000)
    for where in (on_topic(stack), in_postgres(stack), in_redis(stack)):
        fast = sorted((r for r in where if r["kind"] == "fast_answers"), key=lambda r: r["status"])
        last_fast = begin + (FAST_ANSWERS_IN_A_ROW - 1) * FAST_ANSWER_SPACING_MS
        assert [(r["status"], r["entity_id"], r["window_start"]) for r in fast] == [
            ("RAISED", inj.entity, begin), ("RESOLVED", inj.entity, last_fast)]
        assert fast[0]["window_seconds"] == streak_span_s


def test_a_second_run_over_the_same_stream_raises_nothing_again(stack, injected):
    """A restart re-reads and re-judges windows (here: all of them, a new group from the start);
    Postgres decides, so no episode is raised twice. One alert left unpublished (as by a crash
    between the Postgres insert and the Kafka write; its publisher is gone) is published again at start: once more on
    the topic (at-least-once, same id), still once in Redis and Postgres."""
    want = expected_alerts(stack, injected)
    topic_before = on_topic(stack)
    with psycopg2.connect(stack.dsn) as conn, conn.cursor() as cur:
        cur.execute("UPDATE alerts SET published = false WHERE kind = 'event_rate_drop' AND status = 'RAISED' "
                    "RETURNING alert_id::text")
        unpublished = cur.fetchone()[0]
    proc = stack.run_streaming(until_idle=5, group_id=f"{stack.group_id}-again", start_from="earliest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, listed, topic = in_postgres(stack), in_redis(stack), on_topic(stack)
    assert Counter(key(r) for r in rows if fixed_window(r)) == Counter(want)
    assert all(r["published"] for r in rows)
    assert Counter(key(r) for r in listed if fixed_window(r)) == Counter(want)
    assert sum(r["kind"] == "fast_answers" for r in rows) == 2
    assert [r["alert_id"] for r in topic[len(topic_before):]] == [unpublished]
    assert Counter(r["alert_id"] for r in topic) == Counter(
        [r["alert_id"] for r in topic_before] + [unpublished])


def test_a_clean_two_hour_stream_raises_nothing(fresh_stack):
    fresh_stack.produce(config(stream_end()))
    proc = fresh_stack.run_streaming(until_idle=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert on_topic(fresh_stack) == []
    assert in_postgres(fresh_stack) == []
    assert in_redis(fresh_stack) == []


def test_a_sigkill_after_the_first_alert_then_a_restart_raises_each_episode_once(fresh_stack):
    """The job killed (SIGKILL, its process group) once its first alert is in Postgres, mid-episode
    or just after; the restart resumes the group, rebuilds its trailing baselines from
    window_metrics, and closes or raises each episode exactly once."""
    import os
    import signal

    from tests.integration.test_restarts import start_job, wait_until
    end = stream_end()
    fresh_stack.produce(config(end, [text for text, _, _ in INJECTED]))
    job = start_job(fresh_stack, until_idle=30)
    try:
        wait_until(job, lambda: len(in_postgres(fresh_stack)) >= 1, timeout=150)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
    before = in_postgres(fresh_stack)
    proc = fresh_stack.run_streaming(until_idle=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = expected_alerts(fresh_stack, end - SPAN_S * 1000)
    assert len(before) < len(want)
    assert Counter(map(key, in_postgres(fresh_stack))) == Counter(want)
    assert Counter(map(key, in_redis(fresh_stack))) == Counter(want)
    # At least once on the topic (an alert recorded just before the kill may be there twice), same ids.
    assert set(map(key, on_topic(fresh_stack))) == want


def test_a_rate_baseline_survives_a_restart(fresh_stack):
    """Run 1 drains half an hour of traffic and stops; run 2 reads the next half hour, whose
    first minute has no answers at all. Run 2 holds no state from run 1: the trailing 15
    minutes it judges that minute against come from what run 1 left (window_metrics, or the
    ledger's seeds). One outage episode, in the first minute of run 2's stream."""
    end = stream_end()
    half = 1800
    first = TrafficConfig(events=6000, users=200, concepts=8, content_items=60, span_seconds=half,
                          end_time_ms=end - half * 1000, malformed_fraction=0.02, seed=21)
    fresh_stack.produce(first)
    proc = fresh_stack.run_streaming(until_idle=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert in_postgres(fresh_stack) == []
    second = TrafficConfig(**{**first.__dict__, "end_time_ms": end, "seed": 22,
                              "injections": (parse_injection("rate_drop:question_answered@0+60"),)})
    fresh_stack.produce(second)
    proc = fresh_stack.run_streaming(until_idle=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = end - half * 1000
    want = {("RAISED", "event_rate_drop", "question_answered", 60, start),
            ("RESOLVED", "event_rate_drop", "question_answered", 60, start + 60_000)}
    assert Counter(map(key, in_postgres(fresh_stack))) == Counter(want)
    assert Counter(map(key, on_topic(fresh_stack))) == Counter(want)


def test_a_rule_book_reads_the_trailing_windows_an_earlier_run_wrote(fresh_stack):
    """What a started job's rule book does when the ledger's seeds do not cover its trailing
    windows (they expired): it reads them from window_metrics, once, before its first judgement."""
    from psycopg2.extras import Json

    from transforms.alerts.evaluate import ConceptAccuracyBook, JudgeWindowsFn, RateBook
    from transforms.sinks.postgres_sink import apply_schema
    apply_schema(fresh_stack.dsn)
    t = stream_end()
    with psycopg2.connect(fresh_stack.dsn) as conn, conn.cursor() as cur:
        for i in range(1, 20):
            start = t - i * 60_000
            cur.execute("INSERT INTO window_metrics VALUES (60, to_timestamp(%s / 1000.0), to_timestamp(%s / 1000.0), "
                        "'overall', 'all', %s, 'ON_TIME', 0)", (start, start + 60_000, Json({"answers": 90.0 + i})))
        for i in range(1, 14):
            start = t - i * 300_000
            cur.execute("INSERT INTO window_metrics VALUES (300, to_timestamp(%s / 1000.0), to_timestamp(%s / 1000.0), "
                        "'concept', 'c1', %s, 'ON_TIME', 0)",
                        (start, start + 300_000, Json({"answers": 50.0, "correct": 30.0})))
    rates = JudgeWindowsFn(RateBook([]), fresh_stack.dsn)
    rates.setup()
    windows = {t - 60_000: {"counts": {"question_answered": 1.0}}}   # this run's own value wins
    rates._load_before(t, windows)
    assert sorted(windows) == [t - i * 60_000 for i in range(15, 0, -1)]
    assert windows[t - 60_000] == {"counts": {"question_answered": 1.0}}
    assert windows[t - 120_000]["counts"]["question_answered"] == 92.0
    concepts = JudgeWindowsFn(ConceptAccuracyBook(), fresh_stack.dsn)
    concepts.setup()
    windows = {}
    concepts._load_before(t, windows)
    assert sorted(windows) == [t - i * 300_000 for i in range(12, 0, -1)]
    assert windows[t - 300_000] == {"concepts": {"c1": [50.0, 30.0]}}


def test_profile_signals_become_episodes_too(fresh_stack):
    """fast_answers comes from the behaviour profiles as AlertSignals; the publisher makes the
    same episodes of them: one RAISED, the repeats ignored, one RESOLVED, and within the
    cooldown no new episode."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms.alerts.episodes import COOLDOWN_S
    from transforms.alerts.publish import AlertTargets, PublishAlerts
    from transforms.alerts.signal import AlertSignal
    t = stream_end()

    def fast(i: int, in_range: bool) -> AlertSignal:
        start = t + i * 60_000
        return AlertSignal("fast_answers", "WARNING", "user", "user-00042", 60, start, start + 60_000,
                           0.0 if in_range else 10.0, 0.0, 5.0, in_range, "10 answers in a row under 1 s")

    signals = [fast(0, False), fast(1, False), fast(2, True), fast(3, True),
               fast(2 + COOLDOWN_S // 60 - 1, False)]   # still cooling down
    targets = AlertTargets(fresh_stack.brokers, fresh_stack.dsn, fresh_stack.redis_url,
                           fresh_stack.topics["alerts"])
    # The FnApiRunner itself: Beam's DirectRunner would first try its shared Prism job server
    # without our binary, and keep that failed server for every later Prism test (Beam 2.77).
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create(signals) | PublishAlerts(targets)
    want = {("RAISED", "fast_answers", "user-00042", 60, t),
            ("RESOLVED", "fast_answers", "user-00042", 60, t + 120_000)}
    assert Counter(map(key, in_postgres(fresh_stack))) == Counter(want)
    assert Counter(map(key, on_topic(fresh_stack))) == Counter(want)
    assert Counter(map(key, in_redis(fresh_stack))) == Counter(want)


def test_a_bundle_decides_only_the_signals_that_can_change_an_episode(fresh_stack):
    """The publisher's batch path: per bundle one query finds the open episodes of its in-range
    signals; an in-range signal of a (kind, entity) with nothing open (and no out-of-range signal
    before it in the bundle) is ignored as nothing_open and leaves no row, while a RAISE and the
    RESOLVE after it in the same bundle, and the RESOLVE of an episode an earlier run opened,
    are decided as before."""
    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from transforms.alerts.publish import AlertTargets, PublishAlerts
    from transforms.alerts.signal import AlertSignal
    t = stream_end()

    def rate(entity: str, i: int, in_range: bool) -> AlertSignal:
        start = t + i * 60_000
        return AlertSignal("event_rate_drop", "WARNING", "event_type", entity, 60, start, start + 60_000,
                           1.0 if not in_range else 50.0, 40.0, 60.0, in_range, f"{entity} rate")

    targets = AlertTargets(fresh_stack.brokers, fresh_stack.dsn, fresh_stack.redis_url,
                           fresh_stack.topics["alerts"])

    def publish(signals: list) -> dict:
        """Runs the publisher over ``signals`` (FnApiRunner: one bundle); its Alerts counters."""
        p = beam.Pipeline(runner=FnApiRunner())
        _ = p | beam.Create(signals) | PublishAlerts(targets)
        result = p.run()
        result.wait_until_finish()
        counters = result.metrics().query(MetricsFilter().with_namespace("Alerts"))["counters"]
        return {c.key.metric.name: c.committed for c in counters if c.committed}

    # A first run: "z" opens an episode (left open); "w" opens and closes one (its cooldown past).
    first = publish([rate("z", -30, False), rate("w", -60, False), rate("w", -59, True)])
    assert (first.get("raised"), first.get("resolved")) == (2, 1)
    second = publish([
        rate("x", 0, True), rate("x", 1, True),     # nothing open: ignored, no transaction
        rate("w", 0, True),                         # only a resolved episode: ignored likewise
        rate("y", 0, False), rate("y", 1, True),    # RAISE then RESOLVE within the bundle
        rate("y", 2, True),                         # decided (y was raised in the bundle): nothing open now
        rate("z", 1, True),                         # RESOLVEs the first run's episode
        rate("z", 2, True),                         # decided (z was open): nothing open now
    ])
    assert second.get("raised") == 1 and second.get("resolved") == 2
    assert second.get("ignored.nothing_open") == 5
    assert second.get("published") == 3
    want = {("RAISED", "event_rate_drop", "z", 60, t - 30 * 60_000),
            ("RAISED", "event_rate_drop", "w", 60, t - 60 * 60_000),
            ("RESOLVED", "event_rate_drop", "w", 60, t - 59 * 60_000),
            ("RAISED", "event_rate_drop", "y", 60, t),
            ("RESOLVED", "event_rate_drop", "y", 60, t + 60_000),
            ("RESOLVED", "event_rate_drop", "z", 60, t + 60_000)}
    rows = in_postgres(fresh_stack)
    assert Counter(map(key, rows)) == Counter(want)          # no row for x, nor a second one for w
    assert all(r["published"] for r in rows)
    assert Counter(map(key, on_topic(fresh_stack))) == Counter(want)
    by_id = {r["alert_id"]: r for r in rows}
    closed = {(by_id[r["resolved_by"]]["entity_id"], by_id[r["resolved_by"]]["status"])
              for r in rows if r["resolved_by"]}
    assert closed == {("w", "RESOLVED"), ("y", "RESOLVED"), ("z", "RESOLVED")}
