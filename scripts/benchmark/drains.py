"""``--drains N`` / ``--load K``: the all-sinks drain N times on the same produced events,
beside K busy loops, each on emptied outputs and each checked against the baseline."""
from __future__ import annotations

import time

import psycopg2
import redis

from scripts.benchmark.check import compare_with_baseline
from scripts.benchmark.common import loadavg, log, with_services
from scripts.benchmark.isolation import Bench
from scripts.benchmark.load import BusyLoad, LoadSampler
from scripts.benchmark.printer import drain_line
from scripts.benchmark.throughput import run_pipeline_throughput

_EMPTIED = ("window_metrics", "window_ledger", "raw_events")
_PRISM = {"prism_split_count": 0, "prism_split_kinds": {}, "prism_split_lines": [],
          "prism_problem_count": 0, "prism_problem_lines": []}


def empty_outputs(bench: Bench) -> list[str]:
    """Empties what a drain writes (the tables that exist yet, and the Redis DB), so
    that no drain's check can be passed by an earlier drain's rows; returns the tables."""
    conn = psycopg2.connect(bench.dsn, connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
                        (list(_EMPTIED),))
            tables = [t for t, in cur.fetchall()]
            if tables:
                cur.execute(f"TRUNCATE {', '.join(tables)}")
    finally:
        conn.close()
    redis.Redis.from_url(bench.redis_url).flushdb()
    return tables


def drain_exact(run: dict, check: dict | None) -> bool:
    """Whether a drain exited cleanly and matched the baseline everywhere."""
    return (run.get("exit_code") == 0 and not run.get("hung") and check is not None
            and check["mismatched"] == 0 and check["only_in_pipeline"] == 0
            and check.get("redis_mismatched", 0) == 0)


def _take(run: dict, d: dict) -> None:
    """Copies a drain's figures from its run into its line ``d``."""
    d.update(exit_code=run["exit_code"], hung=run["hung"], wall_s=run["wall_s"])
    d.update({k: run.get(k, v) for k, v in _PRISM.items()})
    d.update(events_counted_per_window_size=run.get("events_counted_per_window_size"),
             archived=run.get("archived"))
    if run.get("stderr_tail"):
        d["stderr_tail"] = run["stderr_tail"]
    d["outage_signs"] = run.get("outage_signs", 0)


def _run_and_check(bench: Bench, i: int, d: dict, n_events: int, timeout: float, base: dict) -> dict | None:
    """Runs drain ``i``, fills ``d`` from it and checks it; returns the run's figures (None if
    it failed to run). Failures go to d["error"], a service's going away to d["outage_signs"]."""
    run = None
    try:
        run = run_pipeline_throughput(bench, n_events, d["label"], timeout, sinks_on=True)
        _take(run, d)
        if run["exit_code"] == 0:
            d["check"] = with_services(lambda: compare_with_baseline(bench.dsn, bench.redis_url, base),
                                       f"drain {i}: checking")
    except Exception as e:
        d["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, (psycopg2.OperationalError, redis.ConnectionError, redis.TimeoutError)):
            d["outage_signs"] = d.get("outage_signs", 0) + 1
    return run


def _one(bench: Bench, d: dict, n_events: int, timeout: float, base: dict,
         sampler: LoadSampler) -> dict | None:
    """Drain d["drain"]: fills its line ``d`` of the report; returns the run's figures."""
    i = d["drain"]
    t0 = time.time()
    d.update(seconds=0.0, exact=False, interrupted=True)  # until the drain has run
    d["emptied"] = with_services(lambda: empty_outputs(bench), f"drain {i}: emptying the outputs")
    try:
        run = _run_and_check(bench, i, d, n_events, timeout, base)
    finally:
        t1 = time.time()
        d["seconds"] = round(t1 - t0, 1)
        d["loadavg_1m"] = sampler.between(t0, t1)
    d["interrupted"] = False
    d["exact"] = drain_exact(d, d.get("check"))
    log(drain_line(d))
    for line in d.get("prism_split_lines", [])[:3]:
        log(f"  {line[:400]}")
    return run


def _finish(out: dict, sampler: LoadSampler, began: float) -> None:
    sampler.stop.set()
    out["loadavg_at_end"] = loadavg()
    out["loadavg_1m_during"] = sampler.between(began, time.time())
    out["exact"] = sum(1 for d in out["runs"] if d.get("exact"))
    out["completed"] = sum(1 for d in out["runs"] if not d.get("interrupted"))
    out["with_outage"] = sum(1 for d in out["runs"] if d.get("outage_signs"))


def run_drains(bench: Bench, n_events: int, drains: int, load: int, timeout: float,
               base: dict, t: dict) -> None:
    """``drains`` all-sinks drains of the produced events beside ``load`` busy loops, each
    checked against ``base`` (``baseline_overall()``); fills t["drains"] and, from the
    first drain, t["pipeline_all_sinks"] and t["check"]."""
    busy, sampler = BusyLoad(load, timeout * drains), LoadSampler()
    out: dict = {"drains": drains, "load_processes": load, "runs": []}
    t["drains"] = out
    sampler.start()
    began = time.time()
    out["loadavg_at_start"] = loadavg()
    try:
        if load:
            out["load_pids"] = busy.start()
            log(f"load: {load} busy-loop processes, pids {out['load_pids']} (each stops by itself "
                f"after {timeout * drains:.0f}s)")
        for i in range(1, drains + 1):
            label = "pipeline, all sinks" if i == 1 else f"pipeline, all sinks, drain {i}"
            d: dict = {"drain": i, "of": drains, "label": label}
            out["runs"].append(d)
            run = _one(bench, d, n_events, timeout, base, sampler)
            if i == 1 and run is not None:
                t["pipeline_all_sinks"] = run
            if i == 1 and "check" in d:
                t["check"] = d["check"]
    finally:
        stopped = busy.stop()
        if load:
            log(f"load: ended busy loops {stopped}")
        _finish(out, sampler, began)
