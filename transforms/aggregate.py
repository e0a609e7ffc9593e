"""Windowed learning metrics: event batches in, one WindowAggregate per fired pane out.

Four fixed event-time window sizes (1 minute, 5 minutes, 1 hour, 1 day) each
carry every metric family:

- ``overall``  (entity ``all``): events, answers, accuracy, mean response time,
  active users, sessions started/ended and mean duration, content views and
  mean rating, notifications sent/opened and open rate, achievements,
  challenges completed;
- ``concept``: answers, accuracy, mean response time, mastery updates and the
  summed mastery change;
- ``user``:    events, answers, accuracy, mean response time;
- ``content``: views, view time, ratings and mean rating.

Windows of an hour or more also count each (concept, user)'s answers in the
internal family ``concept_user``, from which each concept row gets
``struggling_users``: the users whose accuracy on the concept is below
:data:`STRUGGLING_BELOW_ACCURACY` over at least :data:`STRUGGLING_MIN_ANSWERS`
answers in the window. The family lives in the partials (so the window ledger
and the seeds carry it) but is never a row: the sinks never see it.

Why the shape: fanning every event out into four windows and several keys
costs a Python runner more than the arithmetic does. So :class:`FoldIntoWindows`
folds each batch into one small partial aggregate per (window size, window) in
a plain loop, stamped with an event time inside that window; Beam then assigns
the partials to FixedWindows and merges them with :class:`MergeWindowMetrics`,
a CombineFn the runner lifts before the shuffle. Windowing, triggers, lateness
and panes stay Beam's own.

Panes discard: each firing carries only the partials that arrived since the
previous one, and :class:`AccumulatePanes` adds them to the window's total in
state and emits the rows they changed, each with its full value so far; so
the sinks overwrite what an earlier pane wrote, never add to it.
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple, Optional, Union

import apache_beam as beam
from apache_beam import typehints
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.pvalue import PCollection, TaggedOutput
from apache_beam.transforms import trigger, window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.window import TimestampedValue
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from schemas import settings
from transforms import latency_trace
from transforms.dead_letters import event_dead_letter
from transforms.ledger import LedgerRow, WindowLedger, write_rows
from transforms.records import DeadLetter, Event
from transforms.validation import ErrorCode

if TYPE_CHECKING:  # the sinks package imports this module
    from transforms.sinks.resilience import SinkRetryConfig

OVERALL, CONCEPT, USER, CONTENT = "overall", "concept", "user", "content"
OVERALL_ENTITY = "all"
# Internal: answers per (concept, user), only in the hour window (the
# definition of struggling; any other size would pay per event for keys nobody
# reads: a day window held a pair per concept and user seen that day). Kept in
# the partials, the ledger and AccumulatePanes' state; never emitted as a row.
CONCEPT_USER = "concept_user"
INTERNAL_FAMILIES = frozenset({CONCEPT_USER})
WIDE_WINDOW_S = 3600

# A user struggles with a concept in a window when fewer than half of at least
# five answers on it were correct (concept rows of the WIDE_WINDOW_S window).
STRUGGLING_MIN_ANSWERS = 5
STRUGGLING_BELOW_ACCURACY = 0.5

# The raw counters of each family, in a fixed order: accumulators are lists.
COUNTERS: dict[str, tuple[str, ...]] = {
    OVERALL: ("events", "answers", "correct", "response_time_ms_sum", "sessions_started",
              "sessions_ended", "session_duration_ms_sum", "mastery_updates", "content_views",
              "ratings", "rating_sum", "content_updates", "notifications_sent",
              "notifications_opened", "achievements", "challenges_completed"),
    CONCEPT: ("answers", "correct", "response_time_ms_sum", "mastery_updates", "mastery_change"),
    USER: ("events", "answers", "correct", "response_time_ms_sum"),
    CONTENT: ("views", "view_duration_ms_sum", "ratings", "rating_sum"),
    CONCEPT_USER: ("answers", "correct"),
}

# A counter increment: a constant, the name of a numeric field, or a function of the fields.
Increment = Union[int, str, Callable[[dict], float]]
_ANSWER: dict[str, Increment] = {
    "answers": 1, "correct": lambda f: 1 if f["correct"] else 0,
    "response_time_ms_sum": "response_time_ms"}

# What each event type adds, per family: (family, entity field or None, increments).
# Every event also adds one to overall.events and to its user's events.
RULES: dict[str, list[tuple[str, str | None, dict[str, Increment]]]] = {
    "question_answered": [(OVERALL, None, _ANSWER), (CONCEPT, "concept_id", _ANSWER),
                          (USER, "user_id", _ANSWER)],
    "session_started": [(OVERALL, None, {"sessions_started": 1})],
    "session_ended": [(OVERALL, None, {"sessions_ended": 1, "session_duration_ms_sum": "duration_ms"})],
    "mastery_updated": [(OVERALL, None, {"mastery_updates": 1}),
                        (CONCEPT, "concept_id", {
                            "mastery_updates": 1,
                            "mastery_change": lambda f: f["mastery_after"] - f["mastery_before"]})],
    "content_viewed": [(OVERALL, None, {"content_views": 1}),
                       (CONTENT, "content_id", {"views": 1, "view_duration_ms_sum": "view_duration_ms"})],
    "content_rated": [(OVERALL, None, {"ratings": 1, "rating_sum": "rating"}),
                      (CONTENT, "content_id", {"ratings": 1, "rating_sum": "rating"})],
    "content_updated": [(OVERALL, None, {"content_updates": 1})],
    "notification_sent": [(OVERALL, None, {"notifications_sent": 1})],
    "notification_opened": [(OVERALL, None, {"notifications_opened": 1})],
    "achievement_unlocked": [(OVERALL, None, {"achievements": 1})],
    "challenge_completed": [(OVERALL, None, {"challenges_completed": 1})],
}


def is_wide(window_seconds: int) -> bool:
    """Whether windows of this size fold the internal ``concept_user`` family
    (and their concept rows carry ``struggling_users``)."""
    return window_seconds == WIDE_WINDOW_S


def concept_user_entity(concept_id: str, user_id: str) -> str:
    """The ``concept_user`` entity: ``<len(concept)>:<concept>|<user>``, so an id
    holding ``|`` or ``:`` cannot make two pairs one."""
    return f"{len(concept_id)}:{concept_id}|{user_id}"


def concept_of(entity: str) -> str:
    """The concept of a ``concept_user`` entity."""
    n, rest = entity.split(":", 1)
    return rest[:int(n)]


# What an event type adds to windows of WIDE_WINDOW_S or more only:
# (family, entity of the fields, increments).
WIDE_RULES: dict[str, list[tuple[str, Callable[[dict], str], dict[str, Increment]]]] = {
    "question_answered": [(CONCEPT_USER, lambda f: concept_user_entity(f["concept_id"], f["user_id"]),
                           {"answers": 1, "correct": lambda f: 1 if f["correct"] else 0})],
}

# Derived metrics: name -> (numerator counter, denominator counter).
RATIOS: dict[str, dict[str, tuple[str, str]]] = {
    OVERALL: {"accuracy": ("correct", "answers"),
              "mean_response_time_ms": ("response_time_ms_sum", "answers"),
              "mean_session_duration_ms": ("session_duration_ms_sum", "sessions_ended"),
              "mean_rating": ("rating_sum", "ratings"),
              "open_rate": ("notifications_opened", "notifications_sent")},
    CONCEPT: {"accuracy": ("correct", "answers"),
              "mean_response_time_ms": ("response_time_ms_sum", "answers")},
    USER: {"accuracy": ("correct", "answers"),
           "mean_response_time_ms": ("response_time_ms_sum", "answers")},
    CONTENT: {"mean_rating": ("rating_sum", "ratings")},
}

WINDOW_SIZES_S = settings.WINDOW_SIZES_S  # the default; jobs take theirs from --window_sizes

# {family: {entity: [counter values]}}
Partial = dict


def overall_events(partial: Partial) -> float:
    """The overall event count of a window's Partial (0 if it holds none)."""
    row = partial.get(OVERALL, {}).get(OVERALL_ENTITY)
    return row[_OVERALL_EVENTS] if row else 0


