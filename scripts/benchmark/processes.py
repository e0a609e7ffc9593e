"""``--worker_processes N``: the all-sinks drain again with the job's Python work in N SDK
worker processes (``pipelines.streaming --worker_processes N``), checked against the
baseline like the first, and its rates against the one-process drain's."""
from __future__ import annotations

from typing import Optional

from scripts.benchmark.check import compare_with_baseline
from scripts.benchmark.common import log, with_services
from scripts.benchmark.drains import empty_outputs
from scripts.benchmark.isolation import Bench
from scripts.benchmark.throughput import run_pipeline_throughput

RATES = ("end_to_end_events_per_s", "ingest_events_per_s", "wall_only_events_per_s")


def scaling(run: dict, one: Optional[dict]) -> dict:
    """{rate: the N-process run's rate / the one-process run's}, for the rates both have."""
    one = one or {}
    return {k: round(run[k] / one[k], 3) for k in RATES if run.get(k) and one.get(k)}


def run_worker_processes(bench: Bench, n_events: int, processes: int, timeout: float, base: dict,
                         one_process: Optional[dict]) -> dict:
    """In: the stack with ``n_events`` produced, the processes, the hang timeout, the
    baseline's ``baseline_overall()`` and the one-process run's figures. Out: the run's
    figures (as run_pipeline_throughput's), its ``check`` and its ``scaling`` over the
    one-process run. The outputs are emptied first (a fresh consumer group reads all)."""
    label = f"pipeline, all sinks, {processes} worker processes"
    with_services(lambda: empty_outputs(bench), f"{label}: emptying the outputs")
    run = run_pipeline_throughput(bench, n_events, label, timeout, sinks_on=True,
                                  job_args={"worker_processes": processes})
    run["worker_processes"] = processes
    if run["exit_code"] == 0:
        run["check"] = with_services(lambda: compare_with_baseline(bench.dsn, bench.redis_url, base),
                                     f"{label}: checking")
    run["scaling"] = scaling(run, one_process)
    log(f"{label}: scaling over one process {run['scaling']}")
    return run
