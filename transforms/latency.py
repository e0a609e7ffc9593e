"""Histograms as Beam counters: one cumulative counter per bucket, plus a sum.

Beam has no histogram metric that crosses the portable boundary (a
distribution keeps only count, sum, min and max), so a duration is counted
into one counter per upper bound, the Prometheus way (``le`` cumulative)::

    <namespace>.<prefix>_le_0.005, ..., <prefix>_le_+Inf   events at or under each bound
    <namespace>.<prefix>_sum_ms                              total duration, milliseconds

Counters add up across workers, bundles and processes in the runner, so the
service (service/prometheus.py) reassembles the histogram from the job's
committed counters with :func:`parse_bucket_name`. The names are data shared
by both sides: change them here only.
"""
from __future__ import annotations

import math
from typing import Optional

from apache_beam.metrics import Metrics

# Upper bounds, seconds (Prometheus' defaults plus 30 s, for a sink that retried).
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)
SUM_SUFFIX = "_sum_ms"
LE_MARK = "_le_"


def bucket_label(bound_s: float) -> str:
    """0.005 -> '0.005', inf -> '+Inf' (Prometheus' spelling of ``le``)."""
    return "+Inf" if math.isinf(bound_s) else repr(float(bound_s))


def parse_bucket_name(name: str) -> Optional[tuple[str, str]]:
    """'processing_seconds_le_0.25' -> ('processing_seconds', '0.25'); not a bucket -> None."""
    prefix, mark, le = name.rpartition(LE_MARK)
    if not mark or not prefix:
        return None
    return prefix, le


class LatencyHistogram:
    """Counts durations into cumulative bucket counters ``<prefix>_le_<bound>`` of ``namespace``.

    Create it in a DoFn's ``__init__`` (Beam metrics are declared once, used on
    the bundle's thread); ``observe`` on the bundle's thread only.
    """

    def __init__(self, namespace: str, prefix: str):
        self.buckets = [(b, Metrics.counter(namespace, f"{prefix}{LE_MARK}{bucket_label(b)}")) for b in BUCKETS_S]
        self.sum_ms = Metrics.counter(namespace, f"{prefix}{SUM_SUFFIX}")

    def observe(self, seconds: float, times: int = 1) -> None:
        """``times`` events that each took ``seconds``."""
        if times <= 0:
            return
        for bound, counter in self.buckets:
            if seconds <= bound:
                counter.inc(times)
        self.sum_ms.inc(int(round(seconds * 1000 * times)))
