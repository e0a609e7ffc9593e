"""Concept performance, read from what the streaming job keeps in Redis.

Pure readers (no Beam, no HTTP): the service's endpoints and the dashboard
call them with a redis-py client (either ``decode_responses`` setting)::

    concept_performance(r, "concept-007")
    # {"concept_id": "concept-007", "windows": {
    #    "5m": {"window_start_ms": ..., "window_end_ms": ..., "attempts": 41, "correct": 23,
    #           "accuracy": 0.56, "mean_response_time_ms": 5120.4, "pane_timing": "EARLY"},
    #    "1h": {..., "struggling_users": 3}, "1d": {..., "struggling_users": 11}}}
    hardest_concepts(r, 10)   # [("concept-031", 0.41), ...], lowest accuracy first

A window is the newest one the job wrote for its size
(``analytics:<label>:latest``); a concept nobody answered in it has 0
attempts and no accuracy. ``attempts`` is the window's ``answers`` counter.
``struggling_users`` (windows of an hour or more): users whose accuracy on the
concept is below 0.5 over at least 5 answers in that window
(transforms.aggregate STRUGGLING_*). A window size the job has not written yet
is None.
"""
from __future__ import annotations

from typing import Any, Optional

from schemas.serving import HARDEST_CONCEPTS_KEY, latest_window_key, window_key

# The windows of "the last 5 minutes, hour and day": label -> seconds.
CONCEPT_WINDOWS = {"5m": 300, "1h": 3600, "1d": 86400}
STRUGGLING_WINDOW_S = 3600  # only the hour window's concept rows carry struggling_users


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def concept_performance(redis_client, concept_id: str) -> dict:
    """The concept's numbers in the newest 5-minute, hour and day windows (two round trips)."""
    labels = list(CONCEPT_WINDOWS)
    starts = redis_client.mget([latest_window_key(label) for label in labels])
    known = {label: int(_text(s)) for label, s in zip(labels, starts) if s is not None}
    pipe = redis_client.pipeline(transaction=False)
    for label, start in known.items():
        pipe.hgetall(window_key(label, start, "concept", concept_id))
    hashes = dict(zip(known, pipe.execute()))
    windows: dict[str, Optional[dict]] = {
        label: _window(seconds, known[label], hashes[label]) if label in known else None
        for label, seconds in CONCEPT_WINDOWS.items()}
    return {"concept_id": concept_id, "windows": windows}


def _window(seconds: int, start_ms: int, stored: dict) -> dict:
    m = {_text(k): _text(v) for k, v in stored.items()}
    attempts = float(m.get("answers", 0))
    out: dict = {"window_start_ms": start_ms, "window_end_ms": start_ms + seconds * 1000,
                 "attempts": int(attempts), "correct": int(float(m.get("correct", 0))),
                 "accuracy": float(m["accuracy"]) if "accuracy" in m else None,
                 "mean_response_time_ms": float(m["mean_response_time_ms"]) if "mean_response_time_ms" in m else None,
                 "pane_timing": m.get("pane_timing")}
    if seconds == STRUGGLING_WINDOW_S:
        out["struggling_users"] = int(float(m.get("struggling_users", 0)))
    return out


def hardest_concepts(redis_client, n: int = 10) -> list[tuple[str, float]]:
    """The ``n`` concepts with the lowest accuracy in the newest hour (enough answers only), lowest first."""
    return [(_text(c), float(s)) for c, s in redis_client.zrange(HARDEST_CONCEPTS_KEY, 0, n - 1, withscores=True)]
