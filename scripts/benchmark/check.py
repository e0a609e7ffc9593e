"""The job's overall rows, window by window, in Postgres and in Redis, against the baseline's fold."""
from __future__ import annotations

import time

import redis

from scripts.benchmark.common import WINDOW_SIZES_S, overall_key, pg_query
from transforms.aggregate import window_label

OVERALL_FIELDS = ("events", "answers", "correct", "content_views", "ratings", "rating_sum")


def _differs(want: tuple, got) -> bool:
    return got is None or any(abs(a - b) > 1e-6 for a, b in zip(want, got))


def _postgres_rows(dsn: str) -> tuple[dict, dict]:
    """({(size_s, start_ms): overall values}, {(size_s, start_ms): 'timing#index'}) from window_metrics."""
    rows = pg_query(dsn, "SELECT window_seconds, (extract(epoch FROM window_start) * 1000)::bigint, metrics, "
                         "pane_timing, pane_index FROM window_metrics WHERE family = 'overall' AND entity_id = 'all'")
    got, panes = {}, {}
    for size, start, m, timing, index in rows:
        got[(size, start)] = tuple(m.get(k, 0) for k in OVERALL_FIELDS)
        panes[(size, start)] = f"{timing}#{index}"
    return got, panes


def _redis_rows(redis_url: str, keys: list) -> dict:
    """{(size_s, start_ms): (overall values or None, 'timing#index')} of the sink's hashes."""
    pipe = redis.Redis.from_url(redis_url, decode_responses=True).pipeline(transaction=False)
    for size, start in keys:
        pipe.hgetall(overall_key(size, start))
    return {k: (tuple(float(h.get(f, 0)) for f in OVERALL_FIELDS) if h else None,
                f"{h.get('pane_timing')}#{h.get('pane_index')}")
            for k, h in zip(keys, pipe.execute())}


def _by_size(windows: list) -> dict:
    """{window label: how many of ``windows`` have that size}, every size present."""
    out = {window_label(size): 0 for size in WINDOW_SIZES_S}
    for size, _ in windows:
        out[window_label(size)] = out.get(window_label(size), 0) + 1
    return out


def compare_with_baseline(dsn: str, redis_url: str, base: dict) -> dict:
    """In: the stack's DSN and Redis URL, ``baseline_overall()``. Out: windows compared,
    mismatched (in Postgres, by size), only in the pipeline, mismatched in Redis (by size),
    and a description of each mismatched window."""
    got, panes = _postgres_rows(dsn)
    mismatched = [k for k in base if _differs(base[k], got.get(k))]
    extra = [k for k in got if k not in base]
    keys = sorted(base)
    in_redis = _redis_rows(redis_url, keys)
    redis_mismatched = [k for k in keys if _differs(base[k], in_redis[k][0])]

    def describe(k) -> str:
        return (f"window {k[0]}s @ {k[1]} ({time.strftime('%H:%M:%S', time.localtime(k[1] / 1000))}): "
                f"baseline {base[k]}, postgres {got.get(k)} [{panes.get(k)}], redis {in_redis[k][0]} "
                f"[{in_redis[k][1]}]")

    return {"fields": list(OVERALL_FIELDS), "windows_baseline": len(base), "windows_pipeline": len(got),
            "mismatched": len(mismatched), "only_in_pipeline": len(extra),
            "examples": [describe(k) for k in mismatched[:5]],
            "mismatched_by_size": _by_size(mismatched), "redis_mismatched": len(redis_mismatched),
            "redis_mismatched_by_size": _by_size(redis_mismatched),
            "mismatched_windows": [describe(k) for k in sorted(set(mismatched) | set(redis_mismatched))]}
