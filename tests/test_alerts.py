"""The alert rules, the episode logic and the producer's injections: pure functions, no services."""
from __future__ import annotations

from collections import Counter

import pytest

from scripts.produce import (FAST_ANSWERS_IN_A_ROW, INJECTIONS, Injection, TrafficConfig, generate,
                             parse_injection)
from transforms.alerts import rules
from transforms.alerts.episodes import (ALREADY_OPEN, COOLDOWN_S, COOLING_DOWN, IGNORE, NOT_NEWER, NOTHING_OPEN,
                                        RAISE, RESOLVE, LastResolved, OpenEpisode, alert_id, decide,
                                        needs_decision)
from transforms.alerts.evaluate import ConceptAccuracyBook, RateBook
from transforms.alerts.publish import alert_record

T0 = 1_767_225_600_000  # a 5-minute boundary
MIN = 60_000


# ---- concept_accuracy_drop
def test_accuracy_needs_its_minimum_answers_in_both_windows():
    assert rules.concept_accuracy_signal("c", T0, rules.ACCURACY_MIN_ANSWERS - 1, 0, 500, 400) is None
    assert rules.concept_accuracy_signal("c", T0, 50, 0, rules.ACCURACY_MIN_BASELINE_ANSWERS - 1, 80) is None


def test_accuracy_far_below_the_trailing_hour_is_anomalous_and_near_it_is_not():
    low = rules.concept_accuracy_signal("c", T0, 40, 4, 600, 420)      # 10% against 70%
    assert low.kind == "concept_accuracy_drop" and not low.in_range and low.entity_id == "c"
    assert (low.window_start_ms, low.window_end_ms, low.window_seconds) == (T0, T0 + 300_000, 300)
    sigma = (0.7 * 0.3 * (1 / 40 + 1 / 600)) ** 0.5
    assert low.observed == pytest.approx(0.1)
    assert low.expected_low == pytest.approx(0.7 - max(rules.ACCURACY_MIN_DROP, rules.ACCURACY_SIGMAS * sigma))
    assert rules.concept_accuracy_signal("c", T0, 40, 20, 600, 420).in_range  # 50%: a drop of 0.2


def test_a_small_sample_needs_a_larger_drop_than_the_floor():
    # 20 answers against 100: 4 sigma of the difference is about 0.45, above the 0.25 floor
    signal = rules.concept_accuracy_signal("c", T0, 20, 8, 100, 70)       # 40% against 70%
    assert signal.in_range and signal.expected_low < 0.7 - rules.ACCURACY_MIN_DROP


# ---- event_rate_spike / event_rate_drop
def test_rates_need_enough_trailing_minutes_and_a_minimum_baseline():
    assert rules.event_rate_signals("x", T0, 0, [100.0] * (rules.RATE_MIN_BASELINE_WINDOWS - 1)) == []
    assert rules.event_rate_signals("x", T0, 0, [rules.RATE_MIN_BASELINE - 1] * 15) == []


def test_a_rate_far_above_or_below_its_baseline_is_anomalous():
    spike, drop = rules.event_rate_signals("question_answered", T0, 480, [96.0] * 15)
    assert (spike.kind, spike.in_range) == ("event_rate_spike", False)
    assert (drop.kind, drop.in_range) == ("event_rate_drop", True)
    spike, drop = rules.event_rate_signals("question_answered", T0, 10, [96.0] * 15)
    assert spike.in_range and not drop.in_range and drop.severity == "WARNING"
    spike, drop = rules.event_rate_signals("question_answered", T0, 120, [96.0] * 15)
    assert spike.in_range and drop.in_range


def test_a_drop_to_zero_is_a_critical_outage():
    _, drop = rules.event_rate_signals("content_viewed", T0, 0, [25.0] * 12)
    assert not drop.in_range and drop.severity == "CRITICAL" and "outage" in drop.message


