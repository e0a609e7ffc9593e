"""The serving layer's Redis keys: one owner for every name a reader depends on.

The streaming job writes these keys and the analytics service (the dashboard,
/learners, /concepts) reads them; both import the names from here. Window
values keep the sink's own layout (``analytics:<label>:<start ms>:<family>:<entity>``,
see transforms/sinks/redis_sink.py); the keys below are the learner-level ones.
Importable without Beam.
"""
from __future__ import annotations

PREFIX = "analytics"

# One hash per user: the behaviour profile (transforms/profiles), each field a
# number or a JSON text; written with every change, never expires.
PROFILE_KEY = PREFIX + ":profile:{user_id}"

# Sorted set: concept -> accuracy in the current hour window, lowest first
# (ZRANGE ... 0 9 WITHSCORES gives the ten hardest); replaced when a newer hour starts.
HARDEST_CONCEPTS_KEY = PREFIX + ":concepts:hardest"
# The start (epoch ms) of the hour window the sorted set holds; it only moves forward.
HARDEST_CONCEPTS_WINDOW_KEY = HARDEST_CONCEPTS_KEY + ":window"

# List of the most recent alerts (RAISED and RESOLVED), newest first, each the
# alert record as JSON; trimmed to RECENT_ALERTS_KEPT entries.
RECENT_ALERTS_KEY = PREFIX + ":alerts:recent"
RECENT_ALERTS_KEPT = 200


def profile_key(user_id: str) -> str:
    return PROFILE_KEY.format(user_id=user_id)
