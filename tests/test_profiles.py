"""The learner profile's pure fold (transforms/profiles/profile.py): order
independence across topics and bundles, the recency weight, sessions, streaks
and the fast-answers rule, against values worked out by hand."""
from __future__ import annotations

import json
import random

import pytest

from scripts.produce import TrafficConfig, generate
from tests.helpers import BASE_MS, answer
from transforms.profiles import profile
from transforms.records import Event

DAY = 86_400_000


def events_of(produced) -> list[Event]:
    """Produced records as the job would see them: one partition per (topic, user), offsets in order."""
    offsets: dict = {}
    out = []
    for r in produced:
        if r.error_code is not None:
            continue
        key = (r.topic, hash(r.fields["user_id"]) % 3)
        offsets[key] = offsets.get(key, -1) + 1
        out.append(Event(r.event_type, r.fields["occurred_at"], r.fields, 1, 1, key[0], key[1], offsets[key]))
    return out


def fold(events, round_trip_every: int = 0) -> dict:
    """Folds events into per-user states; a JSON round trip every ``round_trip_every`` events (a bundle
    boundary: the state goes to Postgres and back)."""
    states: dict = {}
    for i, e in enumerate(events, 1):
        user = e.fields["user_id"]
        profile.apply(states.setdefault(user, profile.empty()), e)
        if round_trip_every and i % round_trip_every == 0:
            states = {u: profile.load(json.loads(profile.stored(s))) for u, s in states.items()}
    return {u: profile.summary(u, s) for u, s in states.items()}


def interleave(events, seed: int) -> list[Event]:
    """Another arrival order: the partitions' sequences kept, interleaved at random."""
    rng = random.Random(seed)
    queues: dict = {}
    for e in events:
        queues.setdefault((e.topic, e.partition), []).append(e)
    lists = [list(reversed(q)) for q in queues.values()]
    out = []
    while lists:
        q = rng.choice(lists)
        out.append(q.pop())
        if not q:
            lists.remove(q)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for user in a:
        for field, value in a[user].items():
            if isinstance(value, float):
                assert b[user][field] == pytest.approx(value, rel=1e-9), (user, field)
            else:
                assert b[user][field] == value, (user, field)


def test_any_interleaving_and_bundling_gives_the_same_profiles():
    produced = list(generate(TrafficConfig(events=3000, users=20, span_seconds=3 * 86400, seed=5)))
    events = events_of(produced)
    reference = fold(events)
    assert_same(reference, fold(interleave(events, 1), round_trip_every=97))
    assert_same(reference, fold(interleave(events, 2), round_trip_every=1))
    by_topic = sorted(events, key=lambda e: e.topic, reverse=True)  # one topic after the other
    assert_same(reference, fold(by_topic, round_trip_every=500))


def ev(event_type: str, t: int, offset: int = 0, **fields) -> Event:
    return Event(event_type, t, dict({"user_id": "u1", "occurred_at": t}, **fields), 1, 1,
                 "learning.events.v1", 0, offset)


def qa(t: int, correct: bool = True, rt: int = 8000, offset: int = 0) -> Event:
    return Event("question_answered", t, answer(t, correct=correct, rt=rt), 1, 1, "learning.events.v1", 0, offset)


def test_recency_weighted_accuracy_by_hand():
    # Half-life one day: at the latest answer (day 2) the weights are 1/4, 1/2 and 1.
    answers = [qa(BASE_MS, True), qa(BASE_MS + DAY, False), qa(BASE_MS + 2 * DAY, True)]
    expected = (0.25 + 1.0) / (0.25 + 0.5 + 1.0)
    for order in (answers, answers[::-1], [answers[1], answers[2], answers[0]]):
        state = profile.empty()
        for e in order:
            profile.apply(state, e)
        s = profile.summary("u1", state)
        assert s["recent_accuracy"] == pytest.approx(expected, rel=1e-12)
        assert s["accuracy"] == pytest.approx(2 / 3)
        assert s["mean_response_ms"] == 8000


def test_current_session_open_then_closed_whatever_the_order():
    started1 = ev("session_started", BASE_MS, session_id="s1")
    ended1 = ev("session_ended", BASE_MS + 60_000, session_id="s1", duration_ms=60_000)
    started2 = ev("session_started", BASE_MS + 120_000, session_id="s2")
    for order in ([started1, ended1, started2], [started2, ended1, started1]):
        state = profile.empty()
        for e in order:
            profile.apply(state, e)
        assert profile.current_session(state) == {"session_id": "s2", "started_at_ms": BASE_MS + 120_000}
    profile.apply(state, ev("session_ended", BASE_MS + 180_000, session_id="s2", duration_ms=60_000))
    assert profile.current_session(state) is None
    s = profile.summary("u1", state)
    assert (s["sessions_started"], s["sessions_ended"], s["session_ms_total"]) == (2, 2, 120_000)


