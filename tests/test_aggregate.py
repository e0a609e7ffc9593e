"""WindowedMetrics: exact values per window, and early / on-time / late panes on TestStream."""
import os
import random
from collections import defaultdict

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, PrismRunnerOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to

from tests.helpers import BASE_MS, answer, event
from transforms.aggregate import WindowedMetrics, fold_events, metric_rows, merge_into

S = 1000  # ms


PRISM = os.environ.get("PRISM_PATH", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".stack", "bin", "prism"))


@pytest.fixture(params=["direct", "prism"])
def streaming_pipeline(request):
    """A streaming TestPipeline on Beam's Python DirectRunner and on Prism, the
    job's own runner: the two differ in how they keep state and watermarks.

    Tests advance processing time after their last elements and the
    watermark past their windows before jumping to infinity: the Python
    DirectRunner never fires a pending processing-time trigger otherwise, and
    drops what an end-of-window timer emits when the watermark jumps straight
    to infinity (Prism does neither).
    """
    opts = PipelineOptions()
    opts.view_as(StandardOptions).streaming = True
    if request.param == "prism":
        if not os.path.exists(PRISM):
            pytest.skip(f"no Prism binary at {PRISM} (scripts/stack.sh up builds it)")
        opts.view_as(StandardOptions).runner = "PrismRunner"
        opts.view_as(PrismRunnerOptions).prism_location = PRISM
    return lambda: TestPipeline(options=opts)


def overall(agg):
    row = next(r for r in agg.rows if r.family == "overall")
    return (agg.window_seconds, agg.window_start_ms - BASE_MS, agg.pane_timing,
            row.metrics["answers"], row.metrics["active_users"])


def random_events(n, seed=3):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ts = BASE_MS + rng.randrange(0, 2 * 3600 * S)
        kind = rng.choice(["qa", "rated", "mastery", "ended"])
        base = {"event_id": str(rng.random()), "occurred_at": ts, "user_id": f"u{rng.randrange(7)}",
                "correlation_id": None}
        if kind == "qa":
            out.append(event("question_answered", answer(ts, user=base["user_id"], concept=f"c{rng.randrange(3)}",
                                                         correct=rng.random() < .6, rt=rng.randrange(100, 9000))))
        elif kind == "rated":
            out.append(event("content_rated", dict(base, content_id=f"k{rng.randrange(4)}", rating=rng.randint(1, 5))))
        elif kind == "mastery":
            b = rng.random()
            out.append(event("mastery_updated", dict(base, concept_id=f"c{rng.randrange(3)}", mastery_before=b,
                                                     mastery_after=min(1.0, b + .1))))
        else:
            out.append(event("session_ended", dict(base, session_id="s", course_id="x",
                                                   duration_ms=rng.randrange(1000, 10 ** 6))))
    return out


def expected_by_hand(events, size_ms):
    """Independent of transforms.aggregate: straight from the event fields."""
    w = defaultdict(lambda: defaultdict(float))
    users = defaultdict(set)
    for e in events:
        f, start = e.fields, e.event_time_ms // size_ms * size_ms
        users[start].add(f["user_id"])
        o = w[(start, "overall", "all")]
        o["events"] += 1
        if e.event_type == "question_answered":
            for key in ((start, "overall", "all"), (start, "concept", f["concept_id"]), (start, "user", f["user_id"])):
                w[key]["answers"] += 1
                w[key]["correct"] += f["correct"]
                w[key]["rt"] += f["response_time_ms"]
        elif e.event_type == "content_rated":
            w[(start, "content", f["content_id"])]["ratings"] += 1
            w[(start, "content", f["content_id"])]["rating_sum"] += f["rating"]
            o["ratings"] += 1
            o["rating_sum"] += f["rating"]
        elif e.event_type == "mastery_updated":
            w[(start, "concept", f["concept_id"])]["change"] += f["mastery_after"] - f["mastery_before"]
        elif e.event_type == "session_ended":
            o["sessions_ended"] += 1
            o["duration"] += f["duration_ms"]
    for start, u in users.items():
        w[(start, "overall", "all")]["active_users"] = len(u)
    return w


