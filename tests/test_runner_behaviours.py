"""Prism behaviours the job is built around, pinned on small toy pipelines.

Each test runs a pipeline of a few seconds on our Prism build (v2.77.0, see
scripts/stack.sh) and asserts what Prism does today, so that a Prism upgrade
that changes it fails here and points at the workaround that can go (or, for
a behaviour that is gone, at the workaround that must come back). See the
README's "Known limits".

The toys use no Kafka: an unbounded splittable DoFn (``_Script``) stands in
for the reader. It runs a script by the wall clock: at each step it emits
elements at given event times and sets its watermark, checkpointing with a
short resume delay in between, as ``transforms.kafka_read`` does on an idle
partition. What the pipelines see is appended to a file, one JSON line per
event, and the tests read the order of those lines: no timing asserts.
"""
import json
import os
import time

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.options.pipeline_options import PipelineOptions, PrismRunnerOptions, StandardOptions
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Duration, Timestamp

PRISM = os.environ.get("PRISM_PATH", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".stack", "bin", "prism"))


@pytest.fixture
def prism(tmp_path):
    """(streaming pipeline on our Prism, log file): skips without the binary."""
    if not os.path.exists(PRISM):
        pytest.skip(f"no Prism binary at {PRISM} (scripts/stack.sh up builds it)")
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    opts.view_as(StandardOptions).runner = "PrismRunner"
    opts.view_as(PrismRunnerOptions).prism_location = PRISM
    return (lambda: beam.Pipeline(options=opts)), str(tmp_path / "events.jsonl")


def _log(path, *fields):
    with open(path, "a") as f:  # one short O_APPEND write per line
        f.write(json.dumps(list(fields)) + "\n")


def _read(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


class _CheckpointOnly(OffsetRestrictionTracker):
    """Splits only to checkpoint, as the reader's tracker: no dynamic splits."""

    def try_split(self, fraction_of_remainder):
        return super().try_split(0) if fraction_of_remainder == 0 else None


class _Unbounded(RestrictionProvider):
    def initial_restriction(self, element):
        return OffsetRange(0, 10 ** 12)

    def create_tracker(self, restriction):
        return _CheckpointOnly(restriction)

    def restriction_size(self, element, restriction):
        return 1

    def split(self, element, restriction):
        yield restriction


class _ManualWatermark(WatermarkEstimatorProvider):
    def __init__(self, initial_s=0):
        self.initial_s = initial_s

    def initial_estimator_state(self, element, restriction):
        return Timestamp(self.initial_s)

    def create_watermark_estimator(self, state):
        return ManualWatermarkEstimator(state)


class _Script(beam.DoFn):
    """Input: the wall-clock time the script starts from. Runs ``steps``, each
    (seconds after that start, [(key, event time s)] to emit, watermark s),
    checkpointing for ``resume_s`` between calls; logs ("source", step) as a
    step runs and ("source", "done") when it ends its restriction, ``end_s``
    after the start (the watermark then goes to the end of time)."""

    def __init__(self, path, steps, end_s, resume_s=0.1):
        self.path, self.steps, self.end_s, self.resume_s = path, steps, end_s, resume_s

    def process(self, start, tracker=beam.DoFn.RestrictionParam(_Unbounded()),
                watermark=beam.DoFn.WatermarkEstimatorParam(_ManualWatermark())):
        step = tracker.current_restriction().start
        elapsed = time.time() - start
        if step < len(self.steps):
            at, elements, mark = self.steps[step]
            if elapsed >= at:
                tracker.try_claim(step)
                for key, t in elements:
                    yield window.TimestampedValue((key, 1), t)
                watermark.set_watermark(Timestamp(mark))
                _log(self.path, "source", step)
        elif elapsed >= self.end_s:
            _log(self.path, "source", "done")
            tracker.try_claim(tracker.current_restriction().stop - 1)
            return
        tracker.defer_remainder(Duration(seconds=self.resume_s))


class _ObservePanes(beam.DoFn):
    """Input, in the global window: (key, (window end s, pane timing, count)).
    Logs ("pane", key, timing, count, whether the key's end-of-window timer
    already fired) and ("timer", key) when that timer fires: the same timer
    transforms.aggregate.AccumulatePanes sets to tell on-time from late."""
    FIRED = userstate.ReadModifyWriteStateSpec("fired", VarIntCoder())
    END = userstate.TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, path):
        self.path = path

    def process(self, element, fired=beam.DoFn.StateParam(FIRED), end=beam.DoFn.TimerParam(END)):
        key, (end_s, timing, count) = element
        _log(self.path, "pane", key, timing, count, fired.read() or 0)
        if fired.read() is None:
            fired.write(0)
            end.set(Timestamp(end_s) - Duration(micros=1))

    @userstate.on_timer(END)
    def on_end(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.StateParam(FIRED)):
        fired.write(1)
        _log(self.path, "timer", key)


