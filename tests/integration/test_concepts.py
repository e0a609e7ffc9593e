"""Concept performance on the real stack: concept rows, struggling users, the hardest concepts.

Two streams are produced and the job runs after each (so the hour that both
streams cover is finished by a restarted job, from the window ledger's seeds):
an hour and 50 minutes of traffic ending a quarter past an hour boundary that
is long past. Every 5-minute, hour and day window's concept rows in Postgres
and Redis are compared with values computed here from the produced records,
and the sorted set of the hardest concepts with the newest hour's concepts
that have enough answers. The sorted set's own rules (replaced by a newer
hour, never by an older one, idempotent) are checked on the sink itself.
"""
from __future__ import annotations

import functools
import time
from collections import defaultdict

import pytest
import redis

from schemas.serving import HARDEST_CONCEPTS_KEY, HARDEST_CONCEPTS_WINDOW_KEY
from scripts.produce import TrafficConfig
from service.concepts import concept_performance, hardest_concepts
from tests.integration.conftest import BROKERS
from tests.integration.readback import postgres_metrics, redis_metrics, topic_records

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000
# The definitions, restated here rather than imported: the test is a second reading.
MIN_ANSWERS, BELOW = 5, 0.5   # struggling: accuracy below 0.5 over at least 5 answers
HARDEST_MIN = 20              # a concept enters the hardest set with 20 answers in the hour
SIZES = (300, 3600, 86400)