@pytest.mark.parametrize("size_s", [60, 300, 3600, 86400])
def test_fold_and_merge_match_a_hand_count(size_s):
    events = random_events(3000)
    size_ms = size_s * S
    # fold in uneven batches, then merge partials per window, as the runner would
    merged = defaultdict(dict)
    for i in range(0, len(events), 377):
        for (size, start), (partial, latest) in fold_events(events[i:i + 377], (size_ms,)).items():
            assert start <= latest < start + size
            merge_into(merged[start], partial)
    want = expected_by_hand(events, size_ms)
    for start, partial in merged.items():
        rows = {(r.family, r.entity_id): r.metrics for r in metric_rows(partial)}
        o, wo = rows[("overall", "all")], want[(start, "overall", "all")]
        assert o["events"] == wo["events"] and o["active_users"] == wo["active_users"]
        assert o["sessions_ended"] == wo["sessions_ended"]
        if wo["sessions_ended"]:
            assert o["mean_session_duration_ms"] == pytest.approx(wo["duration"] / wo["sessions_ended"])
        if wo["ratings"]:
            assert o["mean_rating"] == pytest.approx(wo["rating_sum"] / wo["ratings"])
        for (family, entity), m in rows.items():
            h = want[(start, family, entity)]
            if family in ("concept", "user") and h["answers"]:
                assert m["answers"] == h["answers"]
                assert m["accuracy"] == pytest.approx(h["correct"] / h["answers"])
                assert m["mean_response_time_ms"] == pytest.approx(h["rt"] / h["answers"])
            if family == "concept":
                assert m["mastery_change"] == pytest.approx(h["change"])
            if family == "content":
                assert m["mean_rating"] == pytest.approx(h["rating_sum"] / h["ratings"])
        assert len([k for k in want if k[0] == start and want[k]]) == len(rows)


def test_a_ratio_with_no_denominator_is_absent():
    rows = metric_rows(fold_events([event("session_ended", {
        "event_id": "e", "occurred_at": BASE_MS, "user_id": "u", "correlation_id": None,
        "session_id": "s", "course_id": "c", "duration_ms": 10})], (60 * S,))[(60 * S, BASE_MS)][0])
    o = next(r for r in rows if r.family == "overall").metrics
    assert "accuracy" not in o and "open_rate" not in o and o["mean_session_duration_ms"] == 10


def test_early_on_time_and_late_panes_accumulate(streaming_pipeline):
    t = BASE_MS / 1000
    stream = (TestStream()
              .advance_watermark_to(t)
              .add_elements([[event("question_answered", answer(BASE_MS + 1 * S, user="a")),
                              event("question_answered", answer(BASE_MS + 2 * S, user="b"))]])
              .advance_processing_time(6)                         # early pane: 2 answers
              .add_elements([[event("question_answered", answer(BASE_MS + 3 * S, user="a"))]])
              .advance_processing_time(6)                         # early again, or on time: 3
              .advance_watermark_to(t + 61)                       # on time: 3 answers
              .add_elements([[event("question_answered", answer(BASE_MS + 4 * S, user="c"))]])
              .advance_processing_time(6)
              .advance_watermark_to(t + 90)                       # late, within lateness: 4
              .advance_watermark_to(t + 200)                      # window expired
              .add_elements([[event("question_answered", answer(BASE_MS + 5 * S, user="d"))]])
              .advance_processing_time(6)
              .advance_watermark_to_infinity())                   # beyond lateness: TOO_LATE
    with streaming_pipeline() as p:
        result = p | stream | WindowedMetrics(window_sizes_s=(60,), early_firing_s=5, allowed_lateness_s=60)
        assert_that(result.panes["1m"] | beam.Map(overall), panes_are_early_on_time_late)
        # The last event came 200 s after its window opened: past the 60 s window
        # and 60 s of lateness; it is a dead letter, not a silent drop.
        assert_that(result.too_late | beam.Map(lambda d: (d.error_code, d.source_offset)),
                    equal_to([("TOO_LATE", 0)]), label="TooLate")


