"""Learner profiles on the real stack: exact against the produced events, also
after a SIGKILL and after a re-read of every partition; the fast-answers rule's
signals from the DoFn itself.

Expected profiles are computed here from what was produced (each valid
record's fields), directly from their definitions (README "Learner profiles"),
not by the fold the job uses.
"""
from __future__ import annotations

import json
import os
import signal
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import apache_beam as beam
import psycopg2
import pytest
import redis
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from confluent_kafka import Consumer, TopicPartition

from schemas.serving import profile_key
from scripts.produce import TrafficConfig
from tests.integration.conftest import BROKERS
from tests.integration.readback import postgres_scalar
from tests.integration.test_restarts import committed_total, start_job, wait_until
from transforms.profiles import profile
from transforms.profiles.update import UpdateProfilesFn
from transforms.records import Event

pytestmark = pytest.mark.integration

HALF_LIFE_MS = 24 * 3600 * 1000   # as the README states


def produce(stack, seed: int, events: int = 5000) -> list:
    return stack.produce(TrafficConfig(events=events, users=50, concepts=10, content_items=30,
                                       span_seconds=2.5 * 86400, malformed_fraction=0.02, json_fraction=0.2,
                                       seed=seed))


def expected_profiles(produced: list) -> dict:
    """user -> the profile summary, from the valid records in production order (a user's
    records of one topic share a partition, so production order is offset order)."""
    by_user = defaultdict(list)
    for r in produced:
        if r.error_code is None:
            by_user[r.fields["user_id"]].append((r.event_type, r.fields))
    return {user: expected_profile(user, events) for user, events in by_user.items()}


def expected_profile(user: str, events: list) -> dict:
    of = defaultdict(list)
    for i, (kind, f) in enumerate(events):
        of[kind].append((i, f))
    times = [f["occurred_at"] for _, f in events]
    answers = [f for _, f in of["question_answered"]]
    ref = max((f["occurred_at"] for f in answers), default=0)
    weight = [0.5 ** ((ref - f["occurred_at"]) / HALF_LIFE_MS) for f in answers]
    started = max(((f["occurred_at"], f["session_id"]) for _, f in of["session_started"]), default=None)
    ended = {f["session_id"] for _, f in of["session_ended"]}
    days = sorted({datetime.fromtimestamp(t / 1000, tz=timezone.utc).date() for t in times})
    streak = 1
    while days[-1] - timedelta(days=streak) in days:
        streak += 1
    mastery = {}
    for i, f in sorted(of["mastery_updated"], key=lambda x: (x[1]["occurred_at"], x[0])):
        mastery[f["concept_id"]] = f["mastery_after"]
    fast = 0
    for f in answers:
        fast = fast + 1 if f["response_time_ms"] < 1000 else 0
    n = len(answers)
    return {
        "user_id": user, "first_seen_ms": min(times), "last_seen_ms": max(times), "events": len(events),
        "events_by_type": dict(sorted(Counter(k for k, _ in events).items())),
        "answers": n, "correct": sum(f["correct"] for f in answers),
        "accuracy": sum(f["correct"] for f in answers) / n if n else None,
        "recent_accuracy": (sum(w for w, f in zip(weight, answers) if f["correct"]) / sum(weight)) if n else None,
        "recent_half_life_hours": 24.0,
        "mean_response_ms": sum(f["response_time_ms"] for f in answers) / n if n else None,
        "sessions_started": len(of["session_started"]), "sessions_ended": len(of["session_ended"]),
        "session_ms_total": sum(f["duration_ms"] for _, f in of["session_ended"]),
        "current_session": (None if started is None or started[1] in ended
                            else {"session_id": started[1], "started_at_ms": started[0]}),
        "days": [d.isoformat() for d in days], "days_active": len(days), "current_streak_days": streak,
        "mastery": dict(sorted(mastery.items())),
        "achievements": len(of["achievement_unlocked"]),
        "achievement_points": sum(f["points"] for _, f in of["achievement_unlocked"]),
        "notifications_sent": len(of["notification_sent"]), "notifications_opened": len(of["notification_opened"]),
        "fast_answer_streak": fast,
    }


def postgres_profiles(dsn: str) -> dict:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT user_id, profile FROM learner_profiles")
        return {u: profile.summary(u, profile.load(p)) for u, p in cur.fetchall()}


def redis_profiles(url: str, users) -> dict:
    """The Redis hashes parsed back: JSON fields decoded, numbers as numbers, absent ratios None."""
    r = redis.Redis.from_url(url, decode_responses=True)
    out = {}
    for user in users:
        h = r.hgetall(profile_key(user))
        if not h:
            continue
        parsed = {k: (json.loads(v) if k in profile.JSON_FIELDS else v if k == "user_id" else float(v))
                  for k, v in h.items()}
        for ratio in ("accuracy", "recent_accuracy", "mean_response_ms"):
            parsed.setdefault(ratio, None)
        out[user] = parsed
    return out


def assert_profiles(expected: dict, actual: dict, where: str) -> None:
    assert sorted(actual) == sorted(expected), f"{where}: users differ"
    for user, want in expected.items():
        got = actual[user]
        assert sorted(got) == sorted(want), f"{where} {user}: fields differ"
        for field, value in want.items():
            if isinstance(value, float) or isinstance(got[field], float):
                assert got[field] == pytest.approx(value, rel=1e-9), f"{where} {user}.{field}"
            else:
                assert got[field] == value, f"{where} {user}.{field}"