@functools.lru_cache(maxsize=None)
def newest_hour_ms() -> int:
    """A past hour boundary, three hours ago: every window of the stream is complete.
    Computed once, so the fixture and the tests agree across an hour boundary."""
    return (int(time.time() * 1000) // HOUR_MS - 3) * HOUR_MS


def expected_concepts(answers: list[dict]) -> dict:
    """{(window seconds, start ms, concept): {answers, accuracy, mean_response_time_ms[, struggling_users]}}."""
    out = {}
    for size in SIZES:
        size_ms = size * 1000
        per_concept = defaultdict(lambda: [0, 0, 0])
        per_pair = defaultdict(lambda: [0, 0])
        for f in answers:
            start = f["occurred_at"] // size_ms * size_ms
            c = per_concept[(start, f["concept_id"])]
            c[0] += 1
            c[1] += bool(f["correct"])
            c[2] += f["response_time_ms"]
            pair = per_pair[(start, f["concept_id"], f["user_id"])]
            pair[0] += 1
            pair[1] += bool(f["correct"])
        struggling = defaultdict(int)
        for (start, concept, _), (n, right) in per_pair.items():
            if n >= MIN_ANSWERS and right / n < BELOW:
                struggling[(start, concept)] += 1
        for (start, concept), (n, right, rt) in per_concept.items():
            row = {"answers": n, "accuracy": right / n, "mean_response_time_ms": rt / n}
            if size == 3600:
                row["struggling_users"] = struggling[(start, concept)]
            out[(size, start, concept)] = row
    return out


def assert_concept_rows(expected: dict, stored: dict, where: str) -> None:
    got = {(s, w, e): m for (s, w, f, e), m in stored.items() if f == "concept" and s in SIZES}
    # Concepts with only mastery updates in a window have rows without answers.
    got = {k: m for k, m in got.items() if float(m.get("answers", 0)) > 0}
    assert set(got) == set(expected), (where, sorted(set(got) ^ set(expected))[:5])
    for key, want in expected.items():
        have = got[key]
        for name, value in want.items():
            assert abs(float(have[name]) - value) <= 1e-9 * max(1.0, abs(value)), (where, key, name, have[name], value)
        if key[0] < 3600:
            assert "struggling_users" not in have, (where, key)


@pytest.fixture(scope="module")
def produced(stack):
    """Two streams, the job run after each; returns the valid answers of both."""
    hour = newest_hour_ms()
    end = hour + 15 * 60_000
    records = []
    for seed, stream_end in ((31, end - HOUR_MS), (32, end)):
        records += stack.produce(TrafficConfig(events=3000, users=12, concepts=16, content_items=10,
                                               span_seconds=3300, end_time_ms=stream_end, malformed_fraction=0.02,
                                               json_fraction=0.2, seed=seed))
        proc = stack.run_streaming(until_idle=4, early_firing=1)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return [r.fields for r in records if r.error_code is None and r.event_type == "question_answered"]


def test_concept_rows_equal_an_independent_count_in_postgres_and_redis(stack, produced):
    expected = expected_concepts(produced)
    assert any(m.get("struggling_users") for m in expected.values())  # the stream has struggling users
    assert any(m.get("struggling_users") == 0 for m in expected.values())
    assert_concept_rows(expected, postgres_metrics(stack.dsn), "postgres")
    assert_concept_rows(expected, redis_metrics(stack.redis_url), "redis")


def test_the_internal_family_is_written_nowhere(stack, produced):
    assert {k[2] for k in postgres_metrics(stack.dsn)} == {"overall", "concept", "user", "content"}
    assert {k[2] for k in redis_metrics(stack.redis_url)} == {"overall", "concept", "user", "content"}
    families = {rec["family"] for _, rec in topic_records(BROKERS, stack.topics["aggregated"])}
    assert families == {"overall", "concept", "user", "content"}


def test_the_hardest_concepts_are_the_newest_hours_lowest_accuracies(stack, produced):
    hour = newest_hour_ms()
    newest = {c: m for (s, w, c), m in expected_concepts(produced).items() if s == 3600 and w == hour}
    want = sorted(((c, m["accuracy"]) for c, m in newest.items() if m["answers"] >= HARDEST_MIN),
                  key=lambda x: (x[1], x[0]))
    assert 0 < len(want) < len(newest)  # the minimum leaves some concepts out
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    assert int(r.get(HARDEST_CONCEPTS_WINDOW_KEY)) == hour
    got = r.zrange(HARDEST_CONCEPTS_KEY, 0, -1, withscores=True)
    assert [c for c, _ in got] == [c for c, _ in want]
    assert all(abs(a - b) < 1e-12 for (_, a), (_, b) in zip(got, want))
    assert hardest_concepts(r, 3) == got[:3]


def test_concept_performance_reads_the_newest_windows(stack, produced):
    expected = expected_concepts(produced)
    hour = newest_hour_ms()
    newest = {300: hour + 10 * 60_000, 3600: hour, 86400: hour // 86_400_000 * 86_400_000}
    for concept in sorted({f["concept_id"] for f in produced})[:4]:
        for client in (redis.Redis.from_url(stack.redis_url), redis.Redis.from_url(stack.redis_url,
                                                                                    decode_responses=True)):
            got = concept_performance(client, concept)
            assert got["concept_id"] == concept
            for label, size in (("5m", 300), ("1h", 3600), ("1d", 86400)):
                w = got["windows"][label]
                assert w["window_start_ms"] == newest[size] and w["window_end_ms"] == newest[size] + size * 1000
                want = expected.get((size, newest[size], concept))
                if want is None:
                    assert w["attempts"] == 0 and w["accuracy"] is None
                    continue
                assert w["attempts"] == want["answers"]
                assert w["accuracy"] == pytest.approx(want["accuracy"], rel=1e-12)
                assert w["mean_response_time_ms"] == pytest.approx(want["mean_response_time_ms"], rel=1e-12)
                assert w.get("struggling_users") == want.get("struggling_users")


def hour_pane(start_ms: int, concepts: dict, timing: str = "EARLY", index: int = 0):
    """A 1-hour pane of concept rows: {concept: (answers, correct)}."""
    from transforms.aggregate import MetricRow, WindowAggregate
    rows = [MetricRow("concept", c, {"answers": float(n), "correct": float(k), "accuracy": k / n})
            for c, (n, k) in concepts.items()]
    return WindowAggregate(3600, start_ms, start_ms + HOUR_MS, timing, index, rows)


def test_the_hardest_set_is_replaced_by_a_newer_hour_and_kept_from_an_older_one(fresh_stack):
    from transforms.sinks.redis_sink import WriteMetricsToRedisFn
    fn = WriteMetricsToRedisFn(fresh_stack.redis_url)
    fn.setup()
    r = redis.Redis.from_url(fresh_stack.redis_url, decode_responses=True)
    hour = newest_hour_ms()
    try:
        fn.process(hour_pane(hour, {"a": (20, 5), "b": (19, 0), "c": (40, 30)}))
        # b has 19 answers: not yet judged
        assert r.zrange(HARDEST_CONCEPTS_KEY, 0, -1, withscores=True) == [("a", 0.25), ("c", 0.75)]
        fn.process(hour_pane(hour, {"b": (20, 2)}, index=1))
        assert r.zrange(HARDEST_CONCEPTS_KEY, 0, -1) == ["b", "a", "c"]
        before = r.zrange(HARDEST_CONCEPTS_KEY, 0, -1, withscores=True)
        fn.process(hour_pane(hour, {"b": (20, 2)}, index=1))  # a retried pane changes nothing
        assert r.zrange(HARDEST_CONCEPTS_KEY, 0, -1, withscores=True) == before
        fn.process(hour_pane(hour - HOUR_MS, {"z": (50, 0)}, "LATE", 3))  # a late pane of the hour before
        assert r.zrange(HARDEST_CONCEPTS_KEY, 0, -1, withscores=True) == before
        fn.process(hour_pane(hour + HOUR_MS, {"a": (25, 20), "d": (3, 0)}))  # the next hour replaces, not mixes
        assert r.zrange(HARDEST_CONCEPTS_KEY, 0, -1, withscores=True) == [("a", 0.8)]
        assert int(r.get(HARDEST_CONCEPTS_WINDOW_KEY)) == hour + HOUR_MS
        assert 0 < r.ttl(HARDEST_CONCEPTS_KEY) <= 3 * 86400
    finally:
        fn.teardown()
