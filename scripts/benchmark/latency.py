"""Latency: the streaming job on live traffic at ``rate`` events/s whose event time is the
send time; each event's latency is the time from its send to the first Redis poll at
which its 1-minute window's overall count covers it."""
from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

import redis

from scripts.benchmark.common import log, overall_key, pg_query, tail
from scripts.benchmark.isolation import Bench
from scripts.benchmark.jobs import Job, OffsetWatcher
from scripts.benchmark.latency_stats import (RedisPoller, latencies, rounded, stage_breakdown, summary,
                                             trace_series)
from scripts.benchmark.live_traffic import LiveSender, event_templates

MINUTE_MS = 60_000


@dataclass
class _Live:
    """One latency run: its job, traffic, poller and what was sent when."""
    bench: Bench
    res: dict
    job: Job
    sender: LiveSender
    poller: RedisPoller
    watcher: OffsetWatcher
    redis: redis.Redis
    warm: dict = field(default_factory=dict)   # window -> warm-up events sent into it
    sent: dict = field(default_factory=dict)   # window -> [send time] of the measured events
    first_send: Optional[float] = None
    last_send: float = 0.0
    trace_path: Optional[str] = None  # the job's --latency_trace file


def _warmups_read(dsn: str, first_measured_send: float) -> dict[int, int]:
    """Warm-up events the job read (archived, older than the first measured
    send), by 1-minute window start in ms."""
    rows = pg_query(dsn, "SELECT (extract(epoch FROM occurred_at) * 1000)::bigint / 60000 * 60000, count(*) "
                         f"FROM raw_events WHERE occurred_at < to_timestamp({math.floor(first_measured_send * 1000) / 1000:.3f}) "
                         "GROUP BY 1")
    return {int(w): n for w, n in rows}


def _wait_ready(live: _Live, warmups: list, ready_timeout: float, warmup_rate: float,
                ready_sleep: float) -> None:
    """Ready = the job has written a pane to Redis. Warm-up events (event time = now, like
    the measured ones) trickle in at warmup_rate/s until a 1-minute overall count appears;
    they stay counted in their windows, so the k-th measured event of window W is covered
    once W's count reaches warm[W] + k. They are sent continuously because the job starts
    at the end of each partition as it is when the job builds its graph, which may be
    after a given warm-up was sent. With ``ready_sleep``: no warm-up, a sleep."""
    res, job = live.res, live.job
    began, ready_at, i = time.monotonic(), None, 0
    if ready_sleep > 0:
        time.sleep(ready_sleep)
        began -= ready_timeout
        res["ready"] = f"slept {ready_sleep:.0f}s instead of warming up"
    while time.monotonic() - began < ready_timeout:
        if job.poll() is not None:
            raise RuntimeError(f"streaming job exited with {job.proc.returncode} before it was ready:\n"
                               f"{tail(job.stderr(), 40)}")
        now_ms = int(time.time() * 1000)
        w = now_ms - now_ms % MINUTE_MS
        live.sender.send(warmups[i % len(warmups)], now_ms)
        live.warm[w] = live.warm.get(w, 0) + 1
        i += 1
        if i % 5 == 0 and _pane_shown(live):
            ready_at = time.time()
            break
        time.sleep(1.0 / warmup_rate)
    live.sender.flush(5)
    _note_ready(live, i, ready_at, ready_timeout, ready_sleep)


def _pane_shown(live: _Live) -> bool:
    live.sender.flush(2)
    return any(live.redis.hget(overall_key(60, w), "events") is not None for w in live.warm)


def _note_ready(live: _Live, warmups: int, ready_at: Optional[float], ready_timeout: float,
                ready_sleep: float) -> None:
    res, job, watcher = live.res, live.job, live.watcher
    res["warmup_events"] = warmups
    res["first_commit_after_s"] = rounded(watcher.first_commit - job.started) if watcher.first_commit else None
    if ready_at is None and ready_sleep > 0:
        log(f"latency: {res['ready']}")
    elif ready_at is None:
        res["ready"] = f"no pane in Redis within {ready_timeout:.0f}s of warm-up traffic; measuring anyway"
        log(f"latency: {res['ready']} (offsets committed: {watcher.committed})")
    else:
        res["ready_after_s"] = round(ready_at - job.started, 2)
        log(f"latency: job ready (a pane in Redis) after {res['ready_after_s']}s")


