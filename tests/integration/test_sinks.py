"""The Redis pane script against a real Redis: big panes, ``latest``, a flushed script cache."""
from __future__ import annotations

import redis

from transforms.aggregate import MetricRow, WindowAggregate
from transforms.sinks import redis_sink
from transforms.sinks.redis_sink import WriteMetricsToRedisFn

START = 1_700_000_000_000 - 1_700_000_000_000 % 60_000


def pane(start: int, users: int, index: int = 0, timing: str = "EARLY") -> WindowAggregate:
    rows = [MetricRow("user", f"u{i}", {"events": float(i), "accuracy": i / 3}) for i in range(users)]
    return WindowAggregate(60, start, start + 60_000, timing, index, rows)


def test_a_pane_bigger_than_one_call_is_written_whole_and_latest_only_moves_forward(fresh_stack, monkeypatch):
    monkeypatch.setattr(redis_sink, "ROWS_PER_CALL", 7)   # 25 rows: four calls
    r = redis.Redis.from_url(fresh_stack.redis_url, decode_responses=True)
    fn = WriteMetricsToRedisFn(fresh_stack.redis_url)
    fn.setup()
    try:
        fn.process(pane(START + 60_000, 25, 3, "ON_TIME"))
        assert r.get("analytics:1m:latest") == str(START + 60_000)
        fn.process(pane(START, 2, 5, "LATE"))   # an older window: latest stays
        assert r.get("analytics:1m:latest") == str(START + 60_000)
        r.script_flush()                        # as after a Redis restart: the script is loaded again
        fn.process(pane(START + 120_000, 1))
        assert r.get("analytics:1m:latest") == str(START + 120_000)
    finally:
        fn.teardown()
    for i in range(25):
        key = f"analytics:1m:{START + 60_000}:user:u{i}"
        assert r.hgetall(key) == {"events": repr(float(i)), "accuracy": repr(i / 3), "pane_timing": "ON_TIME",
                                  "pane_index": "3", "window_end": str(START + 120_000)}
        assert 0 < r.ttl(key) <= 2 * 3600
    assert r.hgetall(f"analytics:1m:{START}:user:u1")["pane_timing"] == "LATE"
    assert r.hgetall(f"analytics:1m:{START + 120_000}:user:u0")["pane_index"] == "0"
