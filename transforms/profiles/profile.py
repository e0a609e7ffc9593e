"""A learner's behaviour profile: the state, how one event changes it, and how it is shown.

Pure Python, no Beam, no I/O: ``UpdateProfilesFn`` (transforms/profiles/update.py)
loads the state from Postgres, calls :func:`apply` for each new event, and
stores the state again; :func:`redis_fields` is what the Redis hash holds.

The state is a JSON object (Postgres ``learner_profiles.profile``), see
:func:`empty`. Every part of it is order-independent across topics, because a
user's events arrive on three topics (one partition each: the producer keys by
user id) and the runner interleaves them freely:

- counts and sums add up; first and last seen are a min and a max;
- "latest" things (the last session started and ended, the mastery of a
  concept) are a max over a total order (event time, then session id or offset);
- the recency-weighted accuracy keeps weighted sums at a reference time (the
  latest answer's event time) and rescales to the later reference when a later
  answer comes: the same sums whatever the order (up to float rounding);
- days active are a set.

The one order-dependent part, the fast-answer streak, reads only
``question_answered``, which travels on one topic: a user's answers are in one
partition and are applied in offset order.

Assumption: a user's sessions do not overlap (a session is started after the
previous one ended), so the session is open when the latest session started has
not ended, and the latest session ended is the only one to compare with.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Optional

from transforms.alerts.signal import AlertSignal
from transforms.records import Event, utc_day

# The recency-weighted accuracy: an answer's weight halves every HALF_LIFE_MS of
# EVENT time before the user's latest answer (an answer a day older counts half).
HALF_LIFE_MS = 24 * 3600 * 1000

# The fast-answers rule: an answer faster than FAST_ANSWER_MS is implausibly fast
# (the generator's response times are lognormal(9, 0.5) ms: median ~8.1 s, and
# P(< 1 s) ~ 1e-5, so FAST_STREAK_ALERT of them in a row never happen by chance).
FAST_ANSWER_MS = 1000
# How many of a user's latest session ends a profile keeps to tell whether the latest
# session started has ended.
ENDED_KEPT = 20
FAST_STREAK_ALERT = 8
FAST_ANSWERS_KIND = "fast_answers"


def empty() -> dict:
    """The profile of a user with no events (also what a ``{}`` row from Postgres becomes)."""
    return {
        "first_seen_ms": None, "last_seen_ms": None, "events": 0, "events_by_type": {},
        "answers": 0, "correct": 0, "response_ms_total": 0,
        # answers and correct answers weighted by 2^-((ref_ms - t) / HALF_LIFE_MS)
        "recent": {"answers": 0.0, "correct": 0.0, "ref_ms": None},
        "sessions_started": 0, "sessions_ended": 0, "session_ms_total": 0,
        "last_started": None,                        # {"id": session id, "at": event time ms}
        "recently_ended": [],                        # [event time ms, session id] of the latest
                                                     # ENDED_KEPT sessions ended, oldest first
        "days": [],                                  # UTC days with an event, "YYYY-MM-DD", sorted
        "mastery": {},                               # concept -> [event time ms, offset, mastery_after]
        "achievements": 0, "achievement_points": 0,
        "notifications_sent": 0, "notifications_opened": 0,
        # the current run of fast answers: length, first/last event time, whether it signalled
        "fast": {"length": 0, "first_ms": None, "last_ms": None, "signalled": False},
    }


def load(stored: Optional[dict]) -> dict:
    """A stored profile (or ``{}``/None for a new user) as a complete state."""
    state = empty()
    state.update(stored or {})
    ended = state.pop("last_ended", None)   # the single latest of profiles stored before 2026-11-28
    if ended is not None and not state["recently_ended"]:
        state["recently_ended"] = [[ended["at"], ended["id"]]]
    return state


def apply(state: dict, event: Event) -> list[AlertSignal]:
    """Folds ``event`` into ``state`` (in place); returns the fast-answers signals it causes."""
    t = event.event_time_ms
    state["events"] += 1
    by_type = state["events_by_type"]
    by_type[event.event_type] = by_type.get(event.event_type, 0) + 1
    state["first_seen_ms"] = t if state["first_seen_ms"] is None else min(state["first_seen_ms"], t)
    state["last_seen_ms"] = t if state["last_seen_ms"] is None else max(state["last_seen_ms"], t)
    _add_day(state, t)
    handler = _HANDLERS.get(event.event_type)
    return handler(state, event) if handler else []


def _add_day(state: dict, t: int) -> None:
    day = utc_day(t)
    days = state["days"]
    if day not in days:
        days.append(day)
        days.sort()



def _answered(state: dict, event: Event) -> list[AlertSignal]:
    f, t = event.fields, event.event_time_ms
    state["answers"] += 1
    state["correct"] += 1 if f["correct"] else 0
    state["response_ms_total"] += f["response_time_ms"]
    add_recent(state["recent"], t, bool(f["correct"]))
    return _fast_streak(state, f["user_id"], t, f["response_time_ms"])


def add_recent(recent: dict, t: int, correct: bool) -> None:
    """Adds one answer at event time ``t`` to the weighted sums, moving the reference forward if later."""
    if recent["ref_ms"] is None:
        recent["ref_ms"] = t
    elif t > recent["ref_ms"]:
        decay = 2.0 ** (-(t - recent["ref_ms"]) / HALF_LIFE_MS)
        recent["answers"] *= decay
        recent["correct"] *= decay
        recent["ref_ms"] = t
    weight = 2.0 ** (-(recent["ref_ms"] - t) / HALF_LIFE_MS)
    recent["answers"] += weight
    recent["correct"] += weight if correct else 0.0


def _fast_streak(state: dict, user: str, t: int, response_ms: int) -> list[AlertSignal]:
    fast = state["fast"]
    if response_ms < FAST_ANSWER_MS:
        fast["length"] += 1
        fast["first_ms"] = t if fast["first_ms"] is None else min(fast["first_ms"], t)
        fast["last_ms"] = t if fast["last_ms"] is None else max(fast["last_ms"], t)
        if fast["length"] == FAST_STREAK_ALERT:
            fast["signalled"] = True
            return [fast_signal(user, fast["first_ms"], fast["last_ms"], fast["length"], in_range=False)]
        return []
    signals = []
    if fast["signalled"]:  # this normal-speed answer ends a streak that raised
        # The window where the speed was back in range: from the streak's last fast answer to
        # this one. It starts after the raise's window (the streak's first answer), as the
        # publisher resolves an episode only with a newer window than the one that raised it.
        start = max(fast["last_ms"], fast["first_ms"] + 1)
        signals.append(fast_signal(user, start, max(start, t), fast["length"], in_range=True))
    state["fast"] = {"length": 0, "first_ms": None, "last_ms": None, "signalled": False}
    return signals


def fast_signal(user: str, first_ms: int, last_ms: int, length: int, in_range: bool) -> AlertSignal:
    """The fast-answers signal of a streak: anomalous when it reaches FAST_STREAK_ALERT,
    back in range (observed 0: no streak now) when a normal-speed answer ends it."""
    if in_range:
        message = (f"User {user} answered at a normal speed again after {length} answers in a row "
                   f"faster than {FAST_ANSWER_MS / 1000:g} s.")
    else:
        message = (f"User {user} answered {length} questions in a row each faster than "
                   f"{FAST_ANSWER_MS / 1000:g} s (median answers take about 8 s): a bot, a script or "
                   "answers copied from elsewhere?")
    return AlertSignal(kind=FAST_ANSWERS_KIND, severity="WARNING", entity_type="user", entity_id=user,
                       window_seconds=max(1, (last_ms - first_ms) // 1000), window_start_ms=first_ms,
                       window_end_ms=last_ms, observed=float(0 if in_range else length), expected_low=0.0,
                       expected_high=float(FAST_STREAK_ALERT - 1), in_range=in_range, message=message)


def _latest(current: Optional[dict], candidate: dict) -> dict:
    """The later of two {"id", "at"} by (event time, id): a max over a total order."""
    if current is None or (candidate["at"], candidate["id"]) > (current["at"], current["id"]):
        return candidate
    return current


def _session_started(state: dict, event: Event) -> list:
    state["sessions_started"] += 1
    state["last_started"] = _latest(state["last_started"], {"id": event.fields["session_id"],
                                                            "at": event.event_time_ms})
    return []


def _session_ended(state: dict, event: Event) -> list:
    state["sessions_ended"] += 1
    state["session_ms_total"] += event.fields["duration_ms"]
    # A set of the latest ends, not only the latest one: a short session's end can carry an
    # earlier event time (client clocks) than the end of the session before it. Trimmed by
    # (event time, id), so the kept set does not depend on the order events arrive in.
    ended = state["recently_ended"]
    ended.append([event.event_time_ms, event.fields["session_id"]])
    ended.sort()
    del ended[:-ENDED_KEPT]
    return []


def _mastery(state: dict, event: Event) -> list:
    concept = event.fields["concept_id"]
    candidate = [event.event_time_ms, event.offset, event.fields["mastery_after"]]
    current = state["mastery"].get(concept)
    if current is None or candidate[:2] > current[:2]:
        state["mastery"][concept] = candidate
    return []


def _achievement(state: dict, event: Event) -> list:
    state["achievements"] += 1
    state["achievement_points"] += event.fields["points"]
    return []


def _counter(name: str):
    def count(state: dict, _event: Event) -> list:
        state[name] += 1
        return []
    return count


_HANDLERS = {
    "question_answered": _answered,
    "session_started": _session_started,
    "session_ended": _session_ended,
    "mastery_updated": _mastery,
    "achievement_unlocked": _achievement,
    "notification_sent": _counter("notifications_sent"),
    "notification_opened": _counter("notifications_opened"),
}


# ---- what readers see -------------------------------------------------------------------

def current_session(state: dict) -> Optional[dict]:
    """The open session ({"session_id", "started_at_ms"}), or None: open when the latest
    session started (by event time) is not among the latest ENDED_KEPT sessions ended."""
    started = state["last_started"]
    if started is None or any(sid == started["id"] for _, sid in state["recently_ended"]):
        return None
    return {"session_id": started["id"], "started_at_ms": started["at"]}


def current_streak(days: list[str]) -> int:
    """Consecutive UTC days with an event, ending at the latest active day."""
    if not days:
        return 0
    parsed = sorted({datetime.strptime(d, "%Y-%m-%d").date() for d in days})
    streak, day = 1, parsed[-1]
    present = set(parsed)
    while day - timedelta(days=1) in present:
        day -= timedelta(days=1)
        streak += 1
    return streak


def summary(user_id: str, state: dict) -> dict:
    """The profile as a reader wants it: plain values, derived ratios, no internals."""
    answers, recent = state["answers"], state["recent"]
    return {
        "user_id": user_id,
        "first_seen_ms": state["first_seen_ms"], "last_seen_ms": state["last_seen_ms"],
        "events": state["events"], "events_by_type": dict(sorted(state["events_by_type"].items())),
        "answers": answers, "correct": state["correct"],
        "accuracy": state["correct"] / answers if answers else None,
        "recent_accuracy": recent["correct"] / recent["answers"] if recent["answers"] > 0 else None,
        "recent_half_life_hours": HALF_LIFE_MS / 3_600_000,
        "mean_response_ms": state["response_ms_total"] / answers if answers else None,
        "sessions_started": state["sessions_started"], "sessions_ended": state["sessions_ended"],
        "session_ms_total": state["session_ms_total"],
        "current_session": current_session(state),
        "days": list(state["days"]), "days_active": len(state["days"]),
        "current_streak_days": current_streak(state["days"]),
        "mastery": {c: v[2] for c, v in sorted(state["mastery"].items())},
        "achievements": state["achievements"], "achievement_points": state["achievement_points"],
        "notifications_sent": state["notifications_sent"],
        "notifications_opened": state["notifications_opened"],
        "fast_answer_streak": state["fast"]["length"],
    }


# Fields of the Redis hash holding JSON text (the others are plain numbers).
JSON_FIELDS = ("events_by_type", "current_session", "days", "mastery")


def redis_fields(user_id: str, state: dict) -> dict:
    """The Redis hash of a profile: numbers as numbers, nested values as JSON text.
    A ratio with no data yet (accuracy without answers) is absent, not written."""
    fields = {}
    for name, value in summary(user_id, state).items():
        if name in JSON_FIELDS:
            fields[name] = json.dumps(value, separators=(",", ":"))
        elif value is not None:
            fields[name] = value
    return fields


def stored(state: dict) -> str:
    """The state as Postgres stores it (jsonb text)."""
    return json.dumps(state, separators=(",", ":"))
