"""EvaluateAlertRules: the job's windowed panes (and dead letters) in, AlertSignals out.

    signals = windowed.panes | EvaluateAlertRules(topics, postgres_dsn, retry, dead_letters={
        "": decoded.dead_letters, "TooLate": windowed.too_late, ...})
    for name, book_signals in signals.items():
        book_signals | f"Alerts{name}" >> PublishAlerts(targets)

Two rule books, each a stateful step with one key (the volume is a pane a
minute, so one worker suffices):

- ``ConceptAccuracyBook`` on the 5-minute panes: concept_accuracy_drop;
- ``RateBook`` on the 1-minute panes plus the dead letters: event_rate_spike,
  event_rate_drop, dead_letter_rate.

When a window is judged: only once the watermark passed its end (an event-time
timer at the window's end), and its ON_TIME pane has arrived; the dead
letters of its records were read with its events, before the watermark passed
its end. EARLY panes are ignored (partial counts); a LATE
pane updates the window's values for later baselines but is not judged again.
Windows are judged in order of their start, also when a drained backlog fires
many at once (one timer at the oldest unjudged window; when it fires, every
window that ended by then is judged, oldest first). A window is judged only
once its ON_TIME pane is here: on Prism the timer can fire while that pane is
still on its way (seen: a window judged on half its dead letters and no
counts), so the book waits for it (or for WAIT_FOR_PANE_WINDOWS later panes:
a window without one had no valid event).

Dead letters are counted in the minute of their source record's Kafka
timestamp (producers set it to the event time; ``DeadLetter.record_time_ms``),
so the count is the same on every run; each is recorded in Postgres
``alert_dead_letters`` before the reader commits its offset (RecordDeadLettersFn
is fused with the step that made it), and a minute is judged on what that
table holds, so a restart counts what an earlier run read; the records of a topic in a minute are
its valid events (the overall row's counters, each an event type whose
registry topic is the topic) plus its dead letters.

Restarts: Prism keeps no state, so the first window a book judges after a
start has no trailing windows in state; the book then reads them once from
Postgres ``window_metrics`` (what the sinks wrote, exact across restarts), so
a baseline survives a restart.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping, NamedTuple, Optional

import apache_beam as beam
import psycopg2
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.pvalue import PCollection
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from schemas import default_registry
from transforms.aggregate import CONCEPT, OVERALL, WindowAggregate, window_label
from transforms.alerts import rules
from transforms.records import DeadLetter
from transforms.sinks.resilience import SinkRetryConfig

LOG = logging.getLogger(__name__)
Observation = typehints.KV[str, typehints.Any]


class _Book(NamedTuple):
    """A rule book's state: values per window start, the newest start judged, how far the timer
    has fired, the timer set, and whether the windows before the first judged one were read from
    Postgres."""
    windows: dict
    judged_through: int
    fired_through: int
    timer_at: Optional[int]
    loaded: bool


# A window whose ON_TIME pane has not come is judged anyway (as it is) once this many later
# windows have theirs: it had no valid events at all (or its pane is lost), and must not hold
# the later ones back for ever.
WAIT_FOR_PANE_WINDOWS = 3


class ConceptAccuracyBook:
    """5-minute windows: {concept: [answers, correct]} per window; concept_accuracy_drop."""
    window_s = rules.ACCURACY_WINDOW_S
    baseline_windows = rules.ACCURACY_BASELINE_WINDOWS

    def observe(self, agg: WindowAggregate) -> dict:
        return {"concepts": {r.entity_id: [r.metrics.get("answers", 0.0), r.metrics.get("correct", 0.0)]
                             for r in agg.rows if r.family == CONCEPT}}

    def judge(self, start: int, values: dict, trailing: list[dict]) -> list:
        out = []
        for concept, (answers, correct) in sorted(values.get("concepts", {}).items()):
            base = [t["concepts"][concept] for t in trailing if concept in t.get("concepts", {})]
            signal = rules.concept_accuracy_signal(concept, start, answers, correct,
                                                   sum(b[0] for b in base), sum(b[1] for b in base))
            if signal is not None:
                out.append(signal)
        return out

    def load_sql(self) -> tuple[str, str]:
        return CONCEPT, "concepts"

    def from_row(self, entity: str, metrics: dict, into: dict) -> None:
        into.setdefault("concepts", {})[entity] = [metrics.get("answers", 0.0), metrics.get("correct", 0.0)]


class RateBook:
    """1-minute windows: {"counts": {event type: n}, "dead": {topic: n}}; event_rate_spike,
    event_rate_drop and dead_letter_rate (for every topic in ``topics``)."""
    window_s = rules.RATE_WINDOW_S
    baseline_windows = rules.RATE_BASELINE_WINDOWS

    def __init__(self, topics: list[str]):
        self.topics = list(topics)

    def observe(self, agg: WindowAggregate) -> dict:
        for r in agg.rows:
            if r.family == OVERALL:
                return {"counts": _counts(r.metrics)}
        return {}

    def judge(self, start: int, values: dict, trailing: list[dict]) -> list:
        out = []
        counts = values.get("counts")
        if counts is not None:  # a minute with valid events (else the watermark would not have moved)
            for event_type in sorted(rules.EVENT_TYPE_OF_COUNTER.values()):
                history = [t["counts"].get(event_type, 0.0) for t in trailing if "counts" in t]
                out.extend(rules.event_rate_signals(event_type, start, counts.get(event_type, 0.0), history))
        dead = values.get("dead", {})
        for topic in self.topics:
            valid = sum(n for t, n in (counts or {}).items() if _topic_matches(topic, _TOPIC_OF[t]))
            signal = rules.dead_letter_signal(topic, start, dead.get(topic, 0), valid)
            if signal is not None:
                out.append(signal)
        return out

    def load_sql(self) -> tuple[str, str]:
        return OVERALL, "counts"

    def from_row(self, entity: str, metrics: dict, into: dict) -> None:
        into["counts"] = _counts(metrics)


def _counts(metrics: dict) -> dict:
    return {t: metrics.get(c, 0.0) for c, t in rules.EVENT_TYPE_OF_COUNTER.items()}


_TOPIC_OF = {t: default_registry().latest(t).topic for t in rules.EVENT_TYPE_OF_COUNTER.values()}


def _topic_matches(topic: str, registry_topic: str) -> bool:
    """A configured topic carries the registry's events when it is that topic or a copy of it
    with a suffix (``learning.events.v1.<suffix>``, as the tests isolate their topics)."""
    return topic == registry_topic or topic.startswith(registry_topic + ".")


class JudgeWindowsFn(beam.DoFn):
    """Input: (book name, observation), observations being ("pane", start ms, values) and
    ("dead", minute start ms, topic). Output: AlertSignals, windows judged in order (see the
    module docstring)."""
    BOOK = ReadModifyWriteStateSpec("book", PickleCoder())
    JUDGE = TimerSpec("judge", TimeDomain.WATERMARK)

    def __init__(self, book, postgres_dsn: Optional[str], retry: Optional[SinkRetryConfig] = None,
                 letters_dsn: Optional[str] = None):
        self.book, self.dsn, self.retry = book, postgres_dsn, retry or SinkRetryConfig()
        self.letters_dsn = letters_dsn
        name = type(book).__name__
        self.judged = Metrics.counter("AlertRules", f"{name}.windows_judged")
        self.signals = Metrics.counter("AlertRules", f"{name}.signals")
        self.reloaded = Metrics.counter("AlertRules", f"{name}.windows_reloaded")
        self.late = Metrics.counter("AlertRules", f"{name}.late_updates")

    def setup(self):
        from transforms.sinks.postgres_sink import postgres_breaker
        self.breaker = postgres_breaker("AlertBaselines", self.dsn, self.retry) if self.dsn else None
        self.letters_breaker = (postgres_breaker("AlertDeadLetters", self.letters_dsn, self.retry)
                                if self.letters_dsn else None)
        self.letters_conn = None

    def _recorded_dead_letters(self, start: int) -> dict:
        """{topic: dead letters} of the minute from ``start``, as recorded in alert_dead_letters
        (by this run and any earlier one)."""
        def read() -> dict:
            if self.letters_conn is None:
                self.letters_conn = psycopg2.connect(
                    self.letters_dsn, connect_timeout=max(2, round(self.retry.probe_timeout_s)))
                self.letters_conn.autocommit = True
            with self.letters_conn.cursor() as cur:
                cur.execute("SELECT to_regclass('alert_dead_letters') IS NOT NULL")
                if not cur.fetchone()[0]:  # no recorder has started yet: no dead letter either
                    return {}
                cur.execute("SELECT source_topic, count(*) FROM alert_dead_letters WHERE record_time >= "
                            "to_timestamp(%s / 1000.0) AND record_time < to_timestamp(%s / 1000.0) GROUP BY 1",
                            (start, start + self.book.window_s * 1000))
                return dict(cur.fetchall())

        def reset():
            conn, self.letters_conn = self.letters_conn, None
            if conn is not None:
                conn.close()
        return self.letters_breaker.call(read, reset=reset)

    def teardown(self):
        if getattr(self, "letters_conn", None) is not None:
            self.letters_conn.close()

    def process(self, element, state=beam.DoFn.StateParam(BOOK), timer=beam.DoFn.TimerParam(JUDGE)):
        _, (what, start, payload) = element
        book = state.read() or _Book({}, -1, -1, None, False)
        values = book.windows.setdefault(start, {})
        if what == "pane":
            for name, entities in payload.items():  # a LATE pane carries only the rows it changed
                values.setdefault(name, {}).update(entities)
            values["complete"] = True
        else:
            dead = values.setdefault("dead", {})
            dead[payload] = dead.get(payload, 0) + 1
        if start <= book.judged_through:
            self.late.inc()
            state.write(book)
            return
        book, signals = self._judge_ready(book)  # a pane the timer was waiting for
        yield from signals
        end = start + self.book.window_s * 1000
        if start > book.judged_through and end > book.fired_through and (book.timer_at is None or end < book.timer_at):
            timer.set(Timestamp(micros=end * 1000))
            book = book._replace(timer_at=end)
        state.write(book)

    @on_timer(JUDGE)
    def judge(self, fired=beam.DoFn.TimestampParam, state=beam.DoFn.StateParam(BOOK),
              timer=beam.DoFn.TimerParam(JUDGE)) -> Iterable:
        book = state.read()
        if book is None:
            return
        book = book._replace(fired_through=max(book.fired_through, fired.micros // 1000), timer_at=None)
        book, signals = self._judge_ready(book)
        yield from signals
        size = self.book.window_s * 1000
        keep_from = book.judged_through - size * (self.book.baseline_windows + 1)
        windows = {s: v for s, v in book.windows.items() if s >= keep_from}
        later = [s + size for s in windows if s > book.judged_through and s + size > book.fired_through]
        next_at = min(later) if later else None
        if next_at is not None:
            timer.set(Timestamp(micros=next_at * 1000))
        state.write(book._replace(windows=windows, timer_at=next_at))

    def _judge_ready(self, book: _Book) -> tuple[_Book, list]:
        """Judges, oldest first, the windows that ended by the timer's time and whose ON_TIME pane
        is here; stops at the first whose pane is still on its way (see WAIT_FOR_PANE_WINDOWS)."""
        size = self.book.window_s * 1000
        due = sorted(s for s in book.windows if book.judged_through < s and s + size <= book.fired_through)
        out: list = []
        for start in due:
            if not book.windows[start].get("complete"):
                later = sum(1 for s, v in book.windows.items() if s > start and v.get("complete"))
                if later < WAIT_FOR_PANE_WINDOWS:
                    break
            if not book.loaded:
                self._load_before(start, book.windows)
                book = book._replace(loaded=True)
            trailing = [book.windows[s] for s in range(start - size * self.book.baseline_windows, start, size)
                        if s in book.windows]
            values = book.windows[start]
            if isinstance(self.book, RateBook) and self.letters_breaker is not None:
                values = dict(values, dead=self._recorded_dead_letters(start))
            signals = self.book.judge(start, values, trailing)
            self.judged.inc()
            self.signals.inc(len(signals))
            out.extend(signals)
            book = book._replace(judged_through=start)
        return book, out

    def _load_before(self, first: int, windows: dict) -> None:
        """The trailing windows before the first judged one, from window_metrics (what an earlier
        run wrote); windows this run holds already win."""
        if self.breaker is None:
            return
        size = self.book.window_s * 1000
        family, _ = self.book.load_sql()

        def read() -> list:
            conn = psycopg2.connect(self.dsn, connect_timeout=max(2, round(self.retry.probe_timeout_s)))
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT to_regclass('window_metrics') IS NOT NULL")
                    if not cur.fetchone()[0]:
                        return []
                    cur.execute(
                        "SELECT (extract(epoch FROM window_start) * 1000)::bigint, entity_id, metrics "
                        "FROM window_metrics WHERE window_seconds = %s AND family = %s "
                        "AND window_start >= to_timestamp(%s / 1000.0) AND window_start < to_timestamp(%s / 1000.0)",
                        (self.book.window_s, family, first - size * self.book.baseline_windows, first))
                    return cur.fetchall()
            finally:
                conn.close()

        loaded: dict = {}
        for start, entity, metrics in self.breaker.call(read):
            self.book.from_row(entity, metrics, loaded.setdefault(start, {}))
        for start, values in loaded.items():
            if start not in windows:
                windows[start] = values
                self.reloaded.inc()


def _pane_observation(agg: WindowAggregate, book) -> Iterable:
    if agg.pane_timing == "EARLY":
        return
    yield type(book).__name__, ("pane", agg.window_start_ms, book.observe(agg))


def _dead_letter_observation(dl: DeadLetter, window_s: int) -> Iterable:
    if dl.record_time_ms is None:  # a re-published dead letter's copy: no record time known
        return
    ms = window_s * 1000
    yield RateBook.__name__, ("dead", dl.record_time_ms - dl.record_time_ms % ms, dl.source_topic)


# Rows of alert_dead_letters older than this (by when they were written) are deleted.
DEAD_LETTER_ROWS_KEPT_S = 86400


class RecordDeadLettersFn(beam.DoFn):
    """Input: DeadLetters. Records each source record and its time in ``alert_dead_letters``
    (idempotent, keyed by the source coordinates) before the bundle finishes, so before the
    reader it is fused with commits their offsets: a restart's dead-letter rate counts what an
    earlier run read. Output: the RateBook's observation of each (``_dead_letter_observation``)."""

    def __init__(self, postgres_dsn: str, window_s: int, retry: Optional[SinkRetryConfig] = None):
        self.dsn, self.window_s, self.retry = postgres_dsn, window_s, retry or SinkRetryConfig()
        self.recorded = Metrics.counter("AlertRules", "dead_letters_recorded")

    def setup(self):
        from transforms.sinks.postgres_sink import apply_schema, postgres_breaker
        self.breaker = postgres_breaker("RecordDeadLetters", self.dsn, self.retry)
        self.breaker.call(lambda: apply_schema(self.dsn))
        self.conn = None
        self.pruned_at = 0.0

    def teardown(self):
        if self.conn is not None:
            self.conn.close()

    def start_bundle(self):
        self.rows: list = []

    def process(self, dl: DeadLetter):
        if dl.record_time_ms is not None:
            self.rows.append((dl.source_topic, dl.source_partition, dl.source_offset, dl.record_time_ms / 1000.0))
        yield from _dead_letter_observation(dl, self.window_s)

    def finish_bundle(self):
        if not self.rows:
            return
        import time
        from psycopg2.extras import execute_values
        rows, self.rows = self.rows, []
        prune = time.monotonic() - self.pruned_at > 3600

        def write():
            if self.conn is None:
                self.conn = psycopg2.connect(self.dsn, connect_timeout=max(2, round(self.retry.probe_timeout_s)))
            with self.conn, self.conn.cursor() as cur:
                execute_values(cur, "INSERT INTO alert_dead_letters (source_topic, source_partition, source_offset, "
                                    "record_time) VALUES %s ON CONFLICT DO NOTHING", rows,
                               template="(%s, %s, %s, to_timestamp(%s))")
                if prune:
                    cur.execute("DELETE FROM alert_dead_letters WHERE written_at < now() - %s * interval '1 second'",
                                (DEAD_LETTER_ROWS_KEPT_S,))

        def reset():
            conn, self.conn = self.conn, None
            if conn is not None:
                conn.close()

        self.breaker.call(write, reset=reset)
        if prune:
            self.pruned_at = time.monotonic()
        self.recorded.inc(len(rows))