def test_the_rate_range_widens_by_poisson_noise():
    low, high = rules.rate_range(90)
    assert low == pytest.approx(30 - 3 * 30 ** 0.5) and high == pytest.approx(270 + 3 * 270 ** 0.5)


# ---- dead_letter_rate
def test_dead_letter_rate_needs_its_minimum_records():
    assert rules.dead_letter_signal("t", T0, 20, rules.DEAD_LETTER_MIN_RECORDS - 21) is None


def test_dead_letter_rate_above_ten_percent_by_more_than_noise():
    assert rules.dead_letter_signal("t", T0, 2, 98).in_range                # 2%
    assert rules.dead_letter_signal("t", T0, 13, 87).in_range               # 13%: within 3 sigma of 10%
    high = rules.dead_letter_signal("t", T0, 25, 75)
    assert not high.in_range and high.severity == "WARNING" and high.observed == pytest.approx(0.25)
    assert rules.dead_letter_signal("t", T0, 60, 40).severity == "CRITICAL"


# ---- the rule books, on a window's values and its trailing windows
def test_the_rate_book_counts_a_topics_records_from_its_event_types_and_dead_letters():
    book = RateBook(["learning.events.v1.x1", "content.events.v1.x1"])
    counts = dict.fromkeys(rules.EVENT_TYPE_OF_COUNTER.values(), 0.0)
    window = {"counts": dict(counts, question_answered=90.0, content_viewed=30.0),
              "dead": {"learning.events.v1.x1": 60}}
    signals = book.judge(T0, window, [])
    by_topic = {s.entity_id: s for s in signals if s.kind == "dead_letter_rate"}
    assert by_topic["learning.events.v1.x1"].observed == pytest.approx(60 / 150)
    assert "content.events.v1.x1" not in by_topic      # 30 records: below the minimum
    assert not [s for s in signals if s.kind.startswith("event_rate")]  # no trailing minutes


def test_the_concept_book_sums_the_trailing_hour_per_concept():
    trailing = [{"concepts": {"c": [50.0, 35.0]}}] * 12
    (signal,) = ConceptAccuracyBook().judge(T0, {"concepts": {"c": [50.0, 0.0], "d": [5.0, 0.0]}}, trailing)
    assert signal.entity_id == "c" and not signal.in_range


# ---- episodes
def signal(in_range: bool, start_ms: int = T0, kind: str = "event_rate_drop", entity: str = "question_answered"):
    return rules.AlertSignal(kind, "WARNING", "event_type", entity, 60, start_ms, start_ms + MIN, 1.0, 2.0, 3.0,
                             in_range, "m")


def test_an_episode_opens_once_and_closes_on_a_later_in_range_window():
    assert decide(signal(False), None, None).action == RAISE
    open_ = OpenEpisode("id", T0)
    assert decide(signal(False, T0 + MIN), open_, None) == (IGNORE, ALREADY_OPEN)
    assert decide(signal(True, T0), open_, None) == (IGNORE, NOT_NEWER)
    assert decide(signal(True, T0 + MIN), open_, None).action == RESOLVE
    assert decide(signal(True, T0), None, None) == (IGNORE, NOTHING_OPEN)


def test_no_new_episode_within_the_cooldown_after_one_resolved():
    resolved = LastResolved(T0, T0 + MIN)
    assert decide(signal(False, T0 - 5 * MIN), None, resolved) == (IGNORE, COOLING_DOWN)  # a replayed window
    assert decide(signal(False, T0 + MIN + COOLDOWN_S * 1000 - MIN), None, resolved) == (IGNORE, COOLING_DOWN)
    assert decide(signal(False, T0 + MIN + COOLDOWN_S * 1000), None, resolved).action == RAISE


