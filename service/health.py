"""GET /health: is each part of the job well, answered within a few seconds whatever is down.

Parts: ``kafka`` (the brokers answer a metadata request), ``redis`` (PING,
when Redis is one of the sinks), ``postgres`` (``SELECT 1``: the archive, the
window ledger, window_metrics), ``job`` (the runner says RUNNING) and
``sinks`` (each sink's circuit-breaker openings and retries so far, from the
Beam counters ``<Sink>.breaker_opened`` and ``.sink_retries``).

A sink's breaker holds the bundle it is writing while it is open, and Beam
counters reach the runner only when a bundle finishes, so the job cannot
report a breaker that is open *now*: the service probes each sink's service
itself, the way the breaker's probe does. The breaker counts tell whether
outages happened; they do not fail the check.

Checks run concurrently, each bounded by ``CHECK_TIMEOUT_S``, and the answer
is cached for ``CACHE_S`` so a busy monitor does not multiply connections.
"""
from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable, Optional

import psycopg2
import redis
from confluent_kafka.admin import AdminClient

from service.job_metrics import JobMetrics

CHECK_TIMEOUT_S = 2.0
CACHE_S = 1.0
SINKS = ("WriteMetricsToRedis", "WriteMetricsToPostgres", "PublishAggregatesFn", "PublishDeadLettersFn",
         "ArchiveRawEvents")


def kafka_check(brokers: str) -> Callable[[], str]:
    admin = AdminClient({"bootstrap.servers": brokers,
                         "socket.connection.setup.timeout.ms": int(CHECK_TIMEOUT_S * 1000)})

    def check() -> str:
        meta = admin.list_topics(timeout=CHECK_TIMEOUT_S)
        return f"{len(meta.brokers)} broker(s) answered"
    return check


def redis_check(url: str) -> Callable[[], str]:
    def check() -> str:
        client = redis.Redis.from_url(url, socket_connect_timeout=CHECK_TIMEOUT_S, socket_timeout=CHECK_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
        return "PING answered"
    return check


def postgres_check(dsn: str) -> Callable[[], str]:
    def check() -> str:
        conn = psycopg2.connect(dsn, connect_timeout=max(1, int(CHECK_TIMEOUT_S)))
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (int(CHECK_TIMEOUT_S * 1000),))
                cur.execute("SELECT 1")
        finally:
            conn.close()
        return "SELECT 1 answered"
    return check


class Health:
    """The /health answer: ``report()`` -> (HTTP status, JSON body). Never raises, never hangs."""

    def __init__(self, checks: dict, job: JobMetrics):
        self.checks = dict(checks, job=self._job_check)
        self.job = job
        self.draining = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(self.checks) + 1,
                                                           thread_name_prefix="health")
        self._lock = threading.Lock()
        self._cached: Optional[tuple] = None
        self._cached_at = -1e9

    def _job_check(self) -> str:
        state = self.job.state()
        if state not in ("RUNNING", "STARTING"):
            raise RuntimeError(f"the job is {state}")
        return state

    def report(self) -> tuple[int, dict]:
        if self.draining.is_set():
            return 503, {"status": "draining"}
        with self._lock:
            if time.monotonic() - self._cached_at >= CACHE_S:
                self._cached, self._cached_at = self._run(), time.monotonic()
            return self._cached

    def _run(self) -> tuple[int, dict]:
        futures = {name: self._pool.submit(check) for name, check in self.checks.items()}
        deadline = time.monotonic() + CHECK_TIMEOUT_S + 0.5
        parts = {name: _outcome(f, deadline) for name, f in futures.items()}
        parts["sinks"] = self._sinks()
        failing = sorted(name for name, part in parts.items() if part.get("status") == "down")
        body = {"status": "down" if failing else "ok", "parts": parts}
        if failing:
            body["failing"] = failing
            body["error"] = "; ".join(f"{name}: {parts[name]['error']}" for name in failing)
        return (503 if failing else 200), body

    def _sinks(self) -> dict:
        snap = self.job.snapshot()
        return {"status": "ok", "breakers": {
            sink: {"breaker_opened": snap.counter(sink, "breaker_opened"), "retries": snap.counter(sink, "sink_retries")}
            for sink in SINKS}}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _outcome(future: concurrent.futures.Future, deadline: float) -> dict:
    """A check's future as {"status": "ok", "detail"} or {"status": "down", "error"}, by ``deadline``."""
    try:
        return {"status": "ok", "detail": future.result(timeout=max(0.0, deadline - time.monotonic()))}
    except concurrent.futures.TimeoutError:
        return {"status": "down", "error": f"no answer within {CHECK_TIMEOUT_S:.1f}s"}
    except Exception as e:
        text = str(e).strip().splitlines()
        return {"status": "down", "error": f"{type(e).__name__}: {text[0] if text else ''}"}
