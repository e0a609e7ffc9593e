"""What a pane sink reports after each write: how long it took and which pane it was.

Beam metrics of the sink's namespace (read live by the service, service/job_metrics.py):

    write_seconds_bucket_<bound>, write_seconds_sum_ms   write latency histogram (transforms/latency.py)
    pane_rows.<label>            gauge: rows (entities) in the pane written last, per window size
    pane_window_start_ms.<label> gauge: that pane's window start, epoch ms
    pane_written_at_ms.<label>   gauge: when it was written, epoch ms

Gauges are set after the write succeeded, so a sink held by its breaker
shows its last pane growing old.
"""
from __future__ import annotations

import time

from apache_beam.metrics import Metrics

from transforms.aggregate import WindowAggregate, window_label
from transforms.latency import LatencyHistogram


class PaneWritten:
    """Reports a pane sink's writes; create in the DoFn's ``__init__``, call on the bundle's thread."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.latency = LatencyHistogram(namespace, "write_seconds")
        self._gauges: dict = {}

    def observe(self, agg: WindowAggregate, seconds: float) -> None:
        """In: the pane just written and how long its write took."""
        self.latency.observe(seconds)
        label = window_label(agg.window_seconds)
        gauges = self._gauges.get(label)
        if gauges is None:
            gauges = self._gauges[label] = tuple(
                Metrics.gauge(self.namespace, f"{name}.{label}")
                for name in ("pane_rows", "pane_window_start_ms", "pane_written_at_ms"))
        rows, start, written = gauges
        rows.set(len(agg.rows))
        start.set(agg.window_start_ms)
        written.set(int(time.time() * 1000))
