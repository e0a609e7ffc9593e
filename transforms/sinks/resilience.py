"""Retries and circuit breakers for the sinks: an outage holds writes back, it never drops them.

Every write of a sink DoFn goes through that DoFn instance's
:class:`CircuitBreaker` (one per sink kind and DoFn instance)::

    CLOSED --(a write failed `retries` times, backing off with jitter)--> OPEN      logged
    OPEN --(every `probe_interval_s`: one bounded probe)--> HALF_OPEN
    HALF_OPEN --(the probe failed)--> OPEN                                            not logged
    HALF_OPEN --(the service answered)--> CLOSED, and the write is tried again      logged

While the breaker is open, the call that opened it does not return and does
not raise: it waits and probes until the service answers, then writes. The
bundle therefore does not finish, its reader's offsets are not committed, and
a reader fused with it takes no new records: that is the back-pressure. The
writes are idempotent (upserts, ``ON CONFLICT DO NOTHING``, overwritten
hashes, keyed Kafka records), so writing a batch again after a connection
broke half-way leaves the same state as writing it once.

Only errors that mean "the service is not there" go through the breaker (the
``transient`` exception types a sink names: connection refused or lost,
timeouts, a server shutting down or starting up). Any other error fails the
bundle as before: retrying a bad statement would never end.

Usage, in a DoFn::

    def setup(self):
        self.breaker = CircuitBreaker("WriteMetricsToRedis", self.config, probe=ping,
                                      transient=(redis.ConnectionError, redis.TimeoutError))
    def process(self, element):
        self.breaker.call(lambda: write(element), reset=reconnect)
        self.counters.report(self.breaker)    # Metrics: retries, breaker_opened

Timings come from a :class:`SinkRetryConfig`, built by the pipeline from
``--sink_retries`` and ``--sink_probe_interval``.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import tenacity
from apache_beam.metrics import Metrics

LOG = logging.getLogger("transforms.sinks.resilience")
T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


@dataclass(frozen=True)
class SinkRetryConfig:
    """How a sink retries and probes. Seconds throughout."""
    retries: int = 3                # attempts of one write, the first included, before the breaker opens
    backoff_base_s: float = 0.2     # wait after the first failure; doubles per attempt, plus up to as much jitter
    backoff_max_s: float = 5.0      # longest wait between two attempts
    probe_interval_s: float = 2.0   # while open: one probe this often
    probe_timeout_s: float = 3.0    # connect/socket timeout of a probe, and the longest a probe may take
    write_timeout_s: float = 10.0   # socket timeout of a write (Redis), a Kafka flush attempt

    def __post_init__(self):
        if self.retries < 1:
            raise ValueError(f"retries must be at least 1, not {self.retries}")
        for name in ("backoff_base_s", "backoff_max_s", "probe_interval_s", "probe_timeout_s", "write_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")


def describe(error: BaseException) -> str:
    """One line naming an exception, for logs."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].rstrip('.')}" if text else type(error).__name__