def _send_measured(live: _Live, templates: list, rate: float) -> None:
    """Sends ``templates`` at ``rate``/s, noting each send time under its 1-minute window."""
    n = len(templates)
    log(f"latency: sending {n:,} events at {rate:.0f}/s")
    live.poller.start()
    live.sender.track_acks = True
    began = time.perf_counter()
    live.first_send = time.time()
    for k, t in enumerate(templates):
        ahead = k / rate - (time.perf_counter() - began)
        if ahead > 0.001:
            time.sleep(ahead)
        now = time.time()
        now_ms = int(now * 1000)
        window = now_ms - now_ms % MINUTE_MS
        if window not in live.sent:
            live.sent[window] = []
            with live.poller.lock:
                live.poller.windows.add(window)
        live.sent[window].append(now)
        live.sender.send(t, now_ms)
    send_seconds = time.perf_counter() - began
    live.last_send = time.time()
    live.sender.flush(30)
    live.res.update(send_seconds=round(send_seconds, 2), achieved_rate=round(n / send_seconds, 1),
                    delivery_failures=len(live.sender.failures))


def _await_counts(live: _Live, drain_s: float) -> dict[int, int]:
    """Waits up to ``drain_s`` after the last send for every window's count to cover its
    events; returns the warm-up events the job read, by window. Only the warm-ups sent
    after the job looked up the partitions' ends are read; the archive says which (they
    are older than the first measured send)."""
    log(f"latency: sent in {live.res['send_seconds']:.1f}s; waiting up to {drain_s:.0f}s for the counts")
    dsn, latest = live.bench.dsn, live.poller.latest
    while time.time() < live.last_send + drain_s and live.job.poll() is None:
        warm_read = _warmups_read(dsn, live.first_send)
        if all(latest.get(w, 0) >= len(s) + warm_read.get(w, 0) for w, s in live.sent.items()):
            break
        time.sleep(0.5)
    time.sleep(0.1)
    live.poller.stop.set()
    live.poller.join(5)
    return _warmups_read(dsn, live.first_send)


def _measure(live: _Live, drain_s: float) -> None:
    """The latency figures, per window and overall, into live.res."""
    warm_read = _await_counts(live, drain_s)
    res, poller = live.res, live.poller
    res["warmup_events_read"] = sum(warm_read.values())
    lat, invisible = latencies(live.sent, poller.polls, warm_read, live.last_send + drain_s)
    res.update(summary(lat, invisible))
    res.update(
        windows={str(w): {"warmup": live.warm.get(w, 0), "warmup_read": warm_read.get(w, 0), "sent": len(s),
                          "final_count": poller.latest.get(w, 0.0), "count_changes": len(poller.polls.get(w, []))}
                 for w, s in sorted(live.sent.items())},
        never_visible_within_s=drain_s, never_visible=invisible,
        redis_polls=poller.n_polls, redis_errors=poller.errors)
    _stages(live, warm_read)


