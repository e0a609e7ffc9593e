"""Small pieces every measurement uses: constants, logging, Postgres queries,
retries while a shared service is away, and the sink's Redis keys."""
from __future__ import annotations

import inspect
import os
import sys
import time
from typing import Callable, TypeVar

import psycopg2
import redis

from transforms.aggregate import OVERALL, OVERALL_ENTITY
from transforms.sinks.redis_sink import WriteMetricsToRedisFn, metric_key

WINDOW_SIZES_S = (60, 300, 3600, 86400)
IDLE_S = 3  # --until_idle of the throughput runs
# The prefix the streaming job's Redis sink writes under (it uses the sink's default).
REDIS_PREFIX: str = inspect.signature(WriteMetricsToRedisFn.__init__).parameters["prefix"].default

T = TypeVar("T")


def log(msg: str) -> None:
    """Writes ``msg`` to stderr with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail(text: str, lines: int = 25) -> str:
    """The last ``lines`` lines of ``text``."""
    return "\n".join(text.strip().splitlines()[-lines:])


def overall_key(window_seconds: int, window_start_ms: int | str) -> str:
    """The Redis key of the overall row of a window, as the sink writes it
    (``window_start_ms`` may be ``"*"`` for a SCAN pattern)."""
    return metric_key(REDIS_PREFIX, window_seconds, window_start_ms, OVERALL, OVERALL_ENTITY)  # type: ignore[arg-type]


def pg_query(dsn: str, sql: str) -> list:
    """Runs ``sql`` on a fresh connection to ``dsn``; returns every row."""
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def with_services(fn: Callable[[], T], what: str, wait_s: float = 180.0) -> T:
    """``fn()``, retried while Postgres or Redis refuse connections (other work on a shared
    machine may stop and start them), for at most ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return fn()
        except (psycopg2.OperationalError, redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() > deadline:
                raise
            log(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}; retrying in 3s")
            time.sleep(3)


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded to 2 places."""
    return [round(x, 2) for x in os.getloadavg()]