def window_label(size_s: int) -> str:
    return f"{size_s // 86400}d" if size_s % 86400 == 0 else (
        f"{size_s // 3600}h" if size_s % 3600 == 0 else (
            f"{size_s // 60}m" if size_s % 60 == 0 else f"{size_s}s"))


def _compile_rules() -> dict[str, list[tuple[str, str | None, list[tuple[int, Increment]]]]]:
    compiled = {}
    for event_type, rules in RULES.items():
        out = [(OVERALL, None, [(COUNTERS[OVERALL].index("events"), 1)]),
               (USER, "user_id", [(COUNTERS[USER].index("events"), 1)])]
        for family, entity_field, increments in rules:
            out.append((family, entity_field,
                        [(COUNTERS[family].index(name), inc) for name, inc in increments.items()]))
        compiled[event_type] = out
    return compiled


_COMPILED = _compile_rules()
_OVERALL_EVENTS = COUNTERS[OVERALL].index("events")
_WIDE_COMPILED = {event_type: [(family, entity_of, [(COUNTERS[family].index(name), inc)
                                                    for name, inc in increments.items()])
                               for family, entity_of, increments in rules]
                  for event_type, rules in WIDE_RULES.items()}


def contributions(event: Event) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """What one event adds: [(family, entity, [(counter index, amount)])]."""
    fields = event.fields
    out = []
    for family, entity_field, increments in _COMPILED[event.event_type]:
        amounts = [(i, inc if isinstance(inc, int) else (
            fields[inc] if isinstance(inc, str) else inc(fields))) for i, inc in increments]
        out.append((family, OVERALL_ENTITY if entity_field is None else fields[entity_field], amounts))
    return out