class CircuitBreaker:
    """Retries a sink's writes, then holds them while the service is away.

    ``probe`` is a cheap request with bounded timeouts (PING, ``SELECT 1``, a
    metadata request); it runs on a helper thread and counts as failed if it
    takes longer than ``probe_timeout_s`` plus a second, so a probe never
    hangs. ``transient`` are the exception types that mean the service is
    away. Not thread-safe: one breaker belongs to one DoFn instance (or to its
    one writer thread), which Beam runs on one thread at a time.
    """

    def __init__(self, sink: str, config: SinkRetryConfig, probe: Callable[[], object],
                 transient: tuple[type[BaseException], ...], sleep: Callable[[float], None] = time.sleep):
        self.sink, self.config, self.probe, self.transient = sink, config, probe, transient
        self._sleep = sleep
        self.state = CLOSED
        self.retries = self.openings = self.closings = self.probes = 0   # over the breaker's life
        self.last_error: Optional[str] = None
        self._opened_at = 0.0
        self._counts_lock = threading.Lock()
        self._reported = (0, 0)
        self._reset: Optional[Callable[[], None]] = None
        self._retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(config.retries),
            wait=tenacity.wait_exponential_jitter(initial=config.backoff_base_s, max=config.backoff_max_s,
                                                  jitter=config.backoff_base_s),
            retry=tenacity.retry_if_exception_type(transient),
            before_sleep=self._before_retry, reraise=True, sleep=sleep)

    def call(self, write: Callable[[], T], reset: Optional[Callable[[], None]] = None) -> T:
        """``write()``, retried; blocks while the service is away; returns its result.

        ``reset`` drops whatever connection ``write`` uses, so the next attempt
        makes a new one; it is called after every failed attempt.
        """
        while True:
            if self.state != CLOSED:
                self._wait_until_closed()
            self._reset = reset
            try:
                return self._retrying(write)
            except self.transient as e:
                self._safe_reset(reset)
                self._open(e)

    # ---- transitions
    def _before_retry(self, state: tenacity.RetryCallState) -> None:
        with self._counts_lock:
            self.retries += 1
        error = state.outcome.exception() if state.outcome else None
        LOG.debug("%s: attempt %d failed (%s); retrying in %.2fs", self.sink, state.attempt_number,
                  describe(error) if error else "?", state.upcoming_sleep)
        self._safe_reset(self._reset)

    def _open(self, error: BaseException) -> None:
        self.state = OPEN
        self._opened_at = time.monotonic()
        self.last_error = describe(error)
        with self._counts_lock:
            self.openings += 1
        LOG.warning("%s: circuit breaker OPEN after %d failed attempt(s): %s; writes are held "
                    "(back-pressure, nothing dropped), probing every %.1fs",
                    self.sink, self.config.retries, self.last_error, self.config.probe_interval_s)

    def _wait_until_closed(self) -> None:
        while True:
            self._sleep(self.config.probe_interval_s)
            self.state = HALF_OPEN
            self.probes += 1
            error = self._probe_once()
            if error is None:
                self.state = CLOSED
                self.closings += 1
                LOG.warning("%s: circuit breaker CLOSED (open -> half-open -> closed): the service answered "
                            "probe %d after %.1fs away; writes resume (last error: %s)",
                            self.sink, self.probes, time.monotonic() - self._opened_at, self.last_error)
                return
            self.state = OPEN
            self.last_error = describe(error)
            LOG.debug("%s: probe failed: %s", self.sink, self.last_error)

    def _probe_once(self) -> Optional[BaseException]:
        """Runs the probe on a daemon thread with a bounded wait; returns its error or None."""
        outcome: list = []

        def run():
            try:
                self.probe()
            except BaseException as e:  # any failure means: not back yet
                outcome.append(e)
            else:
                outcome.append(None)

        t = threading.Thread(target=run, name=f"probe-{self.sink}", daemon=True)
        t.start()
        t.join(self.config.probe_timeout_s + 1.0)
        if not outcome:
            return TimeoutError(f"probe gave no answer within {self.config.probe_timeout_s + 1.0:.1f}s")
        return outcome[0]

    def _safe_reset(self, reset: Optional[Callable[[], None]]) -> None:
        if reset is None:
            return
        try:
            reset()
        except Exception as e:  # a connection that is already broken may fail to close
            LOG.debug("%s: reset: %s", self.sink, describe(e))

    def take_counts(self) -> tuple[int, int]:
        """(retries, openings) since the last call: for Metrics counters, on the bundle's thread."""
        with self._counts_lock:
            now = (self.retries, self.openings)
            before, self._reported = self._reported, now
        return now[0] - before[0], now[1] - before[1]


class BreakerCounters:
    """Beam counters ``<namespace>.sink_retries`` and ``<namespace>.breaker_opened``.

    Beam counts only on a bundle's thread, so a breaker used on another
    thread (the archive writer) is reported from ``finish_bundle``.
    """

    def __init__(self, namespace: str):
        self.retries = Metrics.counter(namespace, "sink_retries")
        self.opened = Metrics.counter(namespace, "breaker_opened")

    def report(self, breaker: Optional[CircuitBreaker]) -> None:
        if breaker is None:
            return
        retries, opened = breaker.take_counts()
        if retries:
            self.retries.inc(retries)
        if opened:
            self.opened.inc(opened)
