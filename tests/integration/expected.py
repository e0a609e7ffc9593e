"""Expected window metrics computed straight from produced events.

Deliberately independent of transforms.aggregate: a second, plain reading of
what each metric means, so the integration tests compare two implementations.
"""
from __future__ import annotations

from collections import defaultdict

SIZES_S = (60, 300, 3600, 86400)


def _ratio(n, d):
    return n / d if d else None


def expected_metrics(events: list[tuple[str, dict]], sizes_s=SIZES_S) -> dict:
    """{(window_seconds, window_start_ms, family, entity): {metric: value}}."""
    out = {}
    for size in sizes_s:
        size_ms = size * 1000
        by_window = defaultdict(list)
        for event_type, f in events:
            by_window[f["occurred_at"] // size_ms * size_ms].append((event_type, f))
        for start, evs in by_window.items():
            out.update(_window(size, start, evs))
    return out


def _window(size, start, evs):
    o = defaultdict(float)
    concept = defaultdict(lambda: defaultdict(float))
    user = defaultdict(lambda: defaultdict(float))
    content = defaultdict(lambda: defaultdict(float))
    for t, f in evs:
        o["events"] += 1
        user[f["user_id"]]["events"] += 1
        if t == "question_answered":
            for m in (o, concept[f["concept_id"]], user[f["user_id"]]):
                m["answers"] += 1
                m["correct"] += 1 if f["correct"] else 0
                m["response_time_ms_sum"] += f["response_time_ms"]
        elif t == "session_started":
            o["sessions_started"] += 1
        elif t == "session_ended":
            o["sessions_ended"] += 1
            o["session_duration_ms_sum"] += f["duration_ms"]
        elif t == "mastery_updated":
            o["mastery_updates"] += 1
            concept[f["concept_id"]]["mastery_updates"] += 1
            concept[f["concept_id"]]["mastery_change"] += f["mastery_after"] - f["mastery_before"]
        elif t == "content_viewed":
            o["content_views"] += 1
            content[f["content_id"]]["views"] += 1
            content[f["content_id"]]["view_duration_ms_sum"] += f["view_duration_ms"]
        elif t == "content_rated":
            o["ratings"] += 1
            o["rating_sum"] += f["rating"]
            content[f["content_id"]]["ratings"] += 1
            content[f["content_id"]]["rating_sum"] += f["rating"]
        elif t == "content_updated":
            o["content_updates"] += 1
        elif t == "notification_sent":
            o["notifications_sent"] += 1
        elif t == "notification_opened":
            o["notifications_opened"] += 1
        elif t == "achievement_unlocked":
            o["achievements"] += 1
        elif t == "challenge_completed":
            o["challenges_completed"] += 1
    o["active_users"] = len(user)
    o["accuracy"] = _ratio(o["correct"], o["answers"])
    o["mean_response_time_ms"] = _ratio(o["response_time_ms_sum"], o["answers"])
    o["mean_session_duration_ms"] = _ratio(o["session_duration_ms_sum"], o["sessions_ended"])
    o["mean_rating"] = _ratio(o["rating_sum"], o["ratings"])
    o["open_rate"] = _ratio(o["notifications_opened"], o["notifications_sent"])
    rows = {(size, start, "overall", "all"): o}
    for family, entities in (("concept", concept), ("user", user), ("content", content)):
        for entity, m in entities.items():
            if "answers" in m:
                m["accuracy"] = _ratio(m["correct"], m["answers"])
                m["mean_response_time_ms"] = _ratio(m["response_time_ms_sum"], m["answers"])
            if "ratings" in m:
                m["mean_rating"] = _ratio(m["rating_sum"], m["ratings"])
            rows[(size, start, family, entity)] = m
    return {k: {n: v for n, v in m.items() if v is not None} for k, m in rows.items()}


def assert_metrics_match(expected: dict, got: dict) -> None:
    """Every metric the test computed equals the stored one (counts exactly)."""
    assert set(got) == set(expected), (
        f"keys differ: missing {sorted(set(expected) - set(got))[:5]}, "
        f"unexpected {sorted(set(got) - set(expected))[:5]}")
    for key, want in expected.items():
        have = got[key]
        for name, value in want.items():
            assert name in have, f"{key}: metric {name} missing"
            assert abs(float(have[name]) - value) <= 1e-9 * max(1.0, abs(value)), (
                f"{key}: {name} is {have[name]}, expected {value}")
