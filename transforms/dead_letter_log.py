"""Dead letters in the logs: each one at DEBUG, a summary by code at INFO at most every 10 s.

    DEAD_LETTER_LOG.each(dl)               # DEBUG: code, coordinates, correlation id
    DEAD_LETTER_LOG.add({"OUT_OF_RANGE": 3}) # counted; a summary line when the interval passed
    DEAD_LETTER_LOG.flush()                # the rest now (the job's end, a worker's teardown)

One log per process: every producer step of the process (one per stream,
several threads) counts into it, so the summary says what the process
published, not one step's share. The cost on the path of a dead letter is an
``isEnabledFor`` check; per bundle, a dict update and a clock read under a lock.
Valid events never pass here.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable, Mapping, Optional

from transforms.records import DeadLetter

LOG = logging.getLogger("transforms.dead_letters")
SUMMARY_EVERY_S = 10.0


class RateLimitedCounts:
    """Counts by key; hands them out (and starts again) at most once per ``every_s``.

    Pure: no logging, the clock is a parameter; ``DeadLetterLog`` logs what it hands out.
    """

    def __init__(self, every_s: float = SUMMARY_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every_s, self.clock = every_s, clock
        self._counts: Counter = Counter()
        self._lock = threading.Lock()
        self._last = clock()

    def add(self, counts: Mapping[str, int]) -> Optional[Counter]:
        """In: counts to add. Out: every count since the last hand-out, when ``every_s`` passed
        since then (and resets them), else None."""
        with self._lock:
            self._counts.update(counts)
            if self.clock() - self._last < self.every_s:
                return None
            return self._take()

    def take(self) -> Optional[Counter]:
        """Every count since the last hand-out, whatever the time (None when there are none)."""
        with self._lock:
            return self._take()

    def _take(self) -> Optional[Counter]:
        counts, self._counts = self._counts, Counter()
        self._last = self.clock()
        return +counts or None  # '+' drops zero counts


class DeadLetterLog:
    """The log lines about published dead letters (see the module docstring)."""

    def __init__(self, counts: Optional[RateLimitedCounts] = None, logger: logging.Logger = LOG):
        self.counts = counts or RateLimitedCounts()
        self.log = logger

    def each(self, dl: DeadLetter) -> None:
        """DEBUG, one line per dead letter: its code, source coordinates and correlation id."""
        if not self.log.isEnabledFor(logging.DEBUG):
            return
        extra = {"event": "dead_letter", "code": dl.error_code, "source_topic": dl.source_topic,
                 "source_partition": dl.source_partition, "source_offset": dl.source_offset}
        if dl.correlation_id:  # the line is about this record: its id, not the process's
            extra["correlation_id"] = dl.correlation_id
        self.log.debug("dead letter %s at %s:%d:%d (correlation id %s)", dl.error_code, dl.source_topic,
                       dl.source_partition, dl.source_offset, dl.correlation_id or "-", extra=extra)

    def add(self, counts: Mapping[str, int]) -> None:
        """A bundle's published dead letters by code; logs the summary when it is due."""
        if counts:
            self._summary(self.counts.add(counts))

    def flush(self) -> None:
        """Logs what was counted since the last summary, if anything."""
        self._summary(self.counts.take())

    def _summary(self, counts: Optional[Counter]) -> None:
        if counts:
            self.log.info("dead letters published: %d (%s)", sum(counts.values()),
                          ", ".join(f"{code} {n}" for code, n in counts.most_common()),
                          extra={"event": "dead_letter_summary", "counts": dict(counts),
                                 "total": sum(counts.values())})


# The process's one log; producers count into it, the launcher flushes it when the job ends.
DEAD_LETTER_LOG = DeadLetterLog()
