"""The serving layer's Redis keys: one owner for every name a reader depends on.

The streaming job writes these keys and the analytics service (the dashboard,
/learners, /concepts) reads them; both import the names from here. Window
values keep the sink's own layout (``analytics:<label>:<start ms>:<family>:<entity>``,
see transforms/sinks/redis_sink.py, keys from :func:`window_key`); the other keys are the
learner-level ones.
Importable without Beam.
"""
from __future__ import annotations

PREFIX = "analytics"


def window_key(label: str, window_start_ms: int, family: str, entity: str, prefix: str = PREFIX) -> str:
    """The hash of one window row: ``analytics:<label>:<window start ms>:<family>:<entity>``
    (label as transforms.aggregate.window_label gives it: 1m, 5m, 1h, 1d)."""
    return f"{prefix}:{label}:{window_start_ms}:{family}:{entity}"


def latest_window_key(label: str, prefix: str = PREFIX) -> str:
    """The start (epoch ms) of the newest window of a size that the sink wrote."""
    return f"{prefix}:{label}:latest"

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