def assert_exact(stack, produced: list) -> None:
    expected = expected_profiles(produced)
    assert_profiles(expected, postgres_profiles(stack.dsn), "postgres")
    assert_profiles(expected, redis_profiles(stack.redis_url, expected), "redis")


def run_until_idle(stack) -> None:
    proc = stack.run_streaming(until_idle=5, early_firing=1)
    assert proc.returncode == 0, proc.stderr[-3000:]


def applied_events(stack) -> int:
    try:
        return postgres_scalar(stack.dsn, "SELECT coalesce(sum((profile->>'events')::bigint), 0) "
                                          "FROM learner_profiles")
    except psycopg2.Error:  # the job has not created its tables yet
        return 0


def rewind_group(stack) -> None:
    """Commits offset 0 for every event partition: the next run reads everything again."""
    c = Consumer({"bootstrap.servers": BROKERS, "group.id": stack.group_id, "enable.auto.commit": False})
    try:
        tps = [TopicPartition(t, p, 0) for t in stack.event_topics().split(",")
               for p in c.list_topics(t, timeout=10).topics[t].partitions]
        c.commit(offsets=tps, asynchronous=False)
    finally:
        c.close()


def test_profiles_are_exact_after_a_run_and_after_a_full_re_read(fresh_stack):
    """One run until idle; then the group is rewound to offset 0 and the job reads
    everything again (a restart whose Kafka offsets lag the profiles at the extreme):
    every event is recognised as applied (profile_offsets), none counts twice."""
    produced = produce(fresh_stack, seed=101)
    run_until_idle(fresh_stack)
    expected = expected_profiles(produced)
    assert len(expected) == 50
    assert any(p["current_session"] for p in expected.values())          # the stream leaves sessions open
    assert max(p["days_active"] for p in expected.values()) >= 3          # and spans days
    assert_exact(fresh_stack, produced)
    rewind_group(fresh_stack)
    assert committed_total(fresh_stack) == 0
    run_until_idle(fresh_stack)
    assert committed_total(fresh_stack) == len(produced)   # everything was read again
    assert_exact(fresh_stack, produced)


def test_profiles_are_exact_after_a_sigkill(fresh_stack):
    """SIGKILL of the job's process group as soon as the first profiles are committed
    (each partition's bundle commits its own transaction, so some partitions are in,
    others not, and Kafka's offsets lag behind); restart until idle."""
    produced = produce(fresh_stack, seed=202)
    job = start_job(fresh_stack, until_idle=30, early_firing=1)
    try:
        wait_until(job, lambda: applied_events(fresh_stack) > 0)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
    run_until_idle(fresh_stack)
    assert_exact(fresh_stack, produced)


def answer_event(user: str, t: int, response_ms: int, offset: int, topic: str) -> Event:
    fields = {"event_id": str(uuid.uuid4()), "occurred_at": t, "user_id": user, "correlation_id": None,
              "session_id": "s1", "question_id": "q1", "concept_id": "c1", "correct": True,
              "response_time_ms": response_ms, "attempt": 1, "difficulty": "EASY"}
    return Event("question_answered", t, fields, 1, 1, topic, 0, offset)


def test_fast_answers_signal_once_per_streak_and_once_more_when_it_ends(fresh_stack):
    """The DoFn on real Postgres and Redis: 10 fast answers then a normal one raise one
    signal and resolve it; the same events read again (a restart) signal nothing."""
    topic, t0 = fresh_stack.topics["learning"], 1_767_225_600_000
    speeds = [8000, 400] + [300] * 9 + [7000, 9000]   # fast run at offsets 1..10, ended by offset 11
    events = [answer_event("bot-1", t0 + i * 2000, ms, i, topic) for i, ms in enumerate(speeds)]
    batches = [events[:5], events[5:9], events[9:]]   # three Kafka polls

    def run(batches) -> list:
        # The FnApiRunner itself: an explicit "DirectRunner" first tries Beam's shared Prism job
        # server without our binary, and that failed (download) server is then kept for the
        # process, failing every later Prism pipeline of the test run (Beam 2.77).
        with TestPipeline(runner=FnApiRunner()) as p:
            signals = (p | beam.Create(batches, reshuffle=False)
                       | beam.ParDo(UpdateProfilesFn(fresh_stack.dsn, fresh_stack.redis_url, fresh_stack.group_id))
                       | beam.Map(lambda s: (s.kind, s.entity_id, s.in_range, s.observed, s.window_start_ms,
                                             s.window_end_ms, s.window_seconds)))
            assert_that(signals, equal_to(expected))


    expected = [("fast_answers", "bot-1", False, 8.0, t0 + 2000, t0 + 16000, 14),
                ("fast_answers", "bot-1", True, 0.0, t0 + 20000, t0 + 22000, 2)]
    run(batches)
    expected = []   # the same offsets again: already applied, no signal, no change
    run(batches)
    pg = postgres_profiles(fresh_stack.dsn)["bot-1"]
    assert (pg["answers"], pg["fast_answer_streak"]) == (13, 0)
    assert redis_profiles(fresh_stack.redis_url, ["bot-1"])["bot-1"]["answers"] == 13
    assert postgres_scalar(fresh_stack.dsn, "SELECT next_offset FROM profile_offsets") == 13
