"""Pure helpers of the memory run: the resident set at each hour of event time and
its growth per hour (a least-squares slope)."""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

HOUR_MS = 3_600_000
MB = 1024 * 1024


def at_hours(samples: Sequence[tuple[Optional[int], float]], start_ms: int, hours: int) -> list[Optional[float]]:
    """In: (event-time progress in ms or None, value) samples in the order taken, the first
    event time, the number of hours. Out: for each k in 1..hours, the value of the first
    sample whose progress reached ``start_ms + k`` hours (None if none did): the value
    "after k hours of event time"."""
    out: list[Optional[float]] = [None] * hours
    k = 0
    for progress, value in samples:
        if progress is None:
            continue
        while k < hours and progress >= start_ms + (k + 1) * HOUR_MS:
            out[k] = value
            k += 1
        if k == hours:
            break
    return out


def slope(points: Sequence[tuple[float, float]]) -> Optional[float]:
    """The least-squares slope of y over x through ``points``; None for fewer than two
    distinct x."""
    try:
        return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope
    except statistics.StatisticsError:  # fewer than two points, or every x the same
        return None


def first_steady_hour(allowed_lateness_s: float) -> int:
    """The first whole hour of event time after which a window of an hour or less has
    expired at every hour mark: the first hour's 1-hour window ends at hour 1 and its
    state is cleared when the watermark passes its end plus the allowed lateness; one
    hour more so that the fit starts from a state that has already turned over."""
    return 1 + math.ceil(allowed_lateness_s / 3600) + 1


def growth_per_hour(per_hour: Sequence[Optional[float]], from_hour: int) -> tuple[Optional[float], list[int]]:
    """In: values after hour 1, 2, ... (``at_hours``), the first hour to fit. Out: the
    slope per hour over hours ``from_hour``..last with a value, and those hours."""
    hours = [h for h in range(from_hour, len(per_hour) + 1) if per_hour[h - 1] is not None]
    return slope([(h, per_hour[h - 1]) for h in hours]), hours  # type: ignore[misc]
