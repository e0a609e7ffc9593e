"""The latency benchmark's arithmetic (scripts/benchmark/latency_stats.py): a
stage's cumulative counts say when the k-th event of a window passed it."""
import math

from scripts.benchmark.latency_stats import STAGES, covered_at, latencies, stage_breakdown, trace_series

W = 60_000


def test_trace_lines_become_cumulative_counts_in_time_order():
    lines = [{"s": "fold", "t": 2.0, "w": W, "n": 3}, {"s": "fold", "t": 1.0, "w": W, "n": 2},
             {"s": "pane", "t": 3.0, "w": W, "n": 5, "total": True},
             {"s": "pane", "t": 2.5, "w": W, "n": 2, "total": True},
             {"s": "pane", "t": 3.5, "w": W, "n": 4, "total": True}]  # a total never goes back
    assert trace_series(lines) == {"fold": {W: [(1.0, 2.0), (2.0, 5.0)]},
                                   "pane": {W: [(2.5, 2.0), (3.0, 5.0), (3.5, 5.0)]}}


def test_the_kth_event_is_covered_once_the_count_passes_the_offset_plus_k():
    seen = [(10.0, 3.0), (11.0, 5.0)]
    # 2 warm-up events were counted first: the 1st to 3rd sends need counts 3 to 5 -> 10, 11, 11.
    assert covered_at([1.0, 2.0, 3.0, 4.0], seen, offset=2) == [10.0, 11.0, 11.0, None]
    lat, invisible = latencies({W: [1.0, 2.0, 3.0, 4.0]}, {W: seen}, {W: 2}, deadline=100)
    assert (lat, invisible) == ([8.0, 9.0, 9.0], 1)  # 10-1, 11-2, 11-3


def test_each_stage_gets_the_time_since_the_previous_one():
    sent = {W: [0.0, 1.0]}
    at = {"acked": [0.1, 1.1], "poll": [0.5, 1.3], "fold": [0.7, 1.4], "handed": [0.9, 1.6],
          "fired": [2.0, 2.0], "pane": [1.95, 2.1], "visible": [2.2, 2.2]}
    series = {s: {W: [(t, k + 1.0) for k, t in enumerate(ts)]} for s, ts in at.items()}
    out = stage_breakdown(sent, series, {})
    assert list(out) == list(STAGES)
    # nearest-rank p50 of two values is the lower one; p99 the higher
    assert out["poll"]["step_p50_s"] == 0.2 and out["poll"]["step_p99_s"] == 0.4
    assert out["fired"]["step_p50_s"] == 0.4 and out["fired"]["step_p99_s"] == 1.1
    # the first event's pane is traced before its firing (another thread): no negative step
    assert out["pane"]["step_p50_s"] == 0.0 and out["pane"]["step_p99_s"] == 0.1
    assert out["visible"]["since_send_p50_s"] == 1.2 and out["visible"]["since_send_p99_s"] == 2.2
    assert math.isclose(sum(s["share_of_p50"] for s in out.values()), 1.0, abs_tol=0.01)


def test_an_event_a_stage_never_saw_is_left_out_of_the_breakdown():
    series = {s: {W: [(1.0, 1.0)]} for s in STAGES}
    out = stage_breakdown({W: [0.0, 0.5]}, series, {})
    assert out["visible"]["events"] == 1