def wide_contributions(event: Event) -> Optional[list[tuple[str, str, list[tuple[int, float]]]]]:
    """What one event adds to windows of WIDE_WINDOW_S or more only (None: nothing)."""
    rules = _WIDE_COMPILED.get(event.event_type)
    if rules is None:
        return None
    fields = event.fields
    return [(family, entity_of(fields), [(i, inc if isinstance(inc, int) else inc(fields)) for i, inc in increments])
            for family, entity_of, increments in rules]


def add_contribution(partial: Partial, family: str, entity: str,
                     amounts: list[tuple[int, float]]) -> None:
    entities = partial.get(family)
    if entities is None:
        entities = partial[family] = {}
    counters = entities.get(entity)
    if counters is None:
        counters = entities[entity] = [0] * len(COUNTERS[family])
    for i, amount in amounts:
        counters[i] += amount


def merge_into(target: Partial, source: Partial) -> Partial:
    """Adds ``source`` into ``target`` (mutated) and returns it; ``source`` is untouched."""
    for family, entities in source.items():
        into = target.get(family)
        if into is None:
            target[family] = {e: list(c) for e, c in entities.items()}
            continue
        for entity, counters in entities.items():
            mine = into.get(entity)
            if mine is None:
                into[entity] = list(counters)
            else:
                for i, v in enumerate(counters):
                    mine[i] += v
    return target


