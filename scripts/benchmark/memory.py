"""Memory: the open-ended streaming job (no --until_idle, so window state expires once a
window's allowed lateness has passed) over a simulated day of event time, its whole
process tree's resident set sampled every second against its watermark.

The day is produced into the isolated topics first, at the throughput runs' rate
(events per hour of event time) with event times ending now, after the job's
consumer group was committed at the topics' current ends (so the earlier runs'
records are not read). The job reads the backlog in offset order, its watermark
follows the records' times through the day, and the 1-minute, 5-minute and 1-hour
windows close and expire behind it; the 1-day windows (one per UTC day the span
touches) only close after their day ends, so their state stays for the whole run,
bounded by the number of entities (users, concepts, content, concept x user), not
by the number of events. Once everything is read the job is stopped with SIGTERM.

psutil gives the tree and the resident sets (RSS; PSS and USS from smaps_rollup,
which also counts shared pages once across the tree)."""
from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from typing import Optional

import psutil
from confluent_kafka import Consumer, TopicPartition

from scripts.benchmark.common import log, tail
from scripts.benchmark.isolation import Bench
from scripts.benchmark.jobs import Job
from scripts.benchmark.memory_stats import HOUR_MS, MB, at_hours, first_steady_hour, growth_per_hour
from scripts.produce import TrafficConfig, generate, produce

