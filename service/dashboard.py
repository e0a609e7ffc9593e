"""The live dashboard's reads: the serving layer in Redis, a few bounded round trips per poll.

    reader = ServingReader("redis://127.0.0.1:6379/0")
    reader.panels()              # {"minutes": [...60...], "active_users", "hardest_concepts", "alerts", "redis"}
    reader.learner("user-00042") # the profile hash, JSON values decoded; None when absent
    reader.hardest(10)           # [{"concept", "accuracy"}], lowest accuracy first

Everything comes from keys the streaming job already writes (never raw_events,
never Postgres): the 1-minute overall hashes
``analytics:1m:<start ms>:overall:all`` of the hour ending at the newest
minute (``analytics:1m:latest``), the newest 5-minute overall hash (active
users), and the serving keys of schemas/serving.py. A poll costs two
pipelined round trips (the two ``latest`` pointers, then 61 HMGETs, one ZRANGE
and one LRANGE), each bounded by ``TIMEOUT_S``, and the answer is cached for
``CACHE_S`` so several open pages cost the job no more than one. Never
raises: Redis away gives empty panels and ``redis.error``.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from schemas.serving import HARDEST_CONCEPTS_KEY, RECENT_ALERTS_KEY, latest_window_key, profile_key, window_key
from service.concepts import hardest_concepts

TIMEOUT_S = 1.0
CACHE_S = 1.0
MINUTES = 60                 # the charts' span: the last hour, by minute
ALERTS_SHOWN = 20
HARDEST_SHOWN = 10
HARDEST_MAX = 100            # /concepts/hardest?n= is capped here
# The fields of a 1-minute overall hash the charts use (transforms/aggregate.py names them).
MINUTE_FIELDS = ("events", "answers", "correct", "accuracy")
MINUTE_MS = 60_000


def decode_value(text: str) -> Any:
    """A profile field: JSON text (numbers, objects, lists) decoded; anything else as it is."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _number(text: Optional[str]) -> Optional[float]:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def minute_row(start_ms: int, values: list) -> dict:
    """One minute of the charts: events, events/s (events / 60), answers, accuracy (None: no data)."""
    events, answers, correct, accuracy = (_number(v) for v in values)
    return {"start_ms": start_ms, "events": events,
            "events_per_second": None if events is None else round(events / 60.0, 3),
            "answers": answers, "correct": correct, "accuracy": accuracy}


def empty_panels(error: Optional[str]) -> dict:
    return {"minutes": [], "newest_minute_ms": None, "active_users": None, "hardest_concepts": [],
            "alerts": [], "redis": {"ok": error is None, "error": error}}


class ServingReader:
    """Bounded, cached reads of the serving layer for the dashboard and the learner/concept endpoints."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S, cache_s: float = CACHE_S):
        # No retries inside the client: a poll that fails shows "Redis away" and the next poll tries again.
        self.client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                           retry=Retry(NoBackoff(), 0), decode_responses=True)
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._last: Optional[dict] = None
        self._last_at = 0.0

    def panels(self) -> dict:
        """The dashboard's Redis panels (see the module docstring), at most ``cache_s`` old."""
        with self._lock:
            if self._last is None or time.monotonic() - self._last_at >= self.cache_s:
                self._last = self._read_panels()
                self._last_at = time.monotonic()
            return self._last

    def _read_panels(self) -> dict:
        try:
            newest_1m, newest_5m = self.client.mget(latest_window_key("1m"), latest_window_key("5m"))
            newest = int(newest_1m) if newest_1m else (int(time.time() * 1000) // MINUTE_MS) * MINUTE_MS
            starts = [newest - (MINUTES - 1 - i) * MINUTE_MS for i in range(MINUTES)]
            pipe = self.client.pipeline(transaction=False)
            for start in starts:
                pipe.hmget(window_key("1m", start, "overall", "all"), MINUTE_FIELDS)
            if newest_5m:
                pipe.hmget(window_key("5m", int(newest_5m), "overall", "all"), ("active_users", "window_end"))
            pipe.zrange(HARDEST_CONCEPTS_KEY, 0, HARDEST_SHOWN - 1, withscores=True)
            pipe.lrange(RECENT_ALERTS_KEY, 0, ALERTS_SHOWN - 1)
            answers = pipe.execute()
        except redis.RedisError as e:
            return empty_panels(f"{type(e).__name__}: {e}")
        minutes = [minute_row(s, v) for s, v in zip(starts, answers[:MINUTES])]
        rest = answers[MINUTES:]
        active = None
        if newest_5m:
            users, end = rest.pop(0)
            if users is not None:
                active = {"value": int(float(users)), "window_start_ms": int(newest_5m),
                          "window_end_ms": int(end) if end else int(newest_5m) + 5 * MINUTE_MS}
        hardest, alerts = rest
        return {"minutes": minutes, "newest_minute_ms": int(newest_1m) if newest_1m else None,
                "active_users": active,
                "hardest_concepts": [{"concept": c, "accuracy": a} for c, a in hardest],
                "alerts": [_alert(text) for text in alerts], "redis": {"ok": True, "error": None}}

    def learner(self, user_id: str) -> Optional[dict]:
        """The profile hash of ``user_id`` with its values decoded; None when there is none. Raises RedisError."""
        fields = self.client.hgetall(profile_key(user_id))
        if not fields:
            return None
        return {name: decode_value(value) for name, value in sorted(fields.items())}

    def hardest(self, n: int) -> list:
        """The ``n`` concepts with the lowest accuracy now, lowest first. Raises RedisError."""
        return [{"concept": c, "accuracy": a} for c, a in hardest_concepts(self.client, max(1, n))]

    def close(self) -> None:
        self.client.close()


def _alert(text: str) -> dict:
    """One entry of the recent-alerts list (an Alert record as JSON); text that is not JSON is shown as is."""
    try:
        alert = json.loads(text)
    except ValueError:
        return {"message": text, "kind": "unreadable"}
    return alert if isinstance(alert, dict) else {"message": text, "kind": "unreadable"}