def fold_events(events: Iterable[Event], sizes_ms: tuple[int, ...], into: Optional[dict] = None,
                on_error: Optional[Callable[[Event, Exception], None]] = None) -> dict[tuple[int, int], list]:
    """Folds events into ``{(size_ms, window_start_ms): [partial, latest event time]}``.

    ``into`` continues an earlier fold (the same dict is returned). ``on_error``:
    an event whose contributions cannot be computed is handed to it and left
    out (nothing of it was added); without it, the exception propagates.
    """
    partials = {} if into is None else into
    wide_sizes = frozenset(s for s in sizes_ms if is_wide(s // 1000))
    for event in events:
        ts = event.event_time_ms
        try:
            parts = contributions(event)
            # Most events add nothing to the wide windows: look before calling.
            wide = wide_contributions(event) if wide_sizes and event.event_type in _WIDE_COMPILED else None
        except Exception as e:
            if on_error is None:
                raise
            on_error(event, e)
            continue
        for size in sizes_ms:
            key = (size, ts - ts % size)
            slot = partials.get(key)
            if slot is None:
                slot = partials[key] = [{}, ts]
            elif ts > slot[1]:
                slot[1] = ts
            for family, entity, amounts in parts:
                add_contribution(slot[0], family, entity, amounts)
            if wide is not None and size in wide_sizes:
                for family, entity, amounts in wide:
                    add_contribution(slot[0], family, entity, amounts)
    return partials


class MetricRow(NamedTuple):
    family: str
    entity_id: str
    metrics: dict


class WindowAggregate(NamedTuple):
    """The rows of one window that one pane changed, each with all its metrics."""
    window_seconds: int
    window_start_ms: int
    window_end_ms: int
    pane_timing: str
    pane_index: int
    rows: list  # of MetricRow


def metric_rows(partial: Partial, only: Optional[Partial] = None,
                window_seconds: Optional[int] = None) -> list[MetricRow]:
    """Raw counters plus derived ratios for every entity of ``partial`` (or only
    for those that appear in ``only``); a ratio with a zero denominator is
    left out rather than invented. Internal families give no rows.

    Concept rows get ``struggling_users`` (see :func:`struggling_users`) in
    windows of ``window_seconds`` >= WIDE_WINDOW_S, or, with no size given,
    when ``partial`` holds the ``concept_user`` family. It is counted over the
    whole window (``partial``), so a concept row is right whatever pane emits it.
    """
    rows = []
    wide = CONCEPT_USER in partial if window_seconds is None else is_wide(window_seconds)
    struggling: Optional[dict] = None
    for family, entities in (partial if only is None else only).items():
        if family in INTERNAL_FAMILIES:
            continue
        names, ratios = COUNTERS[family], RATIOS[family]
        for entity in entities:
            counters = partial[family][entity]
            metrics = dict(zip(names, map(float, counters)))
            for name, (num, den) in ratios.items():
                if metrics[den]:
                    metrics[name] = metrics[num] / metrics[den]
            if family == OVERALL:
                metrics["active_users"] = float(len(partial.get(USER, ())))
            elif family == CONCEPT and wide:
                if struggling is None:
                    struggling = struggling_users(partial)
                metrics["struggling_users"] = float(struggling.get(entity, 0))
            rows.append(MetricRow(family, entity, metrics))
    return rows


def struggling_users(partial: Partial) -> dict[str, int]:
    """{concept: users with at least STRUGGLING_MIN_ANSWERS answers on it and an
    accuracy below STRUGGLING_BELOW_ACCURACY} over the window's ``concept_user``
    counters; concepts with none are absent."""
    counts: dict[str, int] = {}
    for entity, (answers, correct) in partial.get(CONCEPT_USER, {}).items():
        if answers >= STRUGGLING_MIN_ANSWERS and correct < STRUGGLING_BELOW_ACCURACY * answers:
            concept = concept_of(entity)
            counts[concept] = counts.get(concept, 0) + 1
    return counts


TOO_LATE = "too_late"          # output tags
FOLD_ERRORS = "fold_errors"
# How much longer than the allowed lateness the runner keeps a window open.
# RejectLateEvents decides lateness by the batch's horizon, which can trail
# the runner's watermark by what the reader read since (a bundle's worth);
# the runner must never be the one to drop an event, as it does so silently.
RUNNER_LATENESS_MARGIN_S = 600


def _iso(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return f"{ms} ms"


class RejectLateEventsFn(beam.DoFn):
    """Input: lists of Events, each list timestamped at its batch's lateness
    horizon (the reader's watermark when it read the batch, or the batch's
    oldest record time if later). Main output: the lists without the events
    that came too late. Tagged output ``too_late``: a TOO_LATE DeadLetter for
    each of those.

    An event is too late when its finest window ended ``allowed_lateness_s``
    or more before the horizon: it is refused by every window size at once,
    so that the sizes always hold the same events. The runner would drop such
    an event silently; here it is counted and dead-lettered (it stays in the
    raw-event archive). ``dead_lettered``: source coordinates already published
    as dead letters by a run that died before committing them; they are refused
    again so that a record is decided once.
    """

    def __init__(self, finest_s: int, allowed_lateness_s: int,
                 dead_lettered: frozenset = frozenset()):
        self.finest_ms = finest_s * 1000
        self.lateness_ms = allowed_lateness_s * 1000
        self.dead_lettered = dead_lettered
        self.too_late = Metrics.counter("WindowedMetrics", "too_late_events")
        self.decided = Metrics.counter("WindowedMetrics", "already_dead_lettered")

    def process(self, events: list[Event], ts=beam.DoFn.TimestampParam):
        horizon = ts.micros // 1000
        # The start of the oldest finest window that is still open: the first
        # window boundary after horizon - lateness - finest.
        oldest_allowed = -(-(horizon - self.lateness_ms - self.finest_ms + 1) // self.finest_ms) * self.finest_ms
        if all(e.event_time_ms >= oldest_allowed for e in events) and not self.dead_lettered:
            yield events
            return
        kept = []
        for e in events:
            if (e.topic, e.partition, e.offset) in self.dead_lettered:
                self.decided.inc()  # its dead letter is on the topic already
            elif e.event_time_ms >= oldest_allowed:
                kept.append(e)
            else:
                self.too_late.inc()
                yield TaggedOutput(TOO_LATE, self._dead_letter(e, horizon))
        if kept:
            yield kept

    def _dead_letter(self, e: Event, horizon: int) -> DeadLetter:
        closed = e.event_time_ms - e.event_time_ms % self.finest_ms + self.finest_ms
        return event_dead_letter(e, ErrorCode.TOO_LATE, (
            f"occurred_at {_iso(e.event_time_ms)} is too late: its window closed at {_iso(closed)} and "
            f"the allowed lateness ({self.lateness_ms // 1000}s) had passed when it was read (watermark "
            f"{_iso(horizon)}); it is in raw_events, and a replay or a larger --allowed_lateness counts it"))


class RejectLateEvents(beam.PTransform):
    """Batches of Events -> (on-time batches, TOO_LATE DeadLetters); see RejectLateEventsFn."""

    def __init__(self, finest_s: int, allowed_lateness_s: int, dead_lettered: frozenset = frozenset()):
        super().__init__()
        self.fn = RejectLateEventsFn(finest_s, allowed_lateness_s, dead_lettered)

    def expand(self, event_batches):
        out = event_batches | "Reject" >> beam.ParDo(self.fn).with_outputs(TOO_LATE, main="on_time")
        return out.on_time, out[TOO_LATE]


class FoldIntoWindows(beam.DoFn):
    """Input: lists of Events (one Kafka poll each), timestamped at the batch's
    lateness horizon. Output, tagged by window label (``1m``...): one (label,
    Partial) per window that the bundle's events touch, timestamped at the
    latest event time inside it.

    Folding a whole bundle, not one batch, keeps the partials few: a runner
    that re-reads a window's partials at every firing pays per partial.

    With a ``ledger``, the bundle is folded per partition and each partition's
    partials are written to the window ledger (one transaction, at the end of
    the bundle: before the reader commits the offsets, see transforms.ledger),
    so that a restart can start every window from its total.

    ``trace_path``: debug, see transforms.latency_trace (stage ``fold``).
    """

    def __init__(self, sizes_s: tuple[int, ...], ledger: Optional[WindowLedger] = None,
                 retry: Optional["SinkRetryConfig"] = None, trace_path: Optional[str] = None):
        self.sizes_ms = tuple(s * 1000 for s in sizes_s)
        self.labels = {s * 1000: window_label(s) for s in sizes_s}
        self.ledger, self.retry, self.trace_path = ledger, retry, trace_path
        self.partials_emitted = Metrics.counter("WindowedMetrics", "partials_emitted")
        self.ledger_rows = Metrics.counter("WindowedMetrics", "ledger_rows_written")
        self.fold_errors = Metrics.counter("WindowedMetrics", "fold_errors")

    def setup(self):
        self.conn = None
        if self.ledger is not None:
            # Imported here: the sinks package imports this module.
            from transforms.sinks.postgres_sink import postgres_breaker
            from transforms.sinks.resilience import SinkRetryConfig
            self.breaker = postgres_breaker("WindowLedger", self.ledger.dsn, self.retry or SinkRetryConfig())

    def teardown(self):
        self._disconnect()

    def _disconnect(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None

    def start_bundle(self):
        # (topic, partition) -> [partials by window, first offset, last offset, horizon ms]
        self.by_partition: dict = {}

    def process(self, events: list[Event], ts=beam.DoFn.TimestampParam):
        if not events:
            return
        first = events[0]
        slot = self.by_partition.get((first.topic, first.partition))
        if slot is None:
            slot = self.by_partition[(first.topic, first.partition)] = [{}, first.offset, first.offset, None]
        failed: list = []
        fold_events(events, self.sizes_ms, into=slot[0], on_error=lambda e, exc: failed.append((e, exc)))
        for event, exc in failed:
            self.fold_errors.inc()
            yield TaggedOutput(FOLD_ERRORS, event_dead_letter(
                event, ErrorCode.PROCESSING_ERROR, f"unexpected {type(exc).__name__} while folding it into its "
                                         f"windows: {str(exc)[:300]}"))
        slot[1] = min(slot[1], min(e.offset for e in events))
        slot[2] = max(slot[2], max(e.offset for e in events))
        horizon = ts.micros // 1000
        slot[3] = horizon if slot[3] is None else max(slot[3], horizon)

    def finish_bundle(self):
        if self.ledger is not None:
            self._write_ledger()
        merged: dict = {}
        for partials, *_ in self.by_partition.values():
            for key, (partial, latest) in partials.items():
                into = merged.get(key)
                if into is None:
                    merged[key] = [partial, latest]
                else:
                    merge_into(into[0], partial)
                    into[1] = max(into[1], latest)
        if self.trace_path is not None:
            latency_trace.record(self.trace_path, "fold", {
                start: overall_events(partial) for (size, start), (partial, _) in merged.items()
                if size == latency_trace.TRACE_WINDOW_MS})
        for (size, _), (partial, latest) in merged.items():
            label = self.labels[size]
            self.partials_emitted.inc()
            yield TaggedOutput(label, WindowedValue((label, partial), latest / 1000.0,
                                                    [window.GlobalWindow()]))
        self.by_partition = {}

    def _write_ledger(self) -> None:
        rows = [LedgerRow(topic, partition, lo, hi + 1, size // 1000, start, partial, horizon)
                for (topic, partition), (partials, lo, hi, horizon) in self.by_partition.items()
                for (size, start), (partial, _) in partials.items()]

        def write() -> int:
            if self.conn is None:
                self.conn = self.ledger.connect()
            return write_rows(self.conn, self.ledger.group_id, rows)

        # Before the partials are handed on (a merge may mutate them). While
        # Postgres is away the bundle waits here, so its offsets stay uncommitted.
        self.ledger_rows.inc(self.breaker.call(write, reset=self._disconnect))


class MergeWindowMetrics(beam.CombineFn):
    """Merges Partials of one window; lifted by the runner ahead of the shuffle."""

    def create_accumulator(self) -> Partial:
        return {}

    def add_input(self, accumulator: Partial, partial: Partial) -> Partial:
        return merge_into(accumulator, partial)

    def merge_accumulators(self, accumulators: Iterable[Partial]) -> Partial:
        it = iter(accumulators)
        merged = next(it, {})
        for acc in it:
            merge_into(merged, acc)
        return merged

    def extract_output(self, accumulator: Partial) -> Partial:
        return accumulator


# A pane keyed by its window: ((label, start ms, end ms), Partial). Declared, so
# that every producer of AccumulatePanes' input encodes the key alike: the
# key's bytes are the state's key (a pickled key from one input and a tuple
# coder's from another made two totals of one window, one overwriting the other).
WindowKeyedPartial = typehints.KV[typehints.Tuple[str, int, int], typehints.Dict[str, typehints.Any]]


class KeyByWindow(beam.DoFn):
    """Input: (label, Partial) of one fired pane. Output: ((label, window start
    ms, window end ms), Partial), so the pane can leave its window.
    ``trace_path``: debug, see transforms.latency_trace (stage ``fired``)."""

    def __init__(self, trace_path: Optional[str] = None):
        self.trace_path = trace_path

    def process(self, element, win=beam.DoFn.WindowParam):
        label, partial = element
        start, end = win.start.micros // 1000, win.end.micros // 1000
        if self.trace_path is not None and end - start == latency_trace.TRACE_WINDOW_MS:
            latency_trace.record(self.trace_path, "fired", {start: overall_events(partial)})
        yield (label, start, end), partial


class _WindowTotal(NamedTuple):
    """What AccumulatePanes keeps per window: its value so far, whether it
    closed (its on-time rows were emitted), and how many panes it emitted."""
    partial: Partial
    closed: bool
    panes: int


class AccumulatePanes(beam.DoFn):
    """Input, in the global window: ((label, start ms, end ms), Partial) for
    each fired pane, holding only what arrived since the window's previous
    pane. Output: WindowAggregates with each row's total so far: EARLY rows
    while the window is open (if ``emit_early``), every row once as ON_TIME
    when the watermark passes the window's end, LATE rows after that.

    Why state, and not the trigger's accumulating mode and pane timing:
    Prism (2.75) keeps the elements of an accumulating window pending until
    the window expires, holding the aggregation's watermark back, so on an
    open stream nothing downstream of it is scheduled again; and a pane it
    fires on processing time holds no watermark, so it may arrive here after
    the watermark passed its window's end. So this step tells early from
    on-time from late itself, with a timer at the window's end. And why the
    global window: Prism drops a stateful step's state when the watermark
    passes the end of its window, ignoring the allowed lateness; here the
    same timer clears it once the lateness has passed (see ``expire``).

    Only the entities a pane touched can have changed, so only those rows
    are emitted; the sinks overwrite, never add.

    ``catch_up_after_s``: an early pane of a window that ended longer ago than
    this (by the wall clock) is merged but not emitted: the job is catching up
    on a backlog, the watermark will close that window shortly, and
    speculative values of the past are writes nobody reads. None emits all.

    A restarted job's seeds (what an earlier run counted, transforms.ledger)
    come in as one more pane per window, so the window goes on from its total.

    ``expire``: clear a window's state once its allowed lateness has passed
    (what a job that runs for days needs). A job that drains to the end
    (``--until_idle``, replay) keeps it: there the watermark jumps to the end
    of time, both timers fire at once, and Prism may still deliver a pane
    fired on processing time after them (such panes hold no watermark); with
    the state cleared, it would start a new total and overwrite the full one.
    """
    TOTAL = ReadModifyWriteStateSpec("window_total", PickleCoder())
    CLOSE_THEN_EXPIRE = TimerSpec("close_then_expire", TimeDomain.WATERMARK)

    def __init__(self, allowed_lateness_s: int, emit_early: bool = True,
                 catch_up_after_s: Optional[float] = None, expire: bool = True,
                 trace_path: Optional[str] = None):
        self.trace_path = trace_path  # debug, see transforms.latency_trace (stage ``pane``)
        self.allowed_lateness = Duration(seconds=allowed_lateness_s)
        self.expire = expire
        self.emit_early = emit_early
        self.catch_up_after_s = catch_up_after_s
        self.early_skipped = Metrics.counter("WindowedMetrics", "catch_up_early_panes_skipped")

    def process(self, element, total=beam.DoFn.StateParam(TOTAL),
                timer=beam.DoFn.TimerParam(CLOSE_THEN_EXPIRE)):
        key, delta = element
        if not delta:  # a refire without new data changes nothing
            return
        state = total.read()
        if state is None:
            state = _WindowTotal({}, False, 0)
            timer.set(_max_timestamp(key))
        merge_into(state.partial, delta)
        if not state.closed and (not self.emit_early or self._catching_up(key)):
            total.write(state)  # the timer at the window's end emits these rows
            return
        rows = metric_rows(state.partial, only=delta, window_seconds=_seconds(key))
        total.write(state._replace(panes=state.panes + 1))
        if self.trace_path is not None and key[2] - key[1] == latency_trace.TRACE_WINDOW_MS:
            latency_trace.record(self.trace_path, "pane", {key[1]: overall_events(state.partial)}, total=True)
        yield _aggregate(key, "LATE" if state.closed else "EARLY", state.panes, rows)

    @on_timer(CLOSE_THEN_EXPIRE)
    def on_timer(self, key=beam.DoFn.KeyParam, total=beam.DoFn.StateParam(TOTAL),
                 timer=beam.DoFn.TimerParam(CLOSE_THEN_EXPIRE)):
        state = total.read()
        if state is None:
            return
        if state.closed:  # the allowed lateness has passed: the runner drops later data
            total.clear()
            return
        total.write(state._replace(closed=True, panes=state.panes + 1))
        if self.expire:
            timer.set(_max_timestamp(key) + self.allowed_lateness)
        if self.trace_path is not None and key[2] - key[1] == latency_trace.TRACE_WINDOW_MS:
            latency_trace.record(self.trace_path, "pane", {key[1]: overall_events(state.partial)}, total=True)
        yield _aggregate(key, "ON_TIME", state.panes, metric_rows(state.partial, window_seconds=_seconds(key)))

    def _catching_up(self, key) -> bool:
        if self.catch_up_after_s is None or key[2] / 1000 >= time.time() - self.catch_up_after_s:
            return False
        self.early_skipped.inc()
        return True


def _seconds(key) -> int:
    return (key[2] - key[1]) // 1000


def _max_timestamp(key) -> Timestamp:
    return Timestamp(micros=key[2] * 1000) - Duration(micros=1)


def _aggregate(key, timing: str, index: int, rows: list[MetricRow]) -> WindowAggregate:
    _, start_ms, end_ms = key
    return WindowAggregate((end_ms - start_ms) // 1000, start_ms, end_ms, timing, index, rows)


def _seed_pane(seed, size: int, label: str):
    """((window seconds, start ms), Partial) -> the pane ((label, start ms, end ms), Partial)
    stamped at the window's start, if the seed is of window size ``size``."""
    (seconds, start), partial = seed
    if seconds == size:
        yield TimestampedValue(((label, start, start + size * 1000), partial), start / 1000.0)


class _AfterProcessingTime(trigger.AfterProcessingTime):
    """AfterProcessingTime with a delay in fractions of a second: Beam 2.77's
    Python SDK writes ``delay * 1000`` into the proto's integer delay_millis,
    which refuses a float such as 500.0 (pinned by
    tests/test_aggregate.py::test_a_sub_second_early_firing_reaches_the_runner_in_milliseconds)."""

    def to_runner_api(self, context):
        api = beam_runner_api_pb2
        delay = api.TimestampTransform(delay=api.TimestampTransform.Delay(delay_millis=int(round(self.delay * 1000))))
        return api.Trigger(after_processing_time=api.Trigger.AfterProcessingTime(timestamp_transforms=[delay]))


class WindowedResult(NamedTuple):
    """What WindowedMetrics makes. Given a tuple of event streams, ``too_late``
    and ``fold_errors`` are tuples too, one PCollection per stream, in order."""
    panes: dict                # window label -> PCollection of WindowAggregate
    too_late: PCollection      # of DeadLetter (TOO_LATE)
    fold_errors: PCollection   # of DeadLetter (PROCESSING_ERROR): events whose counters raised


class WindowedMetrics(beam.PTransform):
    """Batches of Events -> WindowedResult: {window label: PCollection of
    WindowAggregate}, one element per emitted pane (see :class:`AccumulatePanes`),
    and a TOO_LATE DeadLetter per event that came after its window's allowed
    lateness (see :class:`RejectLateEventsFn`).

    One PCollection per window size rather than a Flatten: sinks applied to
    each fuse into that window's stage, so panes are never serialized again
    on their way out (a Flatten of differently windowed inputs is a stage of its own).

    ``early_firing_s``: processing-time delay between early panes (real-time
    values before the window closes) of the finest windows (1 minute or less),
    in seconds, fractions allowed (to the millisecond): the latency of the
    1-minute values is this plus the read and the runner's hand-overs; a
    larger window of size S fires early at most every max(early_firing_s,
    min(S / 60, 60)) seconds, because each early pane rewrites the entities it
    touched in the sinks.
    None: no early panes (a bounded job, whose watermark closes every
    window). ``allowed_lateness_s``: how long after a window closes late events
    still refire it; later ones are dead letters (TOO_LATE).
    ``ledger``: the window ledger to write (transforms.ledger); ``seeds``: a
    PTransform (from the pipeline's start) of ((window seconds, window start
    ms), Partial): the totals an earlier run left in the ledger
    (transforms.resume.ReadWindowSeeds), or a beam.Create in tests;
    ``dead_lettered``: see RejectLateEventsFn. ``retry``: how the ledger's
    writes ride out a Postgres outage (transforms.sinks.resilience).
    ``catch_up_after_s``, ``expire_state``: see :class:`AccumulatePanes`.
    ``trace_path``: debug, see transforms.latency_trace.
    """

    def __init__(self, window_sizes_s: tuple[int, ...] = WINDOW_SIZES_S,
                 early_firing_s: Optional[float] = 5, allowed_lateness_s: int = 3600,
                 catch_up_after_s: Optional[float] = None, expire_state: bool = True,
                 ledger: Optional[WindowLedger] = None, seeds: Optional[beam.PTransform] = None,
                 dead_lettered: frozenset = frozenset(), retry: Optional["SinkRetryConfig"] = None,
                 trace_path: Optional[str] = None):
        super().__init__()
        self.trace_path = trace_path
        self.expire_state = expire_state
        self.catch_up_after_s = catch_up_after_s
        self.window_sizes_s = tuple(sorted(window_sizes_s))
        self.early_firing_s = early_firing_s
        self.allowed_lateness_s = allowed_lateness_s
        self.ledger, self.seeds, self.dead_lettered, self.retry = ledger, seeds, dead_lettered, retry

    def early_delay_s(self, size_s: int) -> float:
        """Seconds between early panes of windows of ``size_s``, to the millisecond."""
        delay = self.early_firing_s if size_s <= 60 else max(self.early_firing_s, min(size_s // 60, 60))
        return round(delay, 3)

    def _trigger(self, size_s: int) -> trigger.TriggerFn:
        if self.early_firing_s is None:
            return trigger.DefaultTrigger()  # one pane as the watermark passes (bounded jobs)
        # AccumulatePanes tells early, on-time and late apart itself (by its
        # timer); the trigger only decides when partials move on.
        return trigger.AfterWatermark(early=_AfterProcessingTime(self.early_delay_s(size_s)),
                                      late=trigger.AfterCount(1))

    def _seed_panes(self, pipeline) -> dict:
        """The seeds as panes, per window label: ((label, start ms, end ms), Partial).

        Stamped inside their window: a timer set for an element holds the
        watermark at the element's time, and Create's default is the minimum.
        (A side input instead made Prism 2.77 fire some windows' timers
        without the state their elements had written.)
        """
        seeds = pipeline | "Seeds" >> (self.seeds if self.seeds is not None else beam.Create([]))
        return {window_label(size): seeds | f"SeedPanes{window_label(size)}" >> beam.FlatMap(
                    _seed_pane, size, window_label(size)).with_output_types(WindowKeyedPartial)
                for size in self.window_sizes_s}

    def _fold(self, event_batches: PCollection, suffix: str):
        """One stream's lateness check and fold: (partials by label, too late, fold errors).
        Both steps are ParDos, so they fuse with whatever made ``event_batches``."""
        labels = [window_label(s) for s in self.window_sizes_s]
        on_time, too_late = event_batches | f"RejectLateEvents{suffix}" >> RejectLateEvents(
            self.window_sizes_s[0], self.allowed_lateness_s, self.dead_lettered)
        partials = on_time | f"FoldIntoWindows{suffix}" >> beam.ParDo(
            FoldIntoWindows(self.window_sizes_s, self.ledger, self.retry, self.trace_path)).with_outputs(FOLD_ERRORS, *labels)
        return partials, too_late, partials[FOLD_ERRORS]

    def expand(self, event_batches) -> WindowedResult:
        """``event_batches``: a PCollection, or a tuple of them (say, one per
        reader of a share of the partitions): each is checked for lateness
        and folded on its own (steps ``RejectLateEvents<i>``,
        ``FoldIntoWindows<i>`` from the second on), and their partials meet
        before the merge (``Partials<label>``)."""
        streams = tuple(event_batches) if isinstance(event_batches, (tuple, list)) else (event_batches,)
        folded = [self._fold(batches, str(i) if i else "") for i, batches in enumerate(streams)]
        lateness_s = self.allowed_lateness_s + RUNNER_LATENESS_MARGIN_S
        panes = {}
        seed_panes = self._seed_panes(streams[0].pipeline)
        for size, label in zip(self.window_sizes_s, [window_label(s) for s in self.window_sizes_s]):
            seeds = seed_panes[label]
            partials = (folded[0][0][label] if len(folded) == 1 else
                        tuple(f[0][label] for f in folded) | f"Partials{label}" >> beam.Flatten())
            fired = (
                partials
                | f"Window{label}" >> beam.WindowInto(
                    window.FixedWindows(size), trigger=self._trigger(size),
                    accumulation_mode=trigger.AccumulationMode.DISCARDING,
                    allowed_lateness=Duration(seconds=lateness_s))
                | f"Merge{label}" >> beam.CombinePerKey(MergeWindowMetrics())
                | f"KeyByWindow{label}" >> beam.ParDo(KeyByWindow(self.trace_path)).with_output_types(WindowKeyedPartial)
                | f"LeaveWindow{label}" >> beam.WindowInto(window.GlobalWindows()))
            panes[label] = (
                (fired, seeds) | f"WithSeeds{label}" >> beam.Flatten()
                | f"Accumulate{label}" >> beam.ParDo(AccumulatePanes(
                    lateness_s, self.early_firing_s is not None, self.catch_up_after_s,
                    self.expire_state, self.trace_path)))
        if not isinstance(event_batches, (tuple, list)):
            return WindowedResult(panes, folded[0][1], folded[0][2])
        return WindowedResult(panes, tuple(f[1] for f in folded), tuple(f[2] for f in folded))