ALLOWED_LATENESS_S = 3600  # the job's default, passed explicitly so the fit's first hour follows it
SAMPLE_S = 1.0
SETTLE_S = 15.0            # samples after everything was read, before SIGTERM
PROGRESS_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit_ends(brokers: str, group: str, topics: list[str]) -> int:
    """Commits ``group`` at every partition's current end; returns the records skipped."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False})
    try:
        meta = c.list_topics(timeout=10).topics
        tps, skipped = [], 0
        for t in topics:
            for p in sorted(meta[t].partitions):
                low, high = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                tps.append(TopicPartition(t, p, high))
                skipped += high - low
        c.commit(offsets=tps, asynchronous=False)
        return skipped
    finally:
        c.close()


def _label(proc: psutil.Process, root: int) -> str:
    try:
        name = proc.name()
    except psutil.Error:
        name = "?"
    return "launcher" if proc.pid == root else f"{name}[{proc.pid}]"


def sample_tree(root: int) -> dict:
    """RSS, PSS and USS in bytes of ``root`` and every descendant: {label: {pid, rss, pss, uss}}."""
    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for proc in procs:
        try:
            full = proc.memory_full_info()
            out[_label(proc, root)] = {"pid": proc.pid, "rss": full.rss, "pss": getattr(full, "pss", None),
                                       "uss": full.uss}
        except psutil.Error:
            continue
    return out


def _status(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/events/status", timeout=2) as r:
            return json.loads(r.read())
    except Exception:  # not up yet, or busy: the next sample tries again
        return {}


def _total(procs: dict, kind: str) -> Optional[int]:
    vals = [p[kind] for p in procs.values() if p.get(kind) is not None]
    return sum(vals) if vals else None


def _mb(b: Optional[float]) -> Optional[float]:
    return None if b is None else round(b / MB, 1)


class _Samples:
    """Every second: the tree's memory and the job's watermark, lag and valid events."""

    def __init__(self, job: Job, port: int):
        self.job, self.port = job, port
        self.rows: list[dict] = []

    def take(self) -> dict:
        procs = sample_tree(self.job.proc.pid)
        st = _status(self.port)
        row = {"t": round(time.time() - self.job.started, 1), "procs": procs,
               "rss": _total(procs, "rss"), "pss": _total(procs, "pss"), "uss": _total(procs, "uss"),
               "watermark_ms": (st.get("watermark") or {}).get("ms"), "lag": st.get("lag_total"),
               "valid": (st.get("events") or {}).get("valid")}
        self.rows.append(row)
        return row


def _produce_day(bench: Bench, hours: float, per_hour: int, res: dict) -> tuple[int, int, int]:
    """Produces the day; returns (events, first event time ms, last event time ms)."""
    n = int(round(hours * per_hour))
    end_ms = int(time.time() * 1000)
    start_ms = end_ms - int(hours * HOUR_MS)
    cfg = TrafficConfig(events=n, span_seconds=hours * 3600, end_time_ms=end_ms, malformed_fraction=0.0,
                        json_fraction=0.1)
    log(f"memory: producing {n:,} events over {hours:g} h of event time ending now")
    records = (r._replace(topic=bench.stack.topic_for(r.topic)) for r in generate(cfg))
    res["produce"] = produce(records, bench.brokers, progress_every=max(100_000, n // 10))
    log(f"memory: produced in {res['produce']['seconds']}s")
    return n, start_ms, end_ms


def _watch(s: _Samples, n: int, start_ms: int, hours: float, timeout: float, res: dict) -> None:
    """Samples until every event was read (valid >= n, no lag), SETTLE_S more, or the timeout."""
    began, last_log, read_all = time.monotonic(), 0.0, None
    while time.monotonic() - began < timeout:
        if s.job.poll() is not None:
            res["error"] = f"the job exited with {s.job.proc.returncode} before it was stopped"
            return
        row = s.take()
        now = time.monotonic()
        if read_all is None and (row["valid"] or 0) >= n and row["lag"] == 0:
            read_all = now
            res["read_all_after_s"] = row["t"]
            log(f"memory: all {n:,} events read after {row['t']:.0f}s; sampling {SETTLE_S:.0f}s more")
        if read_all is not None and now - read_all >= SETTLE_S:
            return
        if now - last_log >= PROGRESS_S:
            last_log = now
            wm = row["watermark_ms"]
            at = f"hour {(wm - start_ms) / HOUR_MS:.1f} of {hours:g}" if wm else "no watermark yet"
            log(f"memory: {row['t']:.0f}s: event time at {at}, {row['valid'] or 0:,} events read, "
                f"RSS {_mb(row['rss'])} MB (PSS {_mb(row['pss'])} MB) in {len(row['procs'])} processes")
        time.sleep(max(0.0, SAMPLE_S - (time.monotonic() - now)))
    res["error"] = f"not all events read within {timeout:.0f}s; stopped"


def _stop(job: Job, res: dict) -> None:
    t0 = time.time()
    if job.poll() is None:
        os.kill(job.proc.pid, signal.SIGTERM)
        if job.wait(60) is None:
            res["stop"] = "did not exit within 60s of SIGTERM; killed"
            job.kill()
        else:
            res["stop_seconds"] = round(time.time() - t0, 2)
    res["exit_code"] = job.poll()
    left = job.reap_group()
    if left:
        res["leftover_processes_after_exit"] = left
    if res["exit_code"] != 0:
        res["stderr_tail"] = tail(job.stderr(), 30)


def summarize(rows: list[dict], start_ms: int, hours: float, lateness_s: float) -> dict:
    """The figures of the samples: peak and final totals and per process (MB), RSS after
    each hour of event time, and the growth per hour over the steady hours."""
    rows = [r for r in rows if r["rss"] is not None]
    if not rows:
        return {"error": "no memory sample"}
    peak = max(rows, key=lambda r: r["rss"])
    final = rows[-1]
    per_proc_peak: dict[str, int] = {}
    for r in rows:
        for label, p in r["procs"].items():
            per_proc_peak[label] = max(per_proc_peak.get(label, 0), p["rss"])
    whole = int(hours)
    marks = [(r["watermark_ms"], r["rss"]) for r in rows]
    rss_h = [_mb(v) for v in at_hours(marks, start_ms, whole)]
    pss_h = [_mb(v) for v in at_hours([(r["watermark_ms"], r["pss"]) for r in rows], start_ms, whole)]
    # How far the reader had read past the watermark: partitions hold different shares of the
    # events (6/3/3 partitions per topic, 200 user keys) and are read at similar record rates,
    # so the watermark (the slowest partition) trails what was read.
    read_h = at_hours([(r["watermark_ms"], r["valid"]) for r in rows], start_ms, whole)
    first = first_steady_hour(lateness_s)
    growth, fitted = growth_per_hour(rss_h, first)
    pss_growth, _ = growth_per_hour(pss_h, first)
    return {
        "samples": len(rows),
        "peak_rss_mb": _mb(peak["rss"]), "peak_at_s": peak["t"],
        "final_rss_mb": _mb(final["rss"]), "final_pss_mb": _mb(final["pss"]), "final_uss_mb": _mb(final["uss"]),
        "final_per_process": {label: {"pid": p["pid"], "rss_mb": _mb(p["rss"]), "pss_mb": _mb(p["pss"]),
                                      "uss_mb": _mb(p["uss"])} for label, p in final["procs"].items()},
        "peak_rss_per_process_mb": {label: _mb(v) for label, v in per_proc_peak.items()},
        "rss_after_hour_mb": rss_h, "pss_after_hour_mb": pss_h, "events_read_after_hour": read_h,
        "growth_mb_per_event_hour": None if growth is None else round(growth, 2),
        "pss_growth_mb_per_event_hour": None if pss_growth is None else round(pss_growth, 2),
        "growth_fitted_hours": [fitted[0], fitted[-1]] if growth is not None else None,
    }


def run_memory(bench: Bench, hours: float, per_hour: int, timeout: Optional[float] = None) -> dict:
    """In: the stack, hours of event time, events per hour, the bound on reading them (default:
    600 s + 2 ms per event). Out: the produce counts, the run's figures (``summarize``), the
    per-second timeline (t, watermark, RSS/PSS total), the exit code."""
    res: dict = {"hours": hours, "events_per_event_hour": per_hour, "allowed_lateness_s": ALLOWED_LATENESS_S,
                 "benchmark_process_rss_mb": _mb(psutil.Process().memory_info().rss)}
    group = bench.group("memory")
    res["group_id"] = group
    res["skipped_earlier_records"] = _commit_ends(bench.brokers, group, bench.event_topics())
    n, start_ms, end_ms = _produce_day(bench, hours, per_hour, res)
    res.update(events=n, first_event_ms=start_ms, last_event_ms=end_ms)
    port = _free_port()
    # The job outlives Beam's --job_server_timeout (300 s): pipelines.options.no_stream_deadline.
    job = Job(bench.pipeline_args(group, http_port=port, allowed_lateness=ALLOWED_LATENESS_S), "memory")
    log(f"memory: pid {job.proc.pid}: streaming job, open-ended (no --until_idle), all sinks, "
        f"--allowed_lateness {ALLOWED_LATENESS_S}, status on :{port}")
    s = _Samples(job, port)
    began = time.time()
    try:
        _watch(s, n, start_ms, hours, timeout or 600 + n * 0.002, res)
    finally:
        _stop(job, res)
    res["job_seconds"] = round(time.time() - began, 1)
    res.update(summarize(s.rows, start_ms, hours, ALLOWED_LATENESS_S))
    res["timeline_columns"] = ["t_s", "watermark_ms", "events_read", "rss_mb", "pss_mb", "launcher_rss_mb",
                               "prism_rss_mb"]
    res["timeline"] = [[r["t"], r["watermark_ms"], r["valid"], _mb(r["rss"]), _mb(r["pss"]),
                        _mb((r["procs"].get("launcher") or {}).get("rss")),
                        _mb(sum(p["rss"] for k, p in r["procs"].items() if k.startswith("prism")) or None)]
                       for r in s.rows]
    log(f"memory: exit {res['exit_code']}; RSS peak {res.get('peak_rss_mb')} MB, final {res.get('final_rss_mb')} MB, "
        f"growth {res.get('growth_mb_per_event_hour')} MB per hour of event time")
    return res