def test_only_in_range_signals_with_nothing_open_skip_the_decision():
    drop, spike = "event_rate_drop", "event_rate_spike"
    signals = [signal(True, T0, drop, "a"),         # nothing open: skipped
               signal(True, T0, drop, "b"),         # b is open: decided
               signal(False, T0, spike, "a"),       # out of range: decided (another kind than the first)
               signal(True, T0 + MIN, spike, "a"),  # may resolve what the one before raised
               signal(True, T0 + MIN, drop, "a"),   # drop of a: still nothing open
               signal(True, T0 + MIN, drop, "b")]
    assert needs_decision(signals, {(drop, "b")}) == [False, True, True, True, False, True]
    assert needs_decision(signals, set()) == [False, False, True, True, False, False]
    # Where it skips, decide would have ignored the signal as NOTHING_OPEN, with or without a past episode.
    for s, decided in zip(signals, needs_decision(signals, set())):
        if not decided:
            assert decide(s, None, LastResolved(T0 - 10 * MIN, T0 - 9 * MIN)) == (IGNORE, NOTHING_OPEN)


def test_alert_ids_are_deterministic_per_episode_and_status():
    s = signal(False)
    assert alert_id(s, "RAISED") == alert_id(signal(False), "RAISED") != alert_id(s, "RESOLVED")
    assert alert_id(s, "RAISED") != alert_id(signal(False, T0 + MIN), "RAISED")
    assert alert_id(s, "RAISED") != alert_id(signal(False, kind="event_rate_spike"), "RAISED")
    record = alert_record(s, "RAISED", alert_id(s, "RAISED"), 5)
    assert record["episode_id"] == record["alert_id"] and record["window_start"] == T0


# ---- the producer's injections
def test_an_injection_is_parsed_with_its_default_duration():
    assert parse_injection("rate_spike:question_answered@600+90") == Injection(
        "rate_spike", "question_answered", 600.0, 90.0)
    assert parse_injection("accuracy_drop:concept-003@1800").duration_s == INJECTIONS["accuracy_drop"][1]
    assert parse_injection("dead_letters:learning.events.v1@60").entity == "learning.events.v1"
    for bad in ("spike:x@1", "rate_drop:x", "rate_drop:@5", "rate_drop:x@-1", "rate_drop:x@a+b"):
        with pytest.raises(ValueError, match="--inject"):
            parse_injection(bad)


END = T0 + 3600_000
BASE = dict(events=6000, users=50, concepts=6, span_seconds=3600, end_time_ms=END, seed=5, malformed_fraction=0.02)


def inside(ts: int, start_s: float, duration_s: float) -> bool:
    return END - 3600_000 + start_s * 1000 <= ts < END - 3600_000 + (start_s + duration_s) * 1000


def test_injections_change_only_their_window_and_entity_and_the_stream_stays_deterministic():
    clean = list(generate(TrafficConfig(**BASE)))
    texts = ("accuracy_drop:concept-002@600", "rate_drop:content_viewed@1200+120",
             "rate_spike:question_answered@1800+60", "dead_letters:content.events.v1@2400+120",
             "fast_answers:user-00007@3000")
    cfg = TrafficConfig(**BASE, injections=tuple(parse_injection(t) for t in texts))
    injected = list(generate(cfg))
    assert [r.value for r in injected] == [r.value for r in generate(cfg)]
    answers = [r.fields for r in injected if r.event_type == "question_answered" and r.fields]
    drop = [f for f in answers if f["concept_id"] == "concept-002" and inside(f["occurred_at"], 600, 300)]
    assert len(drop) > 20 and not any(f["correct"] for f in drop)
    assert not [r for r in injected if r.event_type == "content_viewed" and inside(r.timestamp_ms, 1200, 120)]
    n = Counter(inside(r.timestamp_ms, 1800, 60) for r in injected if r.event_type == "question_answered" and r.fields)
    m = Counter(inside(r.timestamp_ms, 1800, 60) for r in clean if r.event_type == "question_answered" and r.fields)
    assert n[True] == 5 * m[True] and m[True] > 20   # every valid answer five times
    content = [r for r in injected if r.topic == "content.events.v1" and inside(r.timestamp_ms, 2400, 120)]
    assert 0.35 < sum(1 for r in content if r.error_code) / len(content) < 0.65
    fast = [f for f in answers if f["user_id"] == "user-00007" and f["response_time_ms"] < 1000]
    assert len(fast) == FAST_ANSWERS_IN_A_ROW and all(inside(f["occurred_at"], 3000, 5) for f in fast)
    # Outside the injections, the same records as without them.
    untouched = {r.value for r in clean if not any(
        inside(r.timestamp_ms, s, d) for s, d in ((600, 300), (1200, 120), (1800, 60), (2400, 120)))}
    assert untouched <= {r.value for r in injected}