def _stages(live: _Live, warm_read: dict) -> None:
    """Where the time went: each measured event's passage through the job's stages
    (its --latency_trace), between the broker's ack and the Redis poller."""
    res = live.res
    try:
        with open(live.trace_path, encoding="utf-8") as f:
            lines = [json.loads(l) for l in f if l.strip()]
    except OSError as e:
        res["stages_error"] = f"no latency trace: {e}"
        return
    series = trace_series(lines)
    acks: dict = {}
    for t, ts_ms in sorted(live.sender.acks):
        w = ts_ms - ts_ms % MINUTE_MS
        acks.setdefault(w, []).append((t, len(acks.get(w, [])) + 1.0))
    series["acked"] = acks
    series["visible"] = live.poller.polls
    offsets = {s: warm_read for s in ("poll", "fold", "handed", "fired", "pane", "visible")}
    res["stages"] = stage_breakdown(live.sent, series, offsets)
    busiest = max(live.sent, key=lambda w: len(live.sent[w])) if live.sent else None
    fired = [t for t, _ in series.get("fired", {}).get(busiest, [])]
    gaps = sorted(b - a for a, b in zip(fired, fired[1:]))
    res["panes_fired_1m"] = len(fired)  # of the window with the most measured events
    res["pane_interval_p50_s"] = rounded(gaps[len(gaps) // 2]) if gaps else None
    polls = [l for l in lines if l["s"] == "poll" and live.first_send <= l["t"] <= live.last_send]
    res["reader_polls_per_s"] = round(len(polls) / max(1e-9, live.last_send - live.first_send), 1)


def _diagnostics(live: _Live) -> None:
    """Did the read path keep up even where the aggregates did not? Archived measured
    events, committed offsets, the 1-minute overall rows left in Redis."""
    res, r = live.res, live.redis
    try:
        if live.first_send is not None:
            (archived,), = pg_query(live.bench.dsn, "SELECT count(*) FROM raw_events WHERE occurred_at >= "
                                                    f"to_timestamp({math.floor(live.first_send * 1000) / 1000:.3f})")
            res["measured_events_archived"] = archived
        res["committed_offsets"] = live.watcher.committed
        res["panes_in_redis_1m"] = sorted(
            (k.decode().split(":")[2], float(r.hget(k, "events") or 0), (r.hget(k, "pane_timing") or b"").decode())
            for k in r.scan_iter(overall_key(60, "*")))
    except Exception as e:
        res["diagnostics_error"] = f"{type(e).__name__}: {e}"


def _stop(live: _Live, stop_timeout: float) -> None:
    """SIGTERM to the job (killed after ``stop_timeout``); its exit and stderr tail into live.res."""
    res, job = live.res, live.job
    if job.poll() is None:
        log("latency: SIGTERM to the streaming job")
        t0 = time.time()
        os.kill(job.proc.pid, signal.SIGTERM)
        if job.wait(stop_timeout) is None:
            res["stop"] = f"did not exit within {stop_timeout:.0f}s of SIGTERM; killed"
            job.kill()
        else:
            res["stop_seconds"] = round(time.time() - t0, 2)
    else:
        res["stop"] = f"the job had already exited with {job.proc.returncode}"
    res["exit_code"] = job.poll()
    left = job.reap_group()
    if left:
        res["leftover_processes_after_exit"] = left
    res["stderr_tail"] = tail("\n".join(l for l in job.stderr().splitlines() if "Key coder" not in l), 12)


def _start(bench: Bench, res: dict, early_firing_s: float) -> _Live:
    r = redis.Redis.from_url(bench.redis_url)
    r.flushdb()
    group = bench.group("latency")
    res["group_id"] = group
    sender = LiveSender(bench.brokers, bench.topics)
    fd, trace = tempfile.mkstemp(prefix="latency-trace-", suffix=".jsonl")
    os.close(fd)
    job = Job(bench.pipeline_args(group, start_from="latest", early_firing=early_firing_s, latency_trace=trace),
              "latency")
    log(f"latency: pid {job.proc.pid}: streaming job, --start_from latest --early_firing {early_firing_s:g}, "
        "all sinks")
    watcher = OffsetWatcher(bench.brokers, group, bench.event_topics(), 1)
    watcher.start()
    return _Live(bench, res, job, sender, RedisPoller(bench.redis_url), watcher, r, trace_path=trace)


def run_latency(bench: Bench, seconds: float, rate: float, ready_timeout: float = 90.0,
                drain_s: float = 30.0, stop_timeout: float = 60.0, warmup_rate: float = 20.0,
                ready_sleep: float = 0.0, early_firing_s: float = 1.0) -> dict:
    """In: the stack, how long and how fast to send, the readiness/drain/stop bounds.
    Out: the run's figures (percentiles, per-window counts, readiness, stop), or an error."""
    n = max(1, int(seconds * rate))
    res: dict = {"rate": rate, "seconds": seconds, "events": n, "early_firing_s": early_firing_s}
    templates = event_templates(n + int(ready_timeout * warmup_rate) + 10, seed=4242)
    live = _start(bench, res, early_firing_s)
    try:
        _wait_ready(live, templates[n:], ready_timeout, warmup_rate, ready_sleep)
        _send_measured(live, templates[:n], rate)
        _measure(live, drain_s)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        live.poller.stop.set()
        try:
            live.sender.flush(10)
        except Exception:
            pass
        _diagnostics(live)
        live.watcher.stop.set()
        _stop(live, stop_timeout)
        try:
            os.unlink(live.trace_path)
        except OSError:
            pass
    log(f"latency: job exit code {res['exit_code']}")
    return res
