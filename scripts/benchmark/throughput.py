"""One streaming drain: ``pipelines.streaming --until_idle 3 --start_from earliest`` on
the produced events, with every sink on or with sinks off, and its timings."""
from __future__ import annotations

import time
from typing import Optional

from scripts.benchmark.common import IDLE_S, log, pg_query, tail
from scripts.benchmark.isolation import Bench
from scripts.benchmark.jobs import Job, OffsetWatcher, outage_signs, prism_log_lines, summary_counters


def _sinks(sinks_on: bool) -> dict:
    if sinks_on:
        return {"sinks": "redis,postgres,kafka", "archive": "true"}
    return {"sinks": "none", "archive": "false"}


def _run(bench: Bench, n: int, label: str, group: str, timeout: float, extra: dict) -> tuple:
    """Starts the job and waits for it (stopping it after ``timeout``): (job, watcher, exit code, hung)."""
    watcher = OffsetWatcher(bench.brokers, group, bench.event_topics(), n)
    job = Job(bench.pipeline_args(group, **extra), label)
    watcher.start()
    log(f"{label}: pid {job.proc.pid}: {' '.join(job.cmd[1:4])} ... "
        f"--until_idle {IDLE_S} --start_from earliest --early_firing 5 --sinks {extra['sinks']} "
        f"--archive {extra['archive']}")
    rc = job.wait(timeout)
    hung = rc is None
    if hung:
        log(f"{label}: still running after {timeout:.0f}s: stopping it")
        job.kill()
        rc = job.poll()
    watcher.stop.set()
    watcher.join(10)
    return job, watcher, rc, hung


def _job_figures(job: Job, watcher: OffsetWatcher, res: dict) -> None:
    """Adds the job's log lines and the offset watcher's times to ``res``."""
    if res["exit_code"] != 0 or res["hung"]:
        res["stderr_tail"] = tail(job.stderr(), 40)
    res.update(prism_log_lines(job.stderr()))
    res["outage_signs"] = outage_signs(job.stderr())
    if watcher.first_commit:
        res["first_commit_after_s"] = round(watcher.first_commit - job.started, 2)
    if watcher.all_committed:
        res["all_committed_after_s"] = round(watcher.all_committed - job.started, 2)
    res["committed_offsets"] = watcher.committed
    if watcher.error:
        res["offset_watch_error"] = watcher.error


def _per_s(n: int, span: float) -> Optional[float]:
    return round(n / span, 1) if span > 0 else None


def _sinks_on_figures(dsn: str, job: Job, n: int, res: dict) -> None:
    """Adds what the archive and window_metrics say: archived, rows, events per window
    size, and the end-to-end and ingest rates."""
    (first_read, last_ingest, archived), = pg_query(
        dsn, "SELECT extract(epoch FROM min(ingested_at))::float8, "
             "extract(epoch FROM max(ingested_at))::float8, count(*) FROM raw_events")
    (last_agg, rows), = pg_query(
        dsn, "SELECT extract(epoch FROM max(updated_at))::float8, count(*) FROM window_metrics")
    per_size = dict(pg_query(dsn, "SELECT window_seconds, sum((metrics->>'events')::float8)::bigint "
                                  "FROM window_metrics WHERE family = 'overall' GROUP BY 1"))
    res.update(archived=archived, window_metric_rows=rows,
               events_counted_per_window_size={str(k): v for k, v in sorted(per_size.items())})
    if first_read is None or last_agg is None:
        return
    res.update(startup_s=round(first_read - job.started, 2),
               first_read_to_last_aggregate_s=round(last_agg - first_read, 2),
               ingest_span_s=round(last_ingest - first_read, 2),
               last_aggregate_to_exit_s=round((job.ended or time.time()) - last_agg, 2),
               end_to_end_events_per_s=_per_s(n, last_agg - first_read - IDLE_S),
               ingest_events_per_s=_per_s(n, last_ingest - first_read))


def _sinks_off_figures(watcher: OffsetWatcher, n: int, wall: float, reference_startup: Optional[float],
                       res: dict) -> None:
    """No archive dates the first read: the first offset commit (bundle finalization) bounds it
    from above; the all-sinks run's first read, from the same start-up path, is the other estimate."""
    commit = res.get("first_commit_after_s")
    if commit is not None:
        res["startup_first_commit_s"] = commit
        res["wall_events_per_s_startup_first_commit"] = _per_s(n, wall - commit - IDLE_S)
    if reference_startup is not None:
        res["startup_reference_s"] = reference_startup
        res["wall_events_per_s_startup_reference"] = _per_s(n, wall - reference_startup - IDLE_S)
    if watcher.first_commit and watcher.all_committed and watcher.all_committed > watcher.first_commit:
        res["first_to_last_commit_s"] = round(watcher.all_committed - watcher.first_commit, 2)


def run_pipeline_throughput(bench: Bench, n: int, label: str, timeout: float, sinks_on: bool,
                            reference_startup: Optional[float] = None, job_args: Optional[dict] = None) -> dict:
    """In: the stack with ``n`` produced events, a label, the hang timeout, sinks on or off
    (and, for sinks off, the all-sinks run's start-up; ``job_args``: more job options, by
    name). Out: the run's figures (exit code, wall time, commit times, rates, Prism log lines, ...)."""
    group = bench.group(label)
    extra = {"until_idle": IDLE_S, "start_from": "earliest", "early_firing": 5, **_sinks(sinks_on),
             **(job_args or {})}
    job, watcher, rc, hung = _run(bench, n, label, group, timeout, extra)
    leftovers = job.reap_group()
    wall = (job.ended or time.time()) - job.started
    res = {"label": label, "group_id": group, "exit_code": rc, "hung": hung,
           "wall_s": round(wall, 2), "counters": summary_counters(job.stdout()),
           "leftover_processes": leftovers}
    _job_figures(job, watcher, res)
    if sinks_on:
        _sinks_on_figures(bench.dsn, job, n, res)
    else:
        _sinks_off_figures(watcher, n, wall, reference_startup, res)
    res["wall_only_events_per_s"] = round(n / wall, 1)
    log(f"{label}: exit {rc} after {wall:.1f}s")
    return res
