"""The command line: options, the order of the measurements, cleanup, the report."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Optional

import scripts.benchmark as package
from scripts.benchmark.baseline import baseline_overall, run_baseline
from scripts.benchmark.check import compare_with_baseline
from scripts.benchmark.common import loadavg, log
from scripts.benchmark.drains import run_drains
from scripts.benchmark.isolation import Bench, isolated, new_suffix, planned
from scripts.benchmark.jobs import Job
from scripts.benchmark.latency import run_latency
from scripts.benchmark.memory import run_memory
from scripts.benchmark.printer import print_report
from scripts.benchmark.processes import run_worker_processes
from scripts.benchmark.replay import run_replay
from scripts.benchmark.report import Report
from scripts.benchmark.throughput import run_pipeline_throughput
from scripts.produce import TrafficConfig, generate, produce
from tests.integration.conftest import BROKERS

SPAN_S = 7200


def parser() -> argparse.ArgumentParser:
    """The options of ``python -m scripts.benchmark``, each with its default in --help."""
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=package.__doc__.split("\n\n")[0],
                                 epilog="Options take Beam's spelling (underscores); the hyphenated forms of "
                                        "earlier releases are accepted too.")
    ap.add_argument("--events", type=int, default=200000, help="events for the throughput runs (default: %(default)s)")
    ap.add_argument("--latency_seconds", "--latency-seconds", type=float, default=20.0,
                    help="how long to send live traffic (default: %(default)s)")
    ap.add_argument("--rate", type=float, default=2000.0,
                    help="events/s of the live traffic; the achieved rate is reported (default: %(default)s)")
    ap.add_argument("--early_firing", "--early-firing", type=float, default=1.0, metavar="S",
                    help="the latency job's --early_firing: seconds between early panes of the 1-minute "
                         "window (default: %(default)s)")
    ap.add_argument("--json", default=None, metavar="PATH",
                    help="also write the report as JSON here (default: none)")
    ap.add_argument("--brokers", default=BROKERS,
                    help="Kafka bootstrap servers [KAFKA_BROKERS] (default: %(default)s)")
    ap.add_argument("--redis_db", "--redis-db", type=int, default=14,
                    help="Redis database to use, flushed (default: %(default)s)")
    ap.add_argument("--pipeline_timeout", "--pipeline-timeout", type=float, default=600.0,
                    help="seconds before a throughput run counts as hung and is stopped (default: %(default)s)")
    ap.add_argument("--keep_logs", "--keep-logs", metavar="DIR", default=None,
                    help="keep each streaming job's stdout/stderr in DIR (default: none, temporary files)")
    ap.add_argument("--latency_ready_sleep", "--latency-ready-sleep", type=float, default=0.0, metavar="S",
                    help="instead of warm-up traffic until a first pane shows in Redis, sleep S seconds "
                         "after starting the latency job (default: %(default)s, i.e. warm up)")
    ap.add_argument("--drains", type=int, default=1, metavar="N",
                    help="run the 'pipeline, all sinks' drain N times on the same produced events, each "
                         "with a fresh consumer group and with window_metrics, window_ledger, raw_events and "
                         "the Redis DB emptied first, each checked against the baseline (default: %(default)s)")
    ap.add_argument("--load", type=int, default=0, metavar="K",
                    help="K busy-loop processes beside the drains, ended when they end (each stops by "
                         "itself after --pipeline_timeout x --drains seconds); the load average during "
                         "the drains is reported (default: %(default)s)")
    ap.add_argument("--worker_processes", "--worker-processes", type=int, default=2, metavar="N",
                    help="the all-sinks drain once more with the job in N SDK worker processes, and "
                         "its scaling over the one-process drain (default: %(default)s)")
    ap.add_argument("--pipeline_arg", "--pipeline-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for every streaming job, repeatable, e.g. "
                         "--pipeline_arg=--prism_log_level=debug (default: none)")
    ap.add_argument("--memory_hours", "--memory-hours", type=float, default=24.0, metavar="H",
                    help="hours of event time of the memory run, at the throughput runs' events per hour "
                         "(--events per 2 hours) (default: %(default)s)")
    for what, runs in (("throughput", "producing, the baseline and the streaming and replay runs"),
                       ("sinks-off", "the streaming run with sinks off"), ("latency", "the live-latency run"),
                       ("replay", "the replay to Parquet"),
                       ("memory", "the memory run (the open-ended job over --memory_hours of event time)"),
                       ("worker-processes", "the --worker_processes drain")):
        ap.add_argument(f"--skip_{what.replace('-', '_')}", f"--skip-{what}", action="store_true",
                        help=f"skip {runs} (default: off)")
    return ap


def _guarded(rep: Report, what: str, fn, *args, **kwargs) -> Optional[dict]:
    """``fn(*args, **kwargs)``; an exception becomes a line of rep.errors and None."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        rep.errors.append(f"{what}: {type(e).__name__}: {e}")
        return None


