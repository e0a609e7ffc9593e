"""The running job's Beam metrics, read live from the runner's job service.

    source = JobMetrics()            # before the job runs: empty snapshots
    source.attach(result)            # the PipelineResult of p.run()
    snap = source.snapshot()         # MetricsSnapshot, at most ~1 s old
    snap.counter("DecodeAndValidate", "valid_events")

Why not ``result.metrics()``: on Beam 2.77 it caches its FIRST GetJobMetrics
answer forever, so a running job's numbers would never move. We call the
job service ourselves, each time, through the result's private
``_job_service`` and ``_job_id`` (acceptable while setup.py pins Beam 2.77.0;
tests/integration/test_service.py fails if they change).

Only COMMITTED values are used: they are the sums over finished bundles,
aggregated by the runner from every SDK worker, in whatever process it runs
(Prism aggregates LOOPBACK, EXTERNAL and PROCESS workers alike), so the
numbers are right across processes. Attempted values on Prism are snapshots
of bundles in progress, not cumulative. Values move when bundles finish (the
reader's are about a second).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from apache_beam.portability.api import beam_job_api_pb2
from apache_beam.runners.portability.portable_runner import PortableMetrics

CACHE_S = 1.0
RPC_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class MetricsSnapshot:
    """Committed metric values at ``taken_at`` (epoch s), summed over steps.

    ``counters``: {(namespace, name): int}. ``gauges``: {(namespace, name):
    (value, timestamp)} with the newest value over steps. ``error``: why
    there is nothing (no job yet, the job service did not answer).
    """
    counters: dict = field(default_factory=dict)
    gauges: dict = field(default_factory=dict)
    taken_at: float = 0.0
    error: Optional[str] = None

    def counter(self, namespace: str, name: str) -> int:
        return self.counters.get((namespace, name), 0)

    def gauge(self, namespace: str, name: str) -> Optional[int]:
        got = self.gauges.get((namespace, name))
        return got[0] if got else None

    def named(self, namespace: str, prefix: str) -> dict:
        """{suffix: value} of the counters of ``namespace`` whose name starts with ``prefix``."""
        return {n[len(prefix):]: v for (ns, n), v in self.counters.items() if ns == namespace and n.startswith(prefix)}


def snapshot_of(query: dict, taken_at: float) -> MetricsSnapshot:
    """In: ``PortableMetrics(...).query()``. Out: its committed counters and gauges, user metrics only."""
    counters: dict = {}
    for r in query.get("counters", ()):
        key = (r.key.metric.namespace, r.key.metric.name)
        if key[0].startswith("beam") or r.committed is None:
            continue  # the runner's own bookkeeping; a metric no bundle committed yet
        counters[key] = counters.get(key, 0) + int(r.committed)
    gauges: dict = {}
    for r in query.get("gauges", ()):
        key = (r.key.metric.namespace, r.key.metric.name)
        if r.committed is None or key[0].startswith("beam"):
            continue
        got = (int(r.committed.value), _seconds(r.committed.timestamp))
        if key not in gauges or (got[1], got[0]) > (gauges[key][1], gauges[key][0]):
            gauges[key] = got
    return MetricsSnapshot(counters, gauges, taken_at)


def _seconds(ts) -> float:
    """A gauge's timestamp (a Beam Timestamp, or seconds) as float seconds; 0 when absent."""
    if ts is None:
        return 0.0
    micros = getattr(ts, "micros", None)
    return micros / 1e6 if micros is not None else float(ts)


class JobMetrics:
    """Snapshots of one job's metrics, cached for ``CACHE_S``; thread-safe, never raises."""

    def __init__(self, cache_s: float = CACHE_S):
        self.cache_s = cache_s
        self._result = None
        self._lock = threading.Lock()
        self._last = MetricsSnapshot(error="the job has not started yet")
        self._last_at = 0.0

    def attach(self, result) -> None:
        """``result``: the portable PipelineResult of the running job."""
        self._result = result

    def snapshot(self) -> MetricsSnapshot:
        with self._lock:
            if self._result is None or time.monotonic() - self._last_at < self.cache_s:
                return self._last
            try:
                self._last = snapshot_of(self._query(), time.time())
            except Exception as e:  # the job service went away (the job ended): keep the last numbers
                self._last = MetricsSnapshot(self._last.counters, self._last.gauges, self._last.taken_at,
                                             error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            self._last_at = time.monotonic()
            return self._last

    def state(self) -> str:
        """The job's state as the job service says (RUNNING, DONE, ...), bounded; raises when it cannot say."""
        if self._result is None:
            return "STARTING"
        r = self._result
        answer = r._job_service.GetState(beam_job_api_pb2.GetJobStateRequest(job_id=r._job_id),
                                         timeout=RPC_TIMEOUT_S)
        return beam_job_api_pb2.JobState.Enum.Name(answer.state)

    def _query(self) -> dict:
        # Private attributes of Beam 2.77.0's portable PipelineResult (see the module docstring).
        r = self._result
        response = r._job_service.GetJobMetrics(beam_job_api_pb2.GetJobMetricsRequest(job_id=r._job_id),
                                                timeout=RPC_TIMEOUT_S)
        return PortableMetrics(response).query()
