"""WindowedMetricsToSinks: event batches in, every pane of every window written to the sinks.

The second half of both jobs, streaming and replay:

    windowed = events | WindowedMetricsToSinks(
        WindowedMetrics((60, 300, 3600, 86400), early_firing_s=5),
        AggregateSinks(redis_url=..., postgres_dsn=..., kafka_brokers=...))
    windowed.too_late, windowed.fold_errors   # dead letters, for the caller to publish

Each window size's panes go to the sinks on their own (``Write<label>``), not
through a Flatten: the sinks fuse into that window's stage and panes are never
serialized again on their way out (see WindowedMetrics).
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam
from apache_beam.pvalue import PCollection

from transforms.aggregate import WindowAggregate, WindowedMetrics, WindowedResult
from transforms.sinks import AggregateSinks, WriteAggregates


class WindowedMetricsToSinks(beam.PTransform):
    """Batches of Event -> WindowedResult, with every pane written to ``sinks``.

    ``metrics``: the WindowedMetrics to apply (its window sizes, panes and
    ledger). ``within``: (start ms, end ms) to write only the windows wholly
    inside it, for a job over a time range (a window the range cuts holds
    only part of its events, and would overwrite the whole one's row).
    """

    def __init__(self, metrics: WindowedMetrics, sinks: AggregateSinks,
                 within: Optional[tuple[int, int]] = None):
        super().__init__()
        self.metrics, self.sinks, self.within = metrics, sinks, within

    def expand(self, event_batches: PCollection) -> WindowedResult:
        windowed = event_batches | "WindowedMetrics" >> self.metrics
        if not self.sinks.any():
            return windowed
        for label, panes in windowed.panes.items():
            if self.within is not None:
                panes = panes | f"WholeWindows{label}" >> beam.Filter(_inside, *self.within)
            panes | f"Write{label}" >> WriteAggregates(self.sinks)
        return windowed


def _inside(aggregate: WindowAggregate, start_ms: int, end_ms: int) -> bool:
    return start_ms <= aggregate.window_start_ms and aggregate.window_end_ms <= end_ms