class EvaluateAlertRules(beam.PTransform):
    """{window label: PCollection of WindowAggregate} (WindowedResult.panes) -> {rule book name:
    PCollection of AlertSignal}.

    ``dead_letters``: {name: PCollection of DeadLetter}, every step's dead letters (for the
    dead-letter rate). ``topics``: the event topics read (each gets a dead_letter_rate signal).
    ``postgres_dsn``: where the sinks' window_metrics are, to rebuild baselines after a restart
    (None: baselines start empty). ``letters_dsn``: the Postgres that records dead letters for
    the dead-letter rate (``alert_dead_letters``), so the rate is exact across restarts (None:
    counted in state only). Window sizes other than 1m and 5m are not judged; without a
    1m or 5m window size, its rules are off.
    """

    def __init__(self, topics: list[str], postgres_dsn: Optional[str], retry: Optional[SinkRetryConfig] = None,
                 dead_letters: Optional[Mapping[str, PCollection]] = None, letters_dsn: Optional[str] = None):
        super().__init__()
        self.topics, self.dsn, self.retry, self.letters_dsn = list(topics), postgres_dsn, retry, letters_dsn
        self.dead_letters = dict(dead_letters or {})

    def expand(self, panes: Mapping[str, PCollection]) -> dict:
        """{rule book name: PCollection of AlertSignal}. Kept apart, not flattened: a publisher
        applied to each fuses with its book's stateful step, so one entity's signals reach it in
        window order (through a Flatten, Prism ran a later window's bundle first)."""
        outputs = {}
        for book in (ConceptAccuracyBook(), RateBook(self.topics)):
            label, name = window_label(book.window_s), type(book).__name__
            if label not in panes:
                continue
            inputs = [panes[label] | f"Observe{name}" >> beam.FlatMap(_pane_observation, book)
                      .with_output_types(Observation)]
            if isinstance(book, RateBook):
                inputs += [letters | f"CountDeadLetters{key or 'Decode'}" >> (
                    beam.ParDo(RecordDeadLettersFn(self.letters_dsn, book.window_s, self.retry))
                    if self.letters_dsn else beam.FlatMap(_dead_letter_observation, book.window_s)
                ).with_output_types(Observation) for key, letters in self.dead_letters.items()]
            observations = (tuple(inputs) | f"All{name}" >> beam.Flatten()) if len(inputs) > 1 else inputs[0]
            outputs[name] = observations | f"Judge{name}" >> beam.ParDo(
                JudgeWindowsFn(book, self.dsn, self.retry, self.letters_dsn))
        return outputs
