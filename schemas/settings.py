"""Deployment defaults: where the services are, and the environment variables that override them.

Every command reads its defaults through :func:`setting`, so a variable of the
deployment seed (KAFKA_BROKERS, REDIS_URL, POSTGRES_DSN, ANALYTICS_GROUP_ID,
BATCH_SIZE, WINDOW_SIZE_MS) means the same to the jobs, the recovery command,
the producer, the summary and the benchmark; unset or empty, the local stack
of scripts/stack.sh is used. Also the window sizes and the one rule for times
given on a command line. Importable without Beam.
"""
from __future__ import annotations

import os
import re
from datetime import datetime, timezone

LOCAL_STACK: dict[str, str] = {
    "KAFKA_BROKERS": "127.0.0.1:9092",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "POSTGRES_DSN": "postgresql://analytics:analytics@127.0.0.1:5432/analytics",
    "ANALYTICS_GROUP_ID": "learning-analytics",
    "BATCH_SIZE": "2000",
}

# The window sizes every job computes, in seconds (WINDOW_SIZE_MS replaces the finest).
WINDOW_SIZES_S: tuple[int, ...] = (60, 300, 3600, 86400)


def setting(name: str) -> str:
    """The environment variable ``name`` if set and not empty, else the local stack's value."""
    return os.environ.get(name) or LOCAL_STACK[name]


def redact(url: str) -> str:
    """``url`` (or a key=value DSN) without its password, for messages and logs."""
    url = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", url)


def parse_instant(text: str) -> datetime:
    """An ISO-8601 time with a zone ('2026-11-28T10:00:00Z', '...+01:00') as an aware datetime.

    A time without a zone is refused (ValueError): a job reading the wrong
    hours because a machine's zone differed is worse than a clear error.
    """
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 time, e.g. 2026-11-28T10:00:00Z") from None
    if dt.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone; add 'Z' for UTC or an offset such as +01:00")
    return dt.astimezone(timezone.utc)