def test_days_active_and_current_streak():
    # BASE_MS is 2026-01-01T00:00Z: days 1, 3, 4, 5 -> streak 3 ending on the 5th.
    state = profile.empty()
    for d in (4, 0, 2, 3):
        profile.apply(state, ev("content_viewed", BASE_MS + d * DAY + 3_600_000))
    s = profile.summary("u1", state)
    assert s["days"] == ["2026-01-01", "2026-01-03", "2026-01-04", "2026-01-05"]
    assert (s["days_active"], s["current_streak_days"]) == (4, 3)
    assert (s["first_seen_ms"], s["last_seen_ms"]) == (BASE_MS + 3_600_000, BASE_MS + 4 * DAY + 3_600_000)


def test_latest_mastery_by_event_time_then_offset():
    state = profile.empty()
    for e in (ev("mastery_updated", BASE_MS + 5, 3, concept_id="c", mastery_before=0.1, mastery_after=0.5),
              ev("mastery_updated", BASE_MS + 9, 1, concept_id="c", mastery_before=0.1, mastery_after=0.7),
              ev("mastery_updated", BASE_MS + 9, 2, concept_id="c", mastery_before=0.1, mastery_after=0.8),
              ev("mastery_updated", BASE_MS + 1, 4, concept_id="d", mastery_before=0.1, mastery_after=0.2)):
        profile.apply(state, e)
    assert profile.summary("u1", state)["mastery"] == {"c": 0.8, "d": 0.2}


def test_achievements_and_notifications():
    state = profile.empty()
    for e in (ev("achievement_unlocked", BASE_MS, achievement_id="a", points=25),
              ev("achievement_unlocked", BASE_MS, achievement_id="b", points=10),
              ev("notification_sent", BASE_MS, notification_id="n1", channel="EMAIL"),
              ev("notification_sent", BASE_MS, notification_id="n2", channel="PUSH"),
              ev("notification_opened", BASE_MS, notification_id="n1", channel="EMAIL")):
        profile.apply(state, e)
    s = profile.summary("u1", state)
    assert (s["achievements"], s["achievement_points"]) == (2, 35)
    assert (s["notifications_sent"], s["notifications_opened"]) == (2, 1)
    assert s["events_by_type"] == {"achievement_unlocked": 2, "notification_opened": 1, "notification_sent": 2}
    assert "accuracy" not in profile.redis_fields("u1", state)   # no answers: no ratio


def test_fast_answers_raise_once_at_eight_and_resolve_on_the_next_normal_answer():
    state = profile.empty()
    signals = []
    for i in range(7):   # seven fast, then a normal one: below the threshold, nothing
        signals += profile.apply(state, qa(BASE_MS + i * 2000, rt=400, offset=i))
    signals += profile.apply(state, qa(BASE_MS + 20_000, rt=9000, offset=7))
    assert signals == []
    start = BASE_MS + 100_000
    for i in range(10):  # ten fast answers 1.5 s apart: one signal, at the eighth
        signals += profile.apply(state, qa(start + i * 1500, rt=999, offset=10 + i))
    assert len(signals) == 1
    raised = signals[0]
    assert (raised.kind, raised.entity_type, raised.entity_id, raised.in_range) == ("fast_answers", "user", "u1", False)
    assert (raised.window_start_ms, raised.window_end_ms, raised.window_seconds) == (start, start + 7 * 1500, 10)
    assert (raised.observed, raised.expected_low, raised.expected_high, raised.severity) == (8, 0, 7, "WARNING")
    assert profile.summary("u1", state)["fast_answer_streak"] == 10
    signals += profile.apply(state, qa(start + 20_000, rt=1000, offset=30))  # 1000 ms is not fast
    assert len(signals) == 2 and signals[1].in_range and signals[1].observed == 0
    assert signals[1].window_start_ms == start + 9 * 1500 and signals[1].window_end_ms == start + 20_000
    signals += profile.apply(state, qa(start + 30_000, rt=5000, offset=31))  # no streak to end
    assert len(signals) == 2
    assert profile.summary("u1", state)["fast_answer_streak"] == 0


def test_redis_fields_are_numbers_and_json_texts():
    state = profile.empty()
    profile.apply(state, qa(BASE_MS, True, rt=4000))
    profile.apply(state, ev("session_started", BASE_MS, session_id="s1"))
    fields = profile.redis_fields("u1", state)
    assert fields["answers"] == 1 and fields["accuracy"] == 1.0 and fields["mean_response_ms"] == 4000
    assert json.loads(fields["current_session"]) == {"session_id": "s1", "started_at_ms": BASE_MS}
    assert json.loads(fields["events_by_type"]) == {"question_answered": 1, "session_started": 1}
    assert json.loads(fields["days"]) == ["2026-01-01"] and json.loads(fields["mastery"]) == {}
