"""Histograms as Beam counters: one counter per bucket that was observed, plus a sum.

Beam has no histogram metric that crosses the portable boundary (a
distribution keeps only count, sum, min and max), so a duration is counted
into the counter of the one bucket it falls in::

    <namespace>.<prefix>_bucket_0.005, ..., <prefix>_bucket_+Inf   events in each bucket
    <namespace>.<prefix>_sum_ms                                      total duration, milliseconds

``<prefix>_bucket_<b>`` counts the durations above the bound before ``b``
and at or under ``b`` (not cumulative). A Beam counter cell exists, and is
reported to the runner at every progress request and bundle end, only once it
was incremented; so a histogram costs a cell per bucket where durations
actually fall (typically two or three) instead of all thirteen, which a
cumulative counter per bound (Prometheus' ``le``) would touch at the first
short duration. The service (service/prometheus.py) adds them up into
Prometheus' cumulative ``le`` buckets with :func:`cumulative`.

Counters add up across workers, bundles and processes in the runner, so the
service reassembles the histogram from the job's committed counters. The
names are data shared by both sides: change them here only.
"""
from __future__ import annotations

import bisect
import math
from typing import Callable

from apache_beam.metrics import Metrics

# Upper bounds, seconds (Prometheus' defaults plus 30 s, for a sink that retried).
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)
SUM_SUFFIX = "_sum_ms"
BUCKET_MARK = "_bucket_"


def bucket_label(bound_s: float) -> str:
    """0.005 -> '0.005', inf -> '+Inf' (Prometheus' spelling of ``le``)."""
    return "+Inf" if math.isinf(bound_s) else repr(float(bound_s))


def bucket_name(prefix: str, bound_s: float) -> str:
    """('processing_seconds', 0.25) -> 'processing_seconds_bucket_0.25': the counter of that bucket."""
    return f"{prefix}{BUCKET_MARK}{bucket_label(bound_s)}"


def cumulative(count_in: Callable[[str], int], prefix: str) -> list[tuple[str, int]]:
    """Prometheus' cumulative ``[(le, count)]`` for every bound, from the per-bucket counters;
    ``count_in(name)`` is a counter's value, 0 for one that does not exist (a bucket nothing fell in)."""
    out, total = [], 0
    for bound in BUCKETS_S:
        total += count_in(bucket_name(prefix, bound)) or 0
        out.append((bucket_label(bound), total))
    return out


class LatencyHistogram:
    """Counts durations into per-bucket counters ``<prefix>_bucket_<bound>`` of ``namespace``.

    Create it in a DoFn's ``__init__`` (Beam metrics are declared once, used on
    the bundle's thread); ``observe`` on the bundle's thread only.
    """

    def __init__(self, namespace: str, prefix: str):
        # Declared here, but a cell (reported with every bundle) exists only once incremented.
        self.buckets = [Metrics.counter(namespace, bucket_name(prefix, b)) for b in BUCKETS_S]
        self.sum_ms = Metrics.counter(namespace, f"{prefix}{SUM_SUFFIX}")

    def observe(self, seconds: float, times: int = 1) -> None:
        """``times`` events that each took ``seconds``."""
        if times <= 0:
            return
        # The first bound at or above ``seconds`` (the last one is +Inf).
        self.buckets[min(bisect.bisect_left(BUCKETS_S, seconds), len(BUCKETS_S) - 1)].inc(times)
        self.sum_ms.inc(int(round(seconds * 1000 * times)))
