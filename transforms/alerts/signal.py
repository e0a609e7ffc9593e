"""AlertSignal: what a rule saw, for the alert publisher to turn into episodes.

A rule emits a signal each time it evaluates an entity with enough samples:
``in_range`` False means the value is anomalous now, True that it is normal
now. The publisher (transforms/alerts) opens an episode (a RAISED alert) on the
first anomalous signal of an entity without an open episode and out of its
cooldown, and closes it (a RESOLVED alert) on the next in-range signal; every
other signal changes nothing. So rules may signal once per pane, and a person
still gets one alert per episode.
"""
from __future__ import annotations

from typing import NamedTuple


class AlertSignal(NamedTuple):
    kind: str            # e.g. "fast_answers"; the README's rule table lists them
    severity: str        # INFO, WARNING or CRITICAL
    entity_type: str     # concept, event_type, topic or user
    entity_id: str
    window_seconds: int  # the window the value was observed in
    window_start_ms: int
    window_end_ms: int
    observed: float
    expected_low: float
    expected_high: float
    in_range: bool
    message: str         # one sentence for a person (used when it raises)
