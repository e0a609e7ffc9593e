"""What the latency run reads and computes: the poller of the 1-minute overall counts in
Redis, and each event's latency from its send to the first poll that covers it."""
from __future__ import annotations

import math
import statistics
import threading
import time
from typing import Optional, Union

import redis

from scripts.benchmark.common import overall_key


class RedisPoller(threading.Thread):
    """Every ``interval`` s: the 1-minute overall event count of every window with sent events."""

    def __init__(self, url: str, interval: float = 0.05):
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.interval = interval
        self.windows: set[int] = set()
        self.polls: dict[int, list[tuple[float, float]]] = {}   # window -> [(time, count)] on change
        self.latest: dict[int, float] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors = 0
        self.n_polls = 0

    def run(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            with self.lock:
                windows = sorted(self.windows)
            if windows:
                try:
                    self._poll(windows)
                except redis.RedisError:
                    self.errors += 1
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def _poll(self, windows: list[int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for w in windows:
            pipe.hget(overall_key(60, w), "events")
        values = pipe.execute()
        now = time.time()
        self.n_polls += 1
        for w, v in zip(windows, values):
            count = float(v) if v is not None else 0.0
            if count != self.latest.get(w):
                self.latest[w] = count
                self.polls.setdefault(w, []).append((now, count))


def percentile(sorted_values: list[float], p: float) -> Optional[float]:
    """The nearest-rank ``p``-th percentile of ``sorted_values`` (None if empty)."""
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))  # nearest rank
    return sorted_values[k]


def rounded(v: Optional[float]) -> Union[float, str, None]:
    """``v`` to 3 places, "never" for infinity."""
    if v is not None and math.isinf(v):
        return "never"
    return None if v is None else round(v, 3)


def latencies(sent: dict, polls: dict, warm_read: dict, deadline: float) -> tuple[list[float], int]:
    """In: {window: [send times]}, the poller's {window: [(time, count)]}, {window: warm-up
    events read}, the last time that counts. Out: (sorted latencies, events never covered)."""
    out: list[float] = []
    invisible = 0
    for w, sends in sent.items():
        seen = polls.get(w, [])
        offset = warm_read.get(w, 0)
        j = 0
        for k, s in enumerate(sends, start=1):
            while j < len(seen) and seen[j][1] < offset + k:
                j += 1
            if j < len(seen) and seen[j][0] <= deadline:
                out.append(seen[j][0] - s)
            else:
                invisible += 1
    out.sort()
    return out, invisible


def summary(lat: list[float], invisible: int) -> dict:
    """Percentiles of the visible events, and p50/p99 over all counting the others as never."""
    everything = lat + [math.inf] * invisible
    return {"p50_all_s": rounded(percentile(everything, 50)), "p99_all_s": rounded(percentile(everything, 99)),
            "visible": len(lat), "p50_s": rounded(percentile(lat, 50)), "p90_s": rounded(percentile(lat, 90)),
            "p99_s": rounded(percentile(lat, 99)), "max_s": rounded(lat[-1] if lat else None),
            "min_s": rounded(lat[0] if lat else None),
            "mean_s": rounded(statistics.fmean(lat) if lat else None)}


# The stages of the latency trace, in the order an event passes them, after its send:
# the broker's ack, then transforms.latency_trace's stages, then the Redis poller.
STAGES = ("acked", "poll", "fold", "handed", "fired", "pane", "visible")
STAGE_MEANING = {
    "acked": "send -> Kafka ack (producer linger + broker append)",
    "poll": "ack -> read by ReadPartitionFn (consumer fetch + checkpoint resume delay + reader bundle scheduling)",
    "fold": "poll -> FoldIntoWindows emitted (rest of the reader's fused bundle: decode, archive hand-off, "
            "ledger write)",
    "handed": "fold -> the reader's bundle finalized (other steps' finish_bundle: profiles, alerts, dead "
              "letters; Prism takes the output, then asks to finalize)",
    "fired": "handed -> 1-minute trigger fired a pane (AfterProcessingTime early delay + Prism scheduling "
             "the CombinePerKey stage)",
    "pane": "fired -> AccumulatePanes emitted the row (Prism scheduling the stateful stage)",
    "visible": "pane -> seen in Redis by the poller (sink write + poll interval 0.05 s)",
}


def trace_series(lines: list[dict]) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """transforms.latency_trace lines -> {stage: {window: [(time, events so far)]}}, in time order."""
    by_stage: dict = {}
    for line in sorted(lines, key=lambda l: l["t"]):
        series = by_stage.setdefault(line["s"], {}).setdefault(int(line["w"]), [])
        before = series[-1][1] if series else 0.0
        count = max(before, line["n"]) if line.get("total") else before + line["n"]
        series.append((line["t"], count))
    return by_stage


def covered_at(sends: list[float], seen: list[tuple[float, float]], offset: float) -> list[Optional[float]]:
    """For the k-th of ``sends``: the first time ``seen`` counts offset + k (None if never)."""
    out: list[Optional[float]] = []
    j = 0
    for k in range(1, len(sends) + 1):
        while j < len(seen) and seen[j][1] < offset + k:
            j += 1
        out.append(seen[j][0] if j < len(seen) else None)
    return out


def stage_breakdown(sent: dict, series: dict, offsets: dict) -> dict:
    """In: {window: [send times]}, {stage: {window: [(time, count)]}} for STAGES,
    {stage: {window: events counted there before the measured ones}}. Out: per
    stage, percentiles of the time since the send (``cumulative``) and of the
    time since the previous stage (``step``), over the events every stage saw,
    and the step's share of the summed median steps."""
    cumulative: dict = {s: [] for s in STAGES}
    steps: dict = {s: [] for s in STAGES}
    for w, sends in sent.items():
        at = {s: covered_at(sends, series.get(s, {}).get(w, []), offsets.get(s, {}).get(w, 0)) for s in STAGES}
        for k, sent_at in enumerate(sends):
            times = [at[s][k] for s in STAGES]
            if any(t is None for t in times):
                continue
            before = sent_at
            for s, t in zip(STAGES, times):
                cumulative[s].append(t - sent_at)
                # A stage can be seen a little before the previous one (threads, the
                # poller's interval): a step is never negative.
                steps[s].append(max(0.0, t - before))
                before = max(before, t)
    out: dict = {}
    medians = {}
    for s in STAGES:
        c, d = sorted(cumulative[s]), sorted(steps[s])
        medians[s] = percentile(d, 50) or 0.0
        out[s] = {"meaning": STAGE_MEANING[s], "events": len(d),
                  "step_p50_s": rounded(percentile(d, 50)), "step_p99_s": rounded(percentile(d, 99)),
                  "step_mean_s": rounded(statistics.fmean(d) if d else None),
                  "since_send_p50_s": rounded(percentile(c, 50)), "since_send_p99_s": rounded(percentile(c, 99))}
    total = sum(medians.values())
    for s in STAGES:
        out[s]["share_of_p50"] = round(medians[s] / total, 3) if total else None
    return out