def panes_are_early_on_time_late(panes):
    """Early panes with the first two answers (and, when the runner fires one
    for it before the watermark passes, the third), then exact on-time and
    late totals."""
    early = sorted(p for p in panes if p[2] == "EARLY")
    assert sorted(p for p in panes if p[2] != "EARLY") == [
        (60, 0, "LATE", 4.0, 3.0), (60, 0, "ON_TIME", 3.0, 2.0)], panes
    assert early[0] == (60, 0, "EARLY", 2.0, 2.0), panes
    assert set(early[1:]) <= {(60, 0, "EARLY", 3.0, 2.0)}, panes


def test_every_window_size_fires_on_its_own_boundaries(streaming_pipeline):
    t = BASE_MS / 1000
    times = [0, 59, 61, 299, 301, 3599, 3601]
    stream = (TestStream().advance_watermark_to(t)
              .add_elements([[event("question_answered", answer(BASE_MS + s * S)) for s in times]])
              .advance_processing_time(61)
              .advance_watermark_to(t + 2 * 86400)
              .advance_watermark_to_infinity())
    with streaming_pipeline() as p:
        by_size = (p | stream | WindowedMetrics(allowed_lateness_s=0)).panes
        assert sorted(by_size) == ["1d", "1h", "1m", "5m"]
        # Early panes come as processing time advances; the final ones must be exact.
        panes = (tuple(by_size.values()) | beam.Flatten()
                 | beam.Filter(lambda agg: agg.pane_timing == "ON_TIME") | beam.Map(overall))
        expected = []
        for size in (60, 300, 3600, 86400):
            counts = defaultdict(int)
            for s in times:
                counts[s // size * size] += 1
            expected += [(size, start * 1000, "ON_TIME", float(n), 1.0) for start, n in counts.items()]
        assert_that(panes, equal_to(expected))


def test_early_panes_of_long_past_windows_are_skipped_when_catching_up(streaming_pipeline):
    t = BASE_MS / 1000  # 2026-01-01: long past by the wall clock
    stream = (TestStream()
              .advance_watermark_to(t)
              .add_elements([[event("question_answered", answer(BASE_MS + 1 * S))]])
              .advance_processing_time(6)
              .add_elements([[event("question_answered", answer(BASE_MS + 2 * S))]])
              .advance_processing_time(6)
              .advance_watermark_to(t + 120)
              .advance_watermark_to_infinity())
    with streaming_pipeline() as p:
        panes = (p | stream | WindowedMetrics(window_sizes_s=(60,), early_firing_s=5,
                                              catch_up_after_s=60)).panes["1m"] | beam.Map(overall)
        assert_that(panes, equal_to([(60, 0, "ON_TIME", 2.0, 1.0)]))


def test_windows_start_from_their_seeds(streaming_pipeline):
    """A restarted job: window 0 was seeded with 5 answers by 5 users and gets
    one more; window 1 was seeded and gets nothing new, yet is written again."""
    t = BASE_MS / 1000
    seed_events = [event("question_answered", answer(BASE_MS + i * S, user=f"s{i}")) for i in range(5)]
    seed_events += [event("question_answered", answer(BASE_MS + 70 * S, user="s0"))]
    seeds = {k: partial for k, (partial, _) in fold_events(seed_events, (60 * S,)).items()}
    seeds = {(60, start): partial for (_, start), partial in seeds.items()}
    stream = (TestStream()
              .advance_watermark_to(t)
              .add_elements([[event("question_answered", answer(BASE_MS + 30 * S, user="new"))]])
              .advance_processing_time(6)
              .advance_watermark_to(t + 200)
              .advance_watermark_to_infinity())
    with streaming_pipeline() as p:
        panes = (p | stream | WindowedMetrics(window_sizes_s=(60,), early_firing_s=5, allowed_lateness_s=600,
                                              seeds=beam.Create(sorted(seeds.items())))).panes["1m"]
        # The last pane of each window is what the sinks keep. (On Prism the new
        # event's early pane may arrive after the on-time one: it is then LATE.)
        assert_that(panes | beam.Map(lambda a: (a.pane_index, overall(a))), last_panes_are_seed_plus_new)


def last_panes_are_seed_plus_new(panes):
    final = {}
    for index, (_, start, _, answers, users) in sorted(panes):
        final[start] = (answers, users)
    # Hand count: window 0 = 5 seeded + 1 new answer, 6 users; window 1 = 1 answer.
    assert final == {0: (6.0, 6.0), 60000: (1.0, 1.0)}, panes


def test_panes_and_seeds_reach_accumulate_panes_with_one_deterministic_key_coder():
    """The state of AccumulatePanes is keyed by the key's bytes: if seeds and
    fired panes were encoded by different coders, one window would get two
    totals, and the last one written would win (seen on Prism 2.77)."""
    p = TestPipeline()
    (p | beam.Create([[]]) | WindowedMetrics(
        window_sizes_s=(60,), seeds=beam.Create([((60, BASE_MS), {"user": {"u": [1, 1, 1, 1]}})])))
    components = p.to_runner_api().components
    flatten = next(t for t in components.transforms.values() if t.unique_name.endswith("WithSeeds1m"))
    coders = {components.pcollections[pc].coder_id for pc in flatten.inputs.values()}
    assert len(coders) == 1, coders
    kv = components.coders[coders.pop()]
    key = components.coders[kv.component_coder_ids[0]]
    assert key.spec.urn == "beam:coder:tuple:v1"
    assert [components.coders[c].spec.urn for c in key.component_coder_ids] == [
        "beam:coder:string_utf8:v1", "beam:coder:varint:v1", "beam:coder:varint:v1"]


def test_an_event_that_cannot_be_folded_is_one_dead_letter_and_the_rest_count():
    good = event("question_answered", answer(BASE_MS + 1 * S, user="a"))
    broken = dict(answer(BASE_MS + 2 * S, user="b"))
    del broken["response_time_ms"]  # passed validation by a bug: folding it raises KeyError
    bad = event("question_answered", broken)._replace(offset=7)
    with TestPipeline() as p:
        result = p | beam.Create([[good, bad]]) | WindowedMetrics(window_sizes_s=(60,), early_firing_s=None)
        assert_that(result.panes["1m"] | beam.Map(overall), equal_to([(60, 0, "ON_TIME", 1.0, 1.0)]))
        assert_that(result.fold_errors | beam.Map(lambda d: (d.error_code, d.source_offset, "KeyError" in d.error_message)),
                    equal_to([("PROCESSING_ERROR", 7, True)]), label="FoldErrors")


# --- concept performance: struggling users (fewer than half right over >= 5 answers) ---

def struggling_events():
    """Answers in two hours; hand-picked pairs at the thresholds, then random ones."""
    evs = []

    def answers(hour, concept, user, right, wrong, at=0):
        for i in range(right + wrong):
            ts = BASE_MS + hour * 3600 * S + (at + i * 37) % 3600 * S
            evs.append(event("question_answered", answer(ts, user=user, concept=concept, correct=i < right,
                                                         rt=1000 + i)))

    answers(0, "c1", "two-of-five", 2, 3)          # 0.4 over 5: struggling
    answers(0, "c1", "zero-of-four", 0, 4)         # too few answers to judge
    answers(0, "c1", "three-of-six", 3, 3)         # 0.5 is not below 0.5
    answers(0, "c2", "four-of-ten", 4, 6)          # struggling on c2 ...
    answers(0, "c1", "four-of-ten", 5, 0)          # ... not on c1
    answers(1, "c1", "two-of-five", 2, 1)          # another hour: 3 answers, not judged
    answers(1, "c|odd:id", "x|y", 0, 5)            # ids holding the entity's separators
    rng = random.Random(11)
    for _ in range(600):
        ts = BASE_MS + rng.randrange(0, 2 * 3600 * S)
        evs.append(event("question_answered", answer(ts, user=f"r{rng.randrange(6)}", concept=f"k{rng.randrange(3)}",
                                                     correct=rng.random() < .5)))
    return evs


def struggling_by_hand(events, size_ms):
    """{(window start, concept): users below half right over at least five answers}; independent of aggregate."""
    tally = defaultdict(lambda: [0, 0])
    for e in events:
        f = e.fields
        t = tally[(e.event_time_ms // size_ms * size_ms, f["concept_id"], f["user_id"])]
        t[0] += 1
        t[1] += f["correct"]
    out = defaultdict(int)
    for (start, concept, _), (n, right) in tally.items():
        out[(start, concept)] += n >= 5 and right / n < 0.5
    return out


@pytest.mark.parametrize("size_s", [60, 300, 3600, 86400])
def test_struggling_users_match_a_hand_count(size_s):
    events = struggling_events()
    merged = defaultdict(dict)
    for i in range(0, len(events), 97):  # uneven batches, merged as the runner would
        for (_, start), (partial, _) in fold_events(events[i:i + 97], (size_s * S,)).items():
            merge_into(merged[start], partial)
    want = struggling_by_hand(events, size_s * S)
    if size_s == 3600:
        assert sum(want.values()) > 3  # the random part struggles too, not only the picked pairs
    for start, partial in merged.items():
        rows = metric_rows(partial, window_seconds=size_s)
        assert {r.family for r in rows} <= {"overall", "concept", "user"}
        for r in (r for r in rows if r.family == "concept"):
            if size_s != 3600:
                assert "struggling_users" not in r.metrics
            else:
                assert r.metrics["struggling_users"] == want[(start, r.entity_id)], (start, r.entity_id)


def test_the_picked_pairs_are_judged_as_defined():
    partial = fold_events(struggling_events()[:38], (3600 * S,))[(3600 * S, BASE_MS)][0]
    rows = {r.entity_id: r.metrics for r in metric_rows(partial) if r.family == "concept"}
    # c1: two-of-five only (zero-of-four too few, three-of-six not below half, four-of-ten right on c1)
    assert rows["c1"]["struggling_users"] == 1 and rows["c2"]["struggling_users"] == 1


def test_internal_rows_never_reach_the_panes_and_survive_a_json_seed(streaming_pipeline):
    """Seeds come from the ledger's jsonb: the concept_user counters must go on
    from them. No pane of any size carries a concept_user row."""
    import json
    t = BASE_MS / 1000
    events = struggling_events()
    first = [e for i, e in enumerate(events) if i % 2 == 0 and e.event_time_ms < BASE_MS + 3600 * S]
    rest = [e for i, e in enumerate(events) if not (i % 2 == 0 and e.event_time_ms < BASE_MS + 3600 * S)]
    seeds = [((size_ms // S, start), json.loads(json.dumps(partial)))
             for (size_ms, start), (partial, _) in fold_events(first, (60 * S, 3600 * S)).items()]
    stream = (TestStream().advance_watermark_to(t)
              .add_elements([rest[i:i + 150] for i in range(0, len(rest), 150)])
              .advance_processing_time(61)
              .advance_watermark_to(t + 3 * 3600)
              .advance_watermark_to_infinity())
    want = struggling_by_hand(events, 3600 * S)
    with streaming_pipeline() as p:
        panes = (p | stream | WindowedMetrics(window_sizes_s=(60, 3600), early_firing_s=5, allowed_lateness_s=600,
                                              seeds=beam.Create(sorted(seeds)))).panes
        families = tuple(panes.values()) | beam.Flatten() | beam.FlatMap(lambda a: [r.family for r in a.rows])
        assert_that(families, only_public_families, label="Families")
        # The last pane of each window is what the sinks keep (on Prism a pane may come after the on-time one).
        rows = panes["1h"] | beam.FlatMap(lambda a: [(a.window_start_ms, r.entity_id, a.pane_index,
                                                      r.metrics["struggling_users"])
                                                     for r in a.rows if r.family == "concept"])
        assert_that(rows, last_values_are({k: float(v) for k, v in want.items()}), label="Struggling")


def last_values_are(want):
    def check(rows):
        last = {}
        for start, entity, _, value in sorted(rows):
            last[(start, entity)] = value
        assert last == want, (last, want)
    return check


def only_public_families(families):
    assert set(families) == {"overall", "concept", "user"}, set(families)


def test_the_latency_trace_counts_every_event_at_each_stage(tmp_path):
    """--latency_trace (transforms.latency_trace): the fold, fired and pane lines of a
    1-minute window add up to the events in it; the 5-minute window is not traced."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    import json
    trace = tmp_path / "trace.jsonl"
    batches = [[event("question_answered", answer(BASE_MS + i * S, user=f"u{i % 3}")) for i in range(5)],
               [event("session_started", {"occurred_at": BASE_MS + 61 * S, "user_id": "u1", "session_id": "s"})],
               [event("question_answered", answer(BASE_MS + 70 * S, user="u2"))]]
    with beam.Pipeline(runner=FnApiRunner()) as p:
        _ = (p | beam.Create(batches)
             | WindowedMetrics(window_sizes_s=(60, 300), early_firing_s=None, trace_path=str(trace)))
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    sums = defaultdict(float)
    for line in lines:
        if line.get("total"):
            sums[(line["s"], line["w"])] = max(sums[(line["s"], line["w"])], line["n"])
        else:
            sums[(line["s"], line["w"])] += line["n"]
    minute = BASE_MS - BASE_MS % (60 * S)
    assert dict(sums) == {(stage, w): n for stage in ("fold", "fired", "pane")
                          for w, n in ((minute, 5.0), (minute + 60 * S, 2.0))}


def test_a_sub_second_early_firing_reaches_the_runner_in_milliseconds():
    """--early_firing 0.5: the 1-minute window's early trigger fires after 500 ms (the
    SDK's own AfterProcessingTime cannot say so in its proto); larger windows keep
    their floor of size / 60 seconds."""
    from apache_beam.runners.pipeline_context import PipelineContext
    metrics = WindowedMetrics(window_sizes_s=(60, 300, 3600), early_firing_s=0.5)
    assert [metrics.early_delay_s(s) for s in (60, 300, 3600)] == [0.5, 5, 60]
    delays = [metrics._trigger(s).to_runner_api(PipelineContext()) for s in (60, 300)]
    millis = [d.after_end_of_window.early_firings.after_processing_time.timestamp_transforms[0].delay.delay_millis
              for d in delays]
    assert millis == [500, 5000]
    assert WindowedMetrics(window_sizes_s=(60,), early_firing_s=5).early_delay_s(60) == 5  # as before


def test_two_event_streams_fold_apart_and_merge_into_one_total():
    """A tuple of streams (one per read chain of pipelines.streaming): each stream's
    lateness and fold errors stay its own, and a window's total counts both streams."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    a = [event("question_answered", answer(BASE_MS + i * S, user="a", correct=True)) for i in range(3)]
    b = [event("question_answered", answer(BASE_MS + 30 * S + i * S, user="b", correct=False)) for i in range(2)]
    broken = dict(answer(BASE_MS + 40 * S, user="c"))
    del broken["response_time_ms"]  # folding it raises KeyError
    bad = event("question_answered", broken)._replace(offset=9)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        first = p | "A" >> beam.Create([a])
        second = p | "B" >> beam.Create([b + [bad]])
        result = (first, second) | WindowedMetrics(window_sizes_s=(60,), early_firing_s=None)
        # 5 answers by 2 users in minute 0, whichever stream brought them.
        assert_that(result.panes["1m"] | beam.Map(overall), equal_to([(60, 0, "ON_TIME", 5.0, 2.0)]))
        assert len(result.fold_errors) == 2 and len(result.too_late) == 2
        assert_that(result.fold_errors[0], equal_to([]), label="NoFoldErrorsInA")
        assert_that(result.fold_errors[1] | beam.Map(lambda d: d.source_offset), equal_to([9]), label="FoldErrorsB")