# ---- the rule books on a stream: order, EARLY panes, dead letters (DirectRunner and Prism)
import apache_beam as beam  # noqa: E402
from apache_beam.testing.test_stream import TestStream  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402
from apache_beam.transforms.window import TimestampedValue  # noqa: E402

from tests.test_aggregate import streaming_pipeline  # noqa: E402,F401  (the fixture)
from transforms.aggregate import MetricRow, WindowAggregate  # noqa: E402
from transforms.records import DeadLetter  # noqa: E402


def minute_pane(i: int, answers: float, timing: str = "ON_TIME") -> TimestampedValue:
    start = T0 + i * MIN
    metrics = dict.fromkeys(rules.EVENT_TYPE_OF_COUNTER, 0.0)
    metrics["answers"] = answers
    agg = WindowAggregate(60, start, start + MIN, timing, 0, [MetricRow("overall", "all", metrics)])
    return TimestampedValue(agg, (start + MIN) / 1000 - 1e-6)


def letter(i: int, n: int) -> TimestampedValue:
    return TimestampedValue(DeadLetter("learning.events.v1", 0, n, "BAD_FRAMING", "m", b"", None, None, 0, 0,
                                       T0 + i * MIN + 1000), (T0 + i * MIN) / 1000)


def test_the_rate_book_judges_windows_in_order_on_their_on_time_panes(streaming_pipeline):  # noqa: F811
    answers = [100.0] * 15 + [0.0, 100.0]
    stream = (TestStream().advance_watermark_to(T0 / 1000)
              .add_elements([letter(3, n) for n in range(60)])
              .add_elements([minute_pane(16, 10_000.0, "EARLY")])          # partial: never judged
              .add_elements([minute_pane(i, a) for i, a in reversed(list(enumerate(answers)))])
              .advance_watermark_to((T0 + 18 * MIN) / 1000)
              .advance_watermark_to_infinity())
    with streaming_pipeline() as p:
        letters = p | "Letters" >> beam.Create([])  # the dead letters come with the panes here
        panes = p | stream
        dead = panes | beam.Filter(lambda x: isinstance(x, DeadLetter))
        minutes = panes | beam.Filter(lambda x: isinstance(x, WindowAggregate))
        signals = {"1m": minutes} | rules_transform({"": dead, "None": letters})
        assert_that(signals["RateBook"] | beam.Filter(lambda s: s.entity_id == "question_answered")
                    | beam.Map(lambda s: (s.kind, (s.window_start_ms - T0) // MIN, s.in_range)),
                    equal_to([(k, i, i != 15 or k == "event_rate_spike")
                              for i in range(10, 17) for k in ("event_rate_spike", "event_rate_drop")]),
                    label="Rates")
        assert_that(signals["RateBook"] | beam.Filter(lambda s: s.kind == "dead_letter_rate")
                    | beam.Map(lambda s: ((s.window_start_ms - T0) // MIN, s.in_range)),
                    equal_to([(i, i != 3) for i in range(17) if i != 15]),  # 15: no records at all
                    label="DeadLetters")


def rules_transform(letters):
    from transforms.alerts.evaluate import EvaluateAlertRules
    return EvaluateAlertRules(["learning.events.v1"], None, dead_letters=letters)
