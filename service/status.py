"""GET /events/status: what the job has done, for a person or a monitor.

    {"uptime_s", "job": {"state"}, "events_per_second" (last minute),
     "events": {"valid", "dead_letters": {code: n}, "dead_letters_published": {code: n}},
     "watermark": {"ms", "iso"}, "last_pane": {window: {rows, window_start, written_at, sink}},
     "partitions": [{"topic", "partition", "committed", "end", "lag"}], "lag_total",
     "options": {...secrets redacted...}}

Events per second come from a sampler thread that reads the processed
counters every ``SAMPLE_S`` and keeps the last minute of samples.
"""
from __future__ import annotations

import collections
import datetime
import re
import threading
import time
from typing import Any, Callable, Optional

from service.job_metrics import JobMetrics, MetricsSnapshot
from service.lag import ConsumerLag
from service.prometheus import DECODE, DLQ_SINK, latest_panes

SAMPLE_S = 2.0
RATE_WINDOW_S = 60.0
SECRET_NAME = re.compile(r"password|secret|token|credential|api_key", re.I)


def redact_options(options: dict, redact: Callable[[str], str]) -> dict:
    """Options safe to show: a value whose name says secret is ``***``; any text through ``redact``
    (which hides a password in a URL or a key=value DSN)."""
    out = {}
    for name, value in sorted(options.items()):
        if value is not None and SECRET_NAME.search(name):
            out[name] = "***"
        elif isinstance(value, str):
            out[name] = redact(value)
        elif isinstance(value, (list, tuple)):
            out[name] = [redact(v) if isinstance(v, str) else v for v in value]
        else:
            out[name] = value
    return out


def processed(snap: MetricsSnapshot) -> int:
    """Records the job finished deciding: valid events plus dead letters."""
    return snap.counter(DECODE, "valid_events") + snap.counter(DECODE, "dead_letters")


def rate(samples: "collections.deque[tuple[float, int]]") -> float:
    """Per second between the oldest and the newest (time, total) sample; 0 with fewer than two."""
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return 0.0
    (t0, n0), (t1, n1) = samples[0], samples[-1]
    return max(0, n1 - n0) / (t1 - t0)


class RateSampler(threading.Thread):
    """Samples ``processed`` every ``SAMPLE_S`` for a minute's events/s; a daemon, stopped by ``stop``."""

    def __init__(self, job: JobMetrics):
        super().__init__(name="status-sampler", daemon=True)
        self.job = job
        self.samples: collections.deque = collections.deque()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def run(self):
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        snap = self.job.snapshot()
        if snap.error and not snap.counters:
            return
        now = time.monotonic()
        with self._lock:
            self.samples.append((now, processed(snap)))
            while self.samples and now - self.samples[0][0] > RATE_WINDOW_S:
                self.samples.popleft()

    def per_second(self) -> float:
        with self._lock:
            return rate(self.samples)

    def stop(self) -> None:
        self._stop.set()


def _iso(ms: Optional[int]) -> Optional[str]:
    if ms is None:
        return None
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="milliseconds")


def status(job: JobMetrics, lag: ConsumerLag, sampler: RateSampler, started_at: float, options: dict) -> dict:
    """The /events/status body (see the module docstring)."""
    snap = job.snapshot()
    reading = lag.read()
    try:
        state = job.state()
    except Exception as e:  # the job service is gone (the job ended)
        state = f"unknown ({type(e).__name__})"
    watermark = snap.gauge("ReadEvents", "watermark_ms")
    body: dict[str, Any] = {
        "uptime_s": round(time.time() - started_at, 1),
        "job": {"state": state, "metrics_error": snap.error,
                "metrics_at": _iso(int(snap.taken_at * 1000)) if snap.taken_at else None},
        "events_per_second": round(sampler.per_second(), 1),
        "events": {"valid": snap.counter(DECODE, "valid_events"),
                   "by_type": dict(sorted(snap.named(DECODE, "valid.").items())),
                   "dead_letters": dict(sorted(snap.named(DECODE, "dead_letters_").items())),
                   "dead_letters_published": dict(sorted(snap.named(DLQ_SINK, "published.").items()))},
        "watermark": {"ms": watermark, "iso": _iso(watermark)},
        "last_pane": {label: dict(pane, window_start=_iso(pane["window_start_ms"]),
                                  written_at=_iso(pane["written_at_ms"]))
                      for label, pane in latest_panes(snap).items()},
        "partitions": [{"topic": p.topic, "partition": p.partition, "committed": p.committed,
                        "end": p.end, "lag": p.lag} for p in reading.partitions],
        "lag_total": sum(p.lag for p in reading.partitions) if not reading.error else None,
        "lag_error": reading.error,
        "options": options,
    }
    return body