def _produce_and_fold(a: argparse.Namespace, bench: Bench, t: dict) -> dict:
    """Produces the events and runs the baseline on them; returns ``baseline_overall()``."""
    cfg = TrafficConfig(events=a.events, span_seconds=SPAN_S, malformed_fraction=0.0, json_fraction=0.1)
    log(f"producing {a.events:,} events")
    records = (r._replace(topic=bench.stack.topic_for(r.topic)) for r in generate(cfg))
    t["produce"] = produce(records, a.brokers)
    log(f"produced in {t['produce']['seconds']}s")
    log("baseline: plain consumer loop")
    base, windows = run_baseline(a.brokers, bench.event_topics(), bench.group("baseline"), a.events)
    t["baseline"] = base
    log(f"baseline: {base['events']:,} events in {base['seconds']}s = {base['events_per_s']:,}/s")
    return baseline_overall(windows)


def _all_sinks(a: argparse.Namespace, bench: Bench, rep: Report, t: dict, overall: dict) -> None:
    """The all-sinks drain (or --drains of them) and its check against the baseline."""
    if a.drains > 1 or a.load > 0:
        run_drains(bench, a.events, a.drains, a.load, a.pipeline_timeout, overall, t)
        return
    run = _guarded(rep, "pipeline, all sinks", run_pipeline_throughput,
                   bench, a.events, "pipeline, all sinks", a.pipeline_timeout, sinks_on=True)
    if run is None:
        return
    t["pipeline_all_sinks"] = run
    if run["exit_code"] == 0:
        check = _guarded(rep, "pipeline, all sinks", compare_with_baseline, bench.dsn, bench.redis_url, overall)
        if check is not None:
            t["check"] = check


def _throughput(a: argparse.Namespace, bench: Bench, rep: Report) -> None:
    """Produce, baseline, all sinks (or drains), sinks off, replay: into rep.throughput."""
    t: dict = {"events": a.events, "span_seconds": float(SPAN_S), "json_fraction": 0.1}
    rep.throughput = t
    overall = _produce_and_fold(a, bench, t)
    _all_sinks(a, bench, rep, t, overall)
    if not a.skip_worker_processes:
        run = _guarded(rep, "pipeline, worker processes", run_worker_processes, bench, a.events,
                       a.worker_processes, a.pipeline_timeout, overall, t.get("pipeline_all_sinks"))
        if run is not None:
            t["pipeline_worker_processes"] = run
    if not a.skip_sinks_off:
        run = _guarded(rep, "pipeline, sinks off", run_pipeline_throughput,
                       bench, a.events, "pipeline, sinks off", a.pipeline_timeout, sinks_on=False,
                       reference_startup=(t.get("pipeline_all_sinks") or {}).get("startup_s"))
        if run is not None:
            t["pipeline_sinks_off"] = run
    if not a.skip_replay:
        # "replay_to_parquet" keeps its meaning (2 workers); 1 worker beside it shows the scaling.
        for key, workers in (("replay_to_parquet", 2), ("replay_to_parquet_1_worker", 1)):
            replay = _guarded(rep, f"replay, {workers} worker(s)", run_replay, bench, a.events,
                              a.pipeline_timeout, workers)
            if replay is not None:
                t[key] = replay


def _measure(a: argparse.Namespace, bench: Bench, rep: Report) -> None:
    log(f"isolated topics *.{bench.suffix}, schema {rep.isolation['schema']}, {bench.redis_url}")
    if not a.skip_throughput:
        _throughput(a, bench, rep)
    if not a.skip_latency:
        rep.latency = run_latency(bench, a.latency_seconds, a.rate, ready_sleep=a.latency_ready_sleep,
                                  early_firing_s=a.early_firing)
        if rep.latency.get("error"):
            rep.errors.append(f"latency: {rep.latency['error']}")
    if not a.skip_memory:
        rep.memory = _guarded(rep, "memory", run_memory, bench, a.memory_hours, int(a.events * 3600 / SPAN_S))
        if rep.memory and rep.memory.get("error"):
            rep.errors.append(f"memory: {rep.memory['error']}")


def _run(a: argparse.Namespace, rep: Report, suffix: str) -> int:
    """Sets up the isolated stack, measures, cleans up; returns the exit code."""
    try:
        with isolated(a.brokers, suffix, a.redis_db, tuple(a.pipeline_arg), rep.cleanup_problems) as bench:
            try:
                _measure(a, bench, rep)
            finally:
                Job.kill_all()
                log("cleaning up topics, schema, Redis DB, consumer groups")
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        rep.errors.append(f"aborted: {type(e).__name__}: {e}")
        return 1
    return 0


def _on_term(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the benchmark with ``argv`` (default: sys.argv[1:]), prints the report; returns 0,
    or 1 if it was aborted."""
    ap = parser()
    a = ap.parse_args(argv)
    if a.drains < 1 or a.load < 0:
        ap.error("--drains must be at least 1 and --load at least 0")
    signal.signal(signal.SIGTERM, _on_term)
    if a.keep_logs:
        os.makedirs(a.keep_logs, exist_ok=True)
        Job.log_dir = a.keep_logs
    began = time.time()
    suffix = new_suffix()
    rep = Report.start(argv or sys.argv[1:], planned(suffix, a.redis_db))
    try:
        rc = _run(a, rep, suffix)
    finally:
        rep.environment["loadavg_end"] = loadavg()
        rep.runtime_s = round(time.time() - began, 1)
    print_report(rep)
    if a.json:
        rep.write_json(a.json)
        log(f"report written to {a.json}")
    return rc
