"""Episodes: which AlertSignals become alerts. Pure, so the rules of an episode are tested alone.

An episode of (kind, entity) opens with a RAISED alert on the first
out-of-range signal when none is open and the entity is out of its cooldown,
and closes with a RESOLVED alert on the next in-range signal of a later
window. Everything else is ignored: one alert per episode, never one per pane.
transforms/alerts/publish.py applies :func:`decide` inside a Postgres
transaction that holds the (kind, entity) lock, so that Postgres, not Beam
state, decides (and remembers across restarts). :func:`needs_decision` tells it
beforehand which signals of a bundle cannot do anything (in range, nothing open),
so that those cost no transaction.
"""
from __future__ import annotations

import uuid
from typing import Collection, NamedTuple, Optional, Sequence

from transforms.alerts.signal import AlertSignal

# After an episode resolved, no new episode of the same (kind, entity) opens for
# this long in event time (from the end of the window that resolved it): a value
# that hovers at the threshold pages a person once, not every few minutes.
COOLDOWN_S = 15 * 60

RAISE, RESOLVE, IGNORE = "RAISE", "RESOLVE", "IGNORE"
# Why a signal was ignored (the publisher's counters are named after these).
ALREADY_OPEN, COOLING_DOWN, NOTHING_OPEN, NOT_NEWER = "already_open", "cooling_down", "nothing_open", "not_newer"

# uuid5 namespace of alert ids: the same episode and status always get the same id.
ALERT_NAMESPACE = uuid.UUID("6f1c2a7e-8b1d-5c3e-9a40-a1e27a1e2710")


class OpenEpisode(NamedTuple):
    alert_id: str
    window_start_ms: int


class LastResolved(NamedTuple):
    window_start_ms: int
    window_end_ms: int


class Decision(NamedTuple):
    action: str                 # RAISE, RESOLVE or IGNORE
    reason: str = ""            # for IGNORE


def decide(signal: AlertSignal, open_episode: Optional[OpenEpisode],
           last_resolved: Optional[LastResolved], cooldown_s: int = COOLDOWN_S) -> Decision:
    """What ``signal`` does to its (kind, entity), given the open episode and the last resolved one."""
    if not signal.in_range:
        if open_episode is not None:
            return Decision(IGNORE, ALREADY_OPEN)
        if last_resolved is not None and signal.window_start_ms < last_resolved.window_end_ms + cooldown_s * 1000:
            return Decision(IGNORE, COOLING_DOWN)  # also a replayed window from before the resolution
        return Decision(RAISE)
    if open_episode is None:
        return Decision(IGNORE, NOTHING_OPEN)
    if signal.window_start_ms <= open_episode.window_start_ms:
        return Decision(IGNORE, NOT_NEWER)  # an older window's pane, seen again (a restart) or late
    return Decision(RESOLVE)


def needs_decision(signals: Sequence[AlertSignal], open_keys: Collection[tuple[str, str]]) -> list[bool]:
    """For each of ``signals`` (in the order they will be decided): whether it must be decided.

    ``open_keys``: the (kind, entity_id) pairs with an open episode before the first of them.
    False only for an in-range signal of a (kind, entity) that has no open episode and no
    out-of-range signal before it in ``signals``: :func:`decide` ignores it (NOTHING_OPEN)
    whatever the last resolved episode. An out-of-range signal may open an episode that a later
    signal of the same (kind, entity) resolves, so from there on every one of them is decided.
    """
    live = set(open_keys)
    out = []
    for signal in signals:
        key = (signal.kind, signal.entity_id)
        if not signal.in_range:
            live.add(key)
        out.append(key in live)
    return out


def alert_id(signal: AlertSignal, status: str) -> str:
    """Deterministic: uuid5 of kind, entity, window start and status."""
    return str(uuid.uuid5(ALERT_NAMESPACE, f"{signal.kind}|{signal.entity_id}|{signal.window_start_ms}|{status}"))