def _describe_pane(kv, win=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
    key, count = kv
    return key, (int(win.end), ("EARLY", "ON_TIME", "LATE", "UNKNOWN")[pane.timing], count)


def _panes_to_observer(pcoll, name, path, size_s, windowing):
    """Windows ``pcoll`` of (key, 1), sums per key and window, and hands the
    panes, in the global window, to _ObservePanes."""
    return (pcoll
            | f"Window{name}" >> beam.WindowInto(window.FixedWindows(size_s), **windowing)
            | f"Sum{name}" >> beam.CombinePerKey(sum)
            | f"Describe{name}" >> beam.Map(_describe_pane)
            | f"Global{name}" >> beam.WindowInto(window.GlobalWindows())
            | f"Observe{name}" >> beam.ParDo(_ObservePanes(path)))


# --------------------------------------------------------------------- (a)

class _CountCalls(beam.DoFn):
    """Input: (name, start, resume delay s). Checkpoints with that delay until
    ``run_s`` after start; logs ("call", name) on every call."""

    def __init__(self, path, run_s):
        self.path, self.run_s = path, run_s

    def process(self, element, tracker=beam.DoFn.RestrictionParam(_Unbounded())):
        name, start, delay_s = element
        _log(self.path, "call", name)
        if time.time() - start >= self.run_s:
            tracker.try_claim(tracker.current_restriction().stop - 1)
            return
        tracker.defer_remainder(Duration(seconds=delay_s))
        return
        yield  # a generator, as a reader's process is


def test_prism_honours_a_checkpoint_resume_delay(prism):
    """(a) GONE on Prism v2.77.0: a checkpoint's resume delay is honoured.

    Prism 2.75 re-ran a deferred residual at once, ignoring
    ``tracker.defer_remainder(Duration(...))``, so the reader slept itself
    (``_PartitionReader.pace()`` in transforms/kafka_read.py, deleted with
    2.77). Prism 2.77 parks a residual with a requested delay until then
    (engine/elementmanager.go: delayedResiduals). An SDF that checkpoints
    with 1 s delays for 3 s is called about 4 times; one with no delay,
    beside it, hundreds of times. If the delayed one is called often again,
    the old behaviour is back: an idle partition would be polled in a busy
    loop, so pacing must come back to the reader.
    """
    pipeline, path = prism
    start = time.time()
    with pipeline() as p:
        (p | beam.Create([("delayed", start, 1.0), ("immediate", start, 0.0)])
         | beam.ParDo(_CountCalls(path, run_s=3.0)))
    calls = [e[1] for e in _read(path)]
    delayed, immediate = calls.count("delayed"), calls.count("immediate")
    assert 2 <= delayed <= 10, (delayed, immediate)  # honoured: ~4; ignored: as many as "immediate"
    assert immediate >= 50, (delayed, immediate)     # the control: no delay, re-run at once (~500)


# --------------------------------------------------------------------- (b)

class _SlowAndFast(beam.DoFn):
    """Two restrictions of one SDF stage, on their own bundles: "fast"
    checkpoints every 0.3 s with its watermark 1000 s ahead; "slow" checkpoints
    at once (watermark still at its start), then spends ``sleep_s`` in one call
    and emits a record at event time 1 s, on time by its own watermark."""

    def __init__(self, path, sleep_s, run_s):
        self.path, self.sleep_s, self.run_s = path, sleep_s, run_s

    def process(self, element, tracker=beam.DoFn.RestrictionParam(_Unbounded()),
                watermark=beam.DoFn.WatermarkEstimatorParam(_ManualWatermark())):
        name, start = element
        position = tracker.current_restriction().start
        tracker.try_claim(position)
        if name == "slow":
            if position == 0:
                tracker.defer_remainder()
                return
            time.sleep(self.sleep_s)
            yield window.TimestampedValue(("slow", 1), 1)
            _log(self.path, "emitted", "slow")
            tracker.try_claim(tracker.current_restriction().stop - 1)
            return
        if time.time() - start >= self.run_s:
            tracker.try_claim(tracker.current_restriction().stop - 1)
            return
        if position == 0:
            yield window.TimestampedValue(("fast", 1), 2)
        else:
            watermark.set_watermark(Timestamp(1000))
        tracker.defer_remainder(Duration(seconds=0.3))


class _LogGroups(beam.DoFn):
    def __init__(self, path):
        self.path = path

    def process(self, kv):
        _log(self.path, "group", kv[0], len(list(kv[1])))


def test_prism_takes_a_stages_output_watermark_from_the_last_bundles_residuals(prism):
    """(b) STILL PRESENT on Prism v2.77.0: a stage's output watermark is the
    minimum over the last finished bundle's residuals alone, even while other
    bundles of the stage still run (engine/elementmanager.go, PersistBundle
    sets stageState.estimatedOutput from this bundle's residuals, and
    updateWatermarks lets it override the input watermark).

    A "slow" restriction, at watermark 0, is busy in its own bundle when a
    "fast" one checkpoints with watermark 1000: the stage's watermark jumps to
    1000, the window [0, 10) fires without the slow restriction's record, and
    that record (event time 1) is then dropped as late. Justifies
    ``_PartitionWatermarks`` in transforms/kafka_read.py: every partition
    reports the minimum over all partitions, moved only at bundle
    finalization. If the slow record is grouped, Prism holds the watermark for
    running bundles and that workaround may go.
    """
    pipeline, path = prism
    start = time.time()
    with pipeline() as p:
        (p | beam.Create([("slow", start), ("fast", start)])
         | beam.ParDo(_SlowAndFast(path, sleep_s=2.5, run_s=5.0))
         | beam.WindowInto(window.FixedWindows(10))
         | beam.GroupByKey()
         | beam.ParDo(_LogGroups(path)))
    events = _read(path)
    assert ("emitted", "slow") in events, events
    assert ("group", "fast", 1) in events, events
    # The fast window fired while the slow bundle still ran ...
    assert events.index(("group", "fast", 1)) < events.index(("emitted", "slow")), events
    # ... and the slow record, on time by its own watermark, was dropped as late.
    assert not [e for e in events if e[:2] == ("group", "slow")], events


# --------------------------------------------------------------------- (c)

def test_prism_keeps_accumulating_panes_pending_and_holds_the_watermark_until_expiry(prism):
    """(c) STILL PRESENT on Prism v2.77.0 (the hold; the scheduling is fixed):
    an accumulating window's elements stay pending until its last pane (the
    window's end plus the allowed lateness) and hold the aggregation's
    watermark (engine/elementmanager.go: aggregateStageKind's
    buildEventTimeBundle pushes them back; minPendingTimestamp counts them).

    Two branches of one stream, accumulating and discarding, with early,
    on-time and late panes of window [0, 60) and 600 s of allowed lateness;
    the watermark reaches 90 while the stream stays open. The end-of-window
    timer of the step after the discarding branch fires while the stream is
    open; after the accumulating branch only when the source ends. Prism 2.77
    still schedules the step after it for each pane (2.75 did not): its panes
    arrive while the stream is open. Justifies discarding panes plus totals in
    state (AccumulatePanes in transforms/aggregate.py): with accumulating
    panes, no window would be ON_TIME downstream before it expired.
    """
    pipeline, path = prism
    steps = [(0.0, [("k", 1), ("k", 2), ("k", 3)], 0),  # window [0, 60): early panes
             (2.0, [], 61),                             # on time
             (3.0, [("k", 4)], 61),                     # late, within the allowed lateness
             (4.0, [], 90)]
    windowing = dict(trigger=trigger.AfterWatermark(early=trigger.AfterProcessingTime(1),
                                                    late=trigger.AfterCount(1)),
                     allowed_lateness=Duration(seconds=600))
    with pipeline() as p:
        stream = p | beam.Create([time.time()]) | beam.ParDo(_Script(path, steps, end_s=5.5))
        for name, mode in (("acc", trigger.AccumulationMode.ACCUMULATING),
                           ("disc", trigger.AccumulationMode.DISCARDING)):
            keyed = stream | f"Key{name}" >> beam.Map(lambda kv, n=name: (n, kv[1]))
            _panes_to_observer(keyed, name, path, 60, dict(windowing, accumulation_mode=mode))
    events = _read(path)
    done = events.index(("source", "done"))
    assert ("timer", "disc") in events[:done], events   # the control: closes while the stream is open
    assert ("timer", "acc") in events[done:], events    # held until the source ended
    acc_panes_while_open = [e for e in events[:done] if e[:2] == ("pane", "acc")]
    assert len(acc_panes_while_open) >= 2, events        # consumers are scheduled (2.75: they were not)


# --------------------------------------------------------------------- (d)

class _CountInState(beam.DoFn):
    """A stateful step in fixed windows: logs ("count", key, count so far in
    the window's state) for each element."""
    COUNT = userstate.ReadModifyWriteStateSpec("count", VarIntCoder())

    def __init__(self, path):
        self.path = path

    def process(self, kv, count=beam.DoFn.StateParam(COUNT)):
        n = (count.read() or 0) + 1
        count.write(n)
        _log(self.path, "count", kv[0], n)


def test_prism_drops_a_stateful_steps_state_at_the_window_end_ignoring_allowed_lateness(prism):
    """(d) STILL PRESENT on Prism v2.77.0: a stateful step's state is dropped
    once the watermark passes the end of its window, whatever the allowed
    lateness (600 s here): a second element of window [0, 10), within the
    lateness, finds the state empty. The control, window [100, 110), which the
    watermark has not passed, keeps its state. Justifies keeping the totals
    of AccumulatePanes (transforms/aggregate.py) in the global window, keyed by
    window, with their own expiry timer. If "late" counts 2, Prism honours the
    allowed lateness for state and windowed state would do.
    """
    pipeline, path = prism
    steps = [(0.0, [("late", 1), ("open", 101)], 0),
             (1.0, [], 20),                              # past [0, 10), within its lateness
             (2.0, [("late", 2), ("open", 102)], 20),
             (3.0, [], 30)]
    with pipeline() as p:
        (p | beam.Create([time.time()]) | beam.ParDo(_Script(path, steps, end_s=4.0))
         | beam.WindowInto(window.FixedWindows(10), allowed_lateness=Duration(seconds=600))
         | beam.ParDo(_CountInState(path)))
    counts = sorted(e[1:] for e in _read(path) if e[0] == "count")
    assert counts == [("late", 1), ("late", 1), ("open", 1), ("open", 2)], counts


# --------------------------------------------------------------------- (e)

def test_prism_delivers_a_processing_time_pane_after_the_watermark_passed_its_window(prism):
    """(e) STILL PRESENT on Prism v2.77.0: a pane fired on processing time holds
    no watermark (engine/elementmanager.go: an aggregation's
    processing-time bundle carries no holds; at the end of a stream every
    processing-time trigger fires), so it can reach the next step after that
    step's end-of-window timer fired.

    Window [0, 10) gets records of 20 keys, an early pane (processing time),
    more records, and then the stream ends: the watermark jumps to the end of
    time while the second early firing is due. With the early trigger, the
    last pane of each key comes after the next step's end-of-window timer
    (seen: every key); the control branch, without early firings, gets every
    pane before its timer. Justifies AccumulatePanes (transforms/aggregate.py)
    deciding EARLY / ON_TIME / LATE by its own timer, writing a straggler as
    LATE with the full total, and ``expire=False`` for a draining job. If no
    pane comes after a timer, Prism holds the watermark for such panes.
    """
    pipeline, path = prism
    keys = [f"k{i}" for i in range(20)]
    steps = [(0.0, [(k, 1) for k in keys], 0),
             (1.8, [(k, 2) for k in keys], 0)]   # after the first early pane (1 s)
    with pipeline() as p:
        stream = p | beam.Create([time.time()]) | beam.ParDo(_Script(path, steps, end_s=2.0))
        for name, early in (("early", trigger.AfterProcessingTime(1)), ("plain", None)):
            windowing = dict(trigger=trigger.AfterWatermark(early=early, late=trigger.AfterCount(1)),
                             accumulation_mode=trigger.AccumulationMode.DISCARDING,
                             allowed_lateness=Duration(seconds=600))
            keyed = stream | f"Key{name}" >> beam.Map(lambda kv, n=name: (f"{n}:{kv[0]}", kv[1]))
            _panes_to_observer(keyed, name, path, 10, windowing)
    panes = [e for e in _read(path) if e[0] == "pane"]
    after_timer = [e for e in panes if e[4] == 1]
    # Every record is in some pane of each branch: 2 per key.
    for name in ("early", "plain"):
        assert sum(e[3] for e in panes if e[1].startswith(name + ":")) == 2 * len(keys), panes
    assert not [e for e in after_timer if e[1].startswith("plain:")], after_timer  # the control
    assert [e for e in after_timer if e[1].startswith("early:")], panes


def test_beam_asks_whether_it_runs_in_ipython_while_a_job_is_built_and_run(monkeypatch):
    """pipelines/replay.py's _ask_beam_about_ipython_now: Beam 2.77 asks is_in_ipython()
    (an IPython import, where installed) as transforms are applied and as Pipeline.run
    ends, i.e. inside a replay's job time. When this fails, Beam no longer asks: the
    warm-up can go."""
    import apache_beam.pipeline as beam_pipeline
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    asked = []
    real = beam_pipeline.is_in_ipython
    monkeypatch.setattr(beam_pipeline, "is_in_ipython", lambda: asked.append(1) or real())
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = p | beam.Create([1, 2]) | beam.Map(lambda x: x + 1)
    assert asked, "Beam no longer asks is_in_ipython() while building and running a job"


# --------------------------------------------------------------------- (f)

def test_prism_ends_a_job_at_the_job_server_timeout(prism):
    """(f) Beam 2.77's PortableRunner (under PrismRunner) puts --job_server_timeout
    on the job's state stream as a gRPC deadline: a streaming job still running
    when it passes fails with DEADLINE_EXCEEDED (300 s by default: every
    open-ended job would exit 1 after five minutes). pipelines.options
    .no_stream_deadline lifts it for the streaming job; when this test fails
    (the job runs its 5 s to the end), that workaround can go."""
    _, path = prism
    opts = PipelineOptions(job_server_timeout=2)
    opts.view_as(StandardOptions).streaming = True
    opts.view_as(StandardOptions).runner = "PrismRunner"
    opts.view_as(PrismRunnerOptions).prism_location = PRISM
    start = time.time()
    with pytest.raises(Exception, match="DEADLINE_EXCEEDED|Deadline Exceeded"):
        with beam.Pipeline(options=opts) as p:
            p | beam.Create([("running", start, 0.5)]) | beam.ParDo(_CountCalls(path, run_s=5.0))
    time.sleep(max(0.0, start + 6.0 - time.time()))  # the job (still on Prism) ends by itself meanwhile
