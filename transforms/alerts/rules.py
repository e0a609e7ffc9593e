"""The anomaly rules: pure functions from a window's values and its trailing baseline to an AlertSignal.

Each rule returns None when it has too few samples to say anything (no
signal: an open episode stays open), else a signal whose ``in_range`` says
whether the value is normal. transforms/alerts/evaluate.py feeds them the
windows the job already aggregates; transforms/alerts/publish.py turns their
signals into episodes. Every threshold is a named constant here, and the
README's "Alert rules" table lists them.

Why these margins: counts and accuracies of small samples are noisy, so each
rule asks for a minimum sample and a margin that grows with the noise (a
binomial or Poisson standard deviation), so a clean stream stays quiet while
an injected anomaly (transforms' tests, scripts/produce.py --inject) is far
outside it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from transforms.alerts.signal import AlertSignal

INFO, WARNING, CRITICAL = "INFO", "WARNING", "CRITICAL"

# ---- concept_accuracy_drop: a concept's 5-minute accuracy far below its own trailing hour.
ACCURACY_WINDOW_S = 300
ACCURACY_BASELINE_WINDOWS = 12        # the previous 12 five-minute windows: the trailing hour
ACCURACY_MIN_ANSWERS = 20             # answers of the concept in the current window
ACCURACY_MIN_BASELINE_ANSWERS = 100   # answers of the concept in the trailing hour
ACCURACY_MIN_DROP = 0.25              # absolute drop (0.8 -> 0.55) that is always worth a look
ACCURACY_SIGMAS = 4.0                 # ... and at least this many standard deviations of the difference
#   (3 gave one false alert in ~800 judgements of a clean stream at the generator's defaults)

# ---- event_rate_spike / event_rate_drop: an event type's 1-minute count vs its trailing 15 minutes.
RATE_WINDOW_S = 60
RATE_BASELINE_WINDOWS = 15            # the previous 15 one-minute windows
RATE_MIN_BASELINE_WINDOWS = 10        # of which at least this many must have been seen
RATE_MIN_BASELINE = 20.0              # mean events per minute; rarer types are not judged
RATE_FACTOR = 3.0                     # normal: within [baseline / 3, baseline * 3] ...
RATE_SIGMAS = 3.0                     # ... widened by this many Poisson standard deviations

# ---- dead_letter_rate: the share of a topic's records that became dead letters in a minute.
DEAD_LETTER_WINDOW_S = 60
DEAD_LETTER_MIN_RECORDS = 50          # records of the topic in the minute (valid + dead letters)
DEAD_LETTER_MAX_SHARE = 0.10          # more than 10% dead letters ...
DEAD_LETTER_SIGMAS = 3.0              # ... by more than 3 binomial standard deviations at 10%
DEAD_LETTER_CRITICAL_SHARE = 0.5      # half of a topic's records or more: CRITICAL

# ---- fast_answers: produced by transforms/profiles (its own constants); published here.

# The overall row's counters, each the count of one event type (transforms/aggregate.py).
EVENT_TYPE_OF_COUNTER = {
    "answers": "question_answered", "sessions_started": "session_started",
    "sessions_ended": "session_ended", "mastery_updates": "mastery_updated",
    "content_views": "content_viewed", "ratings": "content_rated",
    "content_updates": "content_updated", "notifications_sent": "notification_sent",
    "notifications_opened": "notification_opened", "achievements": "achievement_unlocked",
    "challenges_completed": "challenge_completed",
}


def _window_text(window_start_ms: int, window_seconds: int) -> str:
    from datetime import datetime, timezone
    start = datetime.fromtimestamp(window_start_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
    return f"the {window_seconds // 60}-minute window from {start} UTC"


def concept_accuracy_signal(concept: str, window_start_ms: int, answers: float, correct: float,
                            baseline_answers: float, baseline_correct: float) -> Optional[AlertSignal]:
    """A concept's accuracy in one 5-minute window vs its trailing hour (the summed counts of the
    previous ACCURACY_BASELINE_WINDOWS windows). Anomalous when it is lower by more than
    max(ACCURACY_MIN_DROP, ACCURACY_SIGMAS x the binomial standard deviation of the difference)."""
    if answers < ACCURACY_MIN_ANSWERS or baseline_answers < ACCURACY_MIN_BASELINE_ANSWERS:
        return None
    accuracy, expected = correct / answers, baseline_correct / baseline_answers
    p = min(max(expected, 0.05), 0.95)  # a baseline of 0 or 1 would claim no noise at all
    sigma = math.sqrt(p * (1 - p) * (1 / answers + 1 / baseline_answers))
    low = max(0.0, expected - max(ACCURACY_MIN_DROP, ACCURACY_SIGMAS * sigma))
    in_range = accuracy >= low
    message = (f"Accuracy on {concept} {'is back at' if in_range else 'fell to'} {accuracy:.0%} over {int(answers)} answers in "
               f"{_window_text(window_start_ms, ACCURACY_WINDOW_S)}, against {expected:.0%} over the "
               f"trailing hour (alert below {low:.0%}).")
    return AlertSignal("concept_accuracy_drop", WARNING, "concept", concept, ACCURACY_WINDOW_S, window_start_ms,
                       window_start_ms + ACCURACY_WINDOW_S * 1000, accuracy, low, 1.0, in_range, message)


def rate_range(baseline: float) -> tuple[float, float]:
    """The normal range of a Poisson count whose mean is ``baseline``."""
    low, high = baseline / RATE_FACTOR, baseline * RATE_FACTOR
    return max(0.0, low - RATE_SIGMAS * math.sqrt(low)), high + RATE_SIGMAS * math.sqrt(high)


def event_rate_signals(event_type: str, window_start_ms: int, observed: float,
                       trailing: Sequence[float]) -> list[AlertSignal]:
    """An event type's count in one minute vs the mean of the trailing minutes seen (``trailing``,
    at most RATE_BASELINE_WINDOWS). Two signals, one per direction (event_rate_spike,
    event_rate_drop), so a spike's episode and a drop's are apart; none without enough baseline."""
    if len(trailing) < RATE_MIN_BASELINE_WINDOWS:
        return []
    baseline = sum(trailing) / len(trailing)
    if baseline < RATE_MIN_BASELINE:
        return []
    low, high = rate_range(baseline)
    end = window_start_ms + RATE_WINDOW_S * 1000
    when = _window_text(window_start_ms, RATE_WINDOW_S)
    spike = AlertSignal("event_rate_spike", WARNING, "event_type", event_type, RATE_WINDOW_S, window_start_ms,
                        end, observed, low, high, observed <= high,
                        f"{event_type} events {'are back at' if observed <= high else 'rose to'} {int(observed)} in {when}, against {baseline:.0f} a minute "
                        f"over the trailing {len(trailing)} minutes (alert above {high:.0f}).")
    # Nothing at all against a baseline of RATE_MIN_BASELINE or more (a Poisson chance below
    # e^-20) is an outage, even where the noise margin reaches down to zero.
    outage = observed == 0
    drop = AlertSignal("event_rate_drop", CRITICAL if outage else WARNING, "event_type", event_type,
                       RATE_WINDOW_S, window_start_ms, end, observed, low, high, observed >= low and not outage,
                       (f"No {event_type} events at all in {when}, against {baseline:.0f} a minute before: "
                        "a producer outage?") if outage else
                       (f"{event_type} events {'are back at' if observed >= low else 'fell to'} {int(observed)} in {when}, against {baseline:.0f} a "
                        f"minute over the trailing {len(trailing)} minutes (alert below {low:.0f})."))
    return [spike, drop]


def dead_letter_signal(topic: str, window_start_ms: int, dead_letters: float,
                       valid: float) -> Optional[AlertSignal]:
    """The share of a topic's records in one minute (by record time) that became dead letters.
    Anomalous above DEAD_LETTER_MAX_SHARE by more than DEAD_LETTER_SIGMAS binomial standard
    deviations (so a few unlucky records of a quiet minute do not raise it)."""
    records = dead_letters + valid
    if records < DEAD_LETTER_MIN_RECORDS:
        return None
    share = dead_letters / records
    p = DEAD_LETTER_MAX_SHARE
    high = p + DEAD_LETTER_SIGMAS * math.sqrt(p * (1 - p) / records)
    severity = CRITICAL if share >= DEAD_LETTER_CRITICAL_SHARE else WARNING
    message = (f"{share:.0%} of the records on {topic} ({int(dead_letters)} of {int(records)}) were dead "
               f"letters in {_window_text(window_start_ms, DEAD_LETTER_WINDOW_S)}" +
               (f", back under the alert level of {high:.0%}." if share <= high else f" (alert above {high:.0%})."))
    return AlertSignal("dead_letter_rate", severity, "topic", topic, DEAD_LETTER_WINDOW_S, window_start_ms,
                       window_start_ms + DEAD_LETTER_WINDOW_S * 1000, share, 0.0, high, share <= high, message)
