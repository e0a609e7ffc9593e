"""The one printer of a ``Report``: sections for throughput, drains, the rate table and latency."""
from __future__ import annotations

import time
from typing import Any, Optional

from scripts.benchmark.common import IDLE_S
from scripts.benchmark.report import Report

p = print


def fmt(v: Any, unit: str = "") -> str:
    """A figure for humans: n/a for None, floats to 1 or 3 places, ints with separators."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}" if abs(v) >= 100 else f"{v:,.3f}{unit}"
    return f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    """a / b to 3 places, n/a if either is missing or zero."""
    return f"{a / b:.3f}" if a and b else "n/a"


def _sizes(counts: Optional[dict]) -> str:
    return " ".join(f"{k} {v}" for k, v in (counts or {}).items())


def _drain_notes(d: dict) -> str:
    """The tail of a drain's line: service outages, other Prism warnings, an error."""
    notes = ""
    if d.get("outage_signs"):
        notes += f"; a service went away during it ({d['outage_signs']} breaker/broker lines in the job's log)"
    if d.get("prism_problem_count"):
        notes += f", other Prism warnings/errors: {d['prism_problem_count']}"
    if d.get("error"):
        notes += f"; error: {d['error']}"
    return notes


def drain_line(d: dict) -> str:
    """One drain of ``--drains`` as a line: verdict, times, mismatches, load, Prism notes."""
    c = d.get("check") or {}
    load = d.get("loadavg_1m") or {}
    verdict = "INTERRUPTED" if d.get("interrupted") else ("EXACT" if d.get("exact") else "NOT EXACT")
    return (f"drain {d['drain']:>2}/{d['of']}: {verdict}, "
            f"{d.get('seconds', 0.0):.1f}s (job {fmt(d.get('wall_s'), 's')}), exit {d.get('exit_code')}{' (HUNG)' if d.get('hung') else ''}, "
            f"{c.get('windows_baseline', 'n/a')} windows checked, {c.get('mismatched', 'n/a')} mismatched "
            f"in Postgres ({_sizes(c.get('mismatched_by_size')) or 'n/a'}), {c.get('redis_mismatched', 'n/a')} in Redis "
            f"({_sizes(c.get('redis_mismatched_by_size')) or 'n/a'}), {c.get('only_in_pipeline', 'n/a')} only in the pipeline; "
            f"load 1m mean {load.get('mean', 'n/a')} max {load.get('max', 'n/a')}; "
            f"Prism lines mentioning 'split': {d.get('prism_split_count', 0)}"
            + (f" {d['prism_split_kinds']}" if d.get("prism_split_kinds") else "") + _drain_notes(d))


def _print_run(r: dict) -> None:
    p(f"{r['label']}: exit {r['exit_code']}{' (HUNG, killed)' if r['hung'] else ''}, wall {r['wall_s']}s, "
      + (f"first read (min ingested_at) at {r['startup_s']}s, " if r.get("startup_s") is not None else "")
      + f"first offset commit at {fmt(r.get('first_commit_after_s'))}s, "
      f"all offsets committed at {fmt(r.get('all_committed_after_s'))}s")
    if r.get("stderr_tail"):
        p("  stderr (tail):\n    " + r["stderr_tail"].replace("\n", "\n    "))
    if r.get("leftover_processes"):
        p(f"  processes left in its process group after exit: {r['leftover_processes']}")


def _print_all_sinks(a: dict) -> None:
    if a.get("first_read_to_last_aggregate_s") is None:
        return
    p(f"all sinks: first read -> last aggregate {a['first_read_to_last_aggregate_s']}s "
      f"(incl. {IDLE_S}s idle wait), ingest span {a['ingest_span_s']}s, "
      f"last aggregate -> exit {a['last_aggregate_to_exit_s']}s; "
      f"archived {a.get('archived'):,}, window_metrics rows {a.get('window_metric_rows'):,}; "
      f"events per window size {a.get('events_counted_per_window_size')}")


def _print_check(c: Optional[dict]) -> None:
    if not c:
        return
    p(f"check, overall rows in Postgres vs the baseline's fold {tuple(c['fields'])}: "
      f"{c['windows_baseline']} windows, {c['mismatched']} mismatched, "
      f"{c['only_in_pipeline']} only in the pipeline")
    for e in c["examples"]:
        p(f"  MISMATCH {e}")


def _print_drains(dr: Optional[dict], events: int) -> None:
    if not dr:
        return
    during = dr.get("loadavg_1m_during", {})
    p(f"\n-- drains: {dr['drains']} x 'pipeline, all sinks' on the same {events:,} events, "
      f"beside {dr['load_processes']} busy-loop processes")
    p(f"load average (1, 5, 15 min) at the first drain {dr.get('loadavg_at_start')}, after the last "
      f"{dr.get('loadavg_at_end')}; 1-minute load average during the drains: "
      f"mean {during.get('mean', 'n/a')}, min {during.get('min', 'n/a')}, max {during.get('max', 'n/a')}")
    for d in dr["runs"]:
        p(drain_line(d))
        for line in d.get("prism_split_lines", [])[:5]:
            p(f"    {line[:400]}")
        for w in (d.get("check") or {}).get("mismatched_windows", [])[:10]:
            p(f"    MISMATCH {w}")
    p(f"{dr['exact']} of {dr['drains']} drains exact"
      + (f" ({dr['completed']} completed)" if dr["completed"] != dr["drains"] else "")
      + (f"; a shared service went away during {dr['with_outage']} of them" if dr.get("with_outage") else ""))


def _process_rows(w: Optional[dict]) -> list:
    """The rate rows of the --worker_processes drain, each with its scaling over one process."""
    if not w:
        return []
    n, sc = w["worker_processes"], w.get("scaling", {})
    return [(f"  {n} worker processes: {what} (x{fmt(sc.get(key))} of 1 process)", w.get(key))
            for what, key in (("end to end", "end_to_end_events_per_s"), ("ingest", "ingest_events_per_s"),
                              ("wall only", "wall_only_events_per_s"))]


def _print_worker_processes(w: Optional[dict]) -> None:
    if not w:
        return
    _print_run(w)
    _print_all_sinks(w)
    _print_check(w.get("check"))
    p(f"scaling, {w['worker_processes']} worker processes over 1 (rate / rate): {w.get('scaling')}")


def _print_rates(t: dict) -> None:
    a, s = t.get("pipeline_all_sinks", {}), t.get("pipeline_sinks_off", {})
    replay, replay1 = t.get("replay_to_parquet", {}), t.get("replay_to_parquet_1_worker", {})
    base = t.get("baseline", {}).get("events_per_s")
    rows = [("pipeline, all sinks: end to end  N/(last agg - first read - idle)", a.get("end_to_end_events_per_s")),
            ("pipeline, all sinks: ingest      N/(max - min ingested_at)", a.get("ingest_events_per_s")),
            ("pipeline, all sinks: wall only   N/wall", a.get("wall_only_events_per_s")),
            *_process_rows(t.get("pipeline_worker_processes")),
            ("pipeline, sinks off: N/(wall - startup - idle), startup = all-sinks first read",
             s.get("wall_events_per_s_startup_reference")),
            ("pipeline, sinks off: N/(wall - startup - idle), startup = first commit",
             s.get("wall_events_per_s_startup_first_commit")),
            ("pipeline, sinks off: wall only   N/wall", s.get("wall_only_events_per_s")),
            ("replay to Parquet, 2 workers: N/job time (pipeline.run to done)", replay.get("events_per_s_job")),
            ("replay to Parquet, 2 workers: N/wall (incl. range lookup, start-up)", replay.get("events_per_s_wall")),
            ("replay to Parquet, 1 worker:  N/job time (pipeline.run to done)", replay1.get("events_per_s_job")),
            ("replay to Parquet, 1 worker:  N/wall (incl. range lookup, start-up)", replay1.get("events_per_s_wall"))]
    p(f"\n{'':82s} {'events/s':>10s} {'/ baseline':>10s}")
    p(f"{'baseline: plain loop (confluent_kafka + fastavro + dicts)':82s} {fmt(base):>10s} {'1.000':>10s}")
    for name, v in rows:
        p(f"{name:82s} {fmt(v):>10s} {ratio(v, base):>10s}")
    if replay.get("events_per_s_job") or replay1.get("events_per_s_job"):
        p(f"replay scaling, 2 workers / 1 worker: job time {ratio(replay.get('events_per_s_job'), replay1.get('events_per_s_job'))}, "
          f"wall {ratio(replay.get('events_per_s_wall'), replay1.get('events_per_s_wall'))}")


def _print_throughput(t: Optional[dict]) -> None:
    if not t:
        return
    p(f"\n-- throughput: {t['events']:,} events over {t['span_seconds']:.0f}s of event time "
      f"(json {t['json_fraction']:.0%}, no malformed)")
    p(f"produced in {t['produce']['seconds']}s ({t['produce']['sent']:,} records)")
    b = t.get("baseline", {})
    p(f"baseline: {fmt(b.get('events'))} events folded into {fmt(b.get('windows'))} windows "
      f"in {fmt(b.get('seconds'))}s")
    for r in (t.get("pipeline_all_sinks"), t.get("pipeline_sinks_off")):
        if r:
            _print_run(r)
    _print_all_sinks(t.get("pipeline_all_sinks", {}))
    _print_check(t.get("check"))
    _print_worker_processes(t.get("pipeline_worker_processes"))
    _print_drains(t.get("drains"), t["events"])
    _print_rates(t)


def _print_readiness(lat: dict) -> None:
    if lat.get("ready_after_s") is not None:
        p(f"job ready (first pane of warm-up traffic in Redis) {lat['ready_after_s']}s after start, "
          f"after {lat.get('warmup_events')} warm-up events")
    elif lat.get("ready", "").startswith("slept"):
        p(f"job start-up: {lat['ready']}")
    elif lat.get("ready"):
        p(f"NOT READY: {lat['ready']}")
    if lat.get("error"):
        p(f"FAILED: {lat['error']}")


def _print_latencies(lat: dict) -> None:
    if "p50_s" not in lat:
        return
    p(f"send -> visible in Redis (1m overall events): p50 {fmt(lat.get('p50_s'))}s  "
      f"p90 {fmt(lat.get('p90_s'))}s  p99 {fmt(lat.get('p99_s'))}s  max {fmt(lat.get('max_s'))}s  "
      f"(min {fmt(lat.get('min_s'))}s, mean {fmt(lat.get('mean_s'))}s; {lat.get('redis_polls')} polls)")
    p(f"never visible within {lat.get('never_visible_within_s'):.0f}s after the last send: "
      f"{lat.get('never_visible'):,} of {lat.get('events'):,}; over all events, counting those as "
      f"never: p50 {fmt(lat.get('p50_all_s'))}, p99 {fmt(lat.get('p99_all_s'))}"
      + ("  (p50/p90/p99 above are of the visible events only)" if lat.get("never_visible") else ""))
    for w, v in (lat.get("windows") or {}).items():
        p(f"  window {time.strftime('%H:%M', time.localtime(int(w) / 1000))} ({w}): "
          f"warm-up {v['warmup']} ({v.get('warmup_read', 0)} read by the job), "
          f"measured sent {v['sent']:,}, final count {v['final_count']:,.0f}, "
          f"count changed {v['count_changes']} times")


def _print_job_end(lat: dict) -> None:
    if "measured_events_archived" in lat:
        p(f"read path: {lat['measured_events_archived']:,} measured events archived in raw_events by the end; "
          f"committed offsets {lat.get('committed_offsets'):,}")
    if lat.get("panes_in_redis_1m") is not None:
        p(f"1m overall rows in Redis at the end (window, events, pane): {lat['panes_in_redis_1m']}")
    p(f"SIGTERM: exit code {lat.get('exit_code')}"
      + (f" after {lat['stop_seconds']}s" if "stop_seconds" in lat else "")
      + (f"; {lat['stop']}" if "stop" in lat else ""))
    if lat.get("leftover_processes_after_exit"):
        p(f"processes left in its process group after exit: {lat['leftover_processes_after_exit']}")
    if lat.get("error") or lat.get("exit_code") not in (0, None):
        p("  job stderr (tail):\n    " + lat.get("stderr_tail", "").replace("\n", "\n    "))


def _print_latency(lat: Optional[dict]) -> None:
    if not lat:
        return
    p(f"\n-- latency: {lat.get('events', 0):,} events at {lat.get('rate')}/s for {lat.get('seconds')}s "
      f"(achieved {fmt(lat.get('achieved_rate'))}/s), event time = send time, "
      f"--early_firing {lat.get('early_firing_s', 1):g}, all sinks")
    _print_readiness(lat)
    _print_latencies(lat)
    _print_stages(lat)
    _print_job_end(lat)


def _print_memory(m: Optional[dict]) -> None:
    if not m:
        return
    p(f"\n-- memory: the open-ended job (no --until_idle, --allowed_lateness {m.get('allowed_lateness_s')}) "
      f"over {m.get('hours'):g} h of event time, {m.get('events', 0):,} events "
      f"({m.get('events_per_event_hour', 0):,} per hour of event time), all sinks; read in "
      f"{fmt(m.get('read_all_after_s'), 's')}, SIGTERM: exit {m.get('exit_code')}")
    p(f"resident set of the job's process tree: peak {fmt(m.get('peak_rss_mb'), ' MB')} RSS at "
      f"{fmt(m.get('peak_at_s'), 's')}; at the end {fmt(m.get('final_rss_mb'), ' MB')} RSS, "
      f"{fmt(m.get('final_pss_mb'), ' MB')} PSS, {fmt(m.get('final_uss_mb'), ' MB')} USS")
    peaks = m.get("peak_rss_per_process_mb") or {}
    for label, q in (m.get("final_per_process") or {}).items():
        p(f"  {label:<16} RSS {fmt(q['rss_mb'], ' MB')} (peak {fmt(peaks.get(label), ' MB')}), "
          f"PSS {fmt(q['pss_mb'], ' MB')}, USS {fmt(q['uss_mb'], ' MB')}")
    p("no baseline ratio: the plain loop runs inside the benchmark process, whose RSS was "
      f"{fmt(m.get('benchmark_process_rss_mb'), ' MB')} when the memory run began")
    hours = m.get("rss_after_hour_mb") or []
    p("RSS (MB) after each hour of event time: " + " ".join(f"{h + 1}:{fmt(v)}" for h, v in enumerate(hours)))
    read = m.get("events_read_after_hour") or []
    if any(v is not None for v in read):
        p("hours of events read when the watermark reached each hour (the slowest partition holds it back): "
          + " ".join(f"{h + 1}:" + ("n/a" if v is None else f"{v / m['events_per_event_hour']:.1f}")
                     for h, v in enumerate(read)))
    fit = m.get("growth_fitted_hours")
    if m.get("growth_mb_per_event_hour") is None or not fit:
        p("growth: n/a (fewer than two hours after the first expiries)")
        return
    p(f"growth: {fmt(m['growth_mb_per_event_hour'], ' MB')} RSS ({fmt(m.get('pss_growth_mb_per_event_hour'), ' MB')} "
      f"PSS) per hour of event time, least squares over hours {fit[0]}-{fit[1]}")


def _print_stages(lat: dict) -> None:
    """Where the time went, stage by stage (the job's --latency_trace)."""
    stages = lat.get("stages")
    if not stages:
        if lat.get("stages_error"):
            p(f"where the time goes: {lat['stages_error']}")
        return
    p("where the time goes (per event, time since the previous stage; share of the summed medians):")
    p(f"  {'stage':<8} {'p50 s':>7} {'p99 s':>7} {'share':>6} {'since send p50/p99 s':>21}  what")
    for name, st in stages.items():
        share = st.get("share_of_p50")
        p(f"  {name:<8} {fmt(st.get('step_p50_s')):>7} {fmt(st.get('step_p99_s')):>7} "
          f"{'' if share is None else f'{share:.0%}':>6} "
          f"{fmt(st.get('since_send_p50_s')):>10}/{fmt(st.get('since_send_p99_s')):<10}  {st['meaning']}")
    p(f"  1-minute panes fired while measuring: {lat.get('panes_fired_1m')}, median interval "
      f"{fmt(lat.get('pane_interval_p50_s'))}s; reader polls with records: {lat.get('reader_polls_per_s')}/s")


def print_report(rep: Report) -> None:
    """Prints every section of ``rep`` to stdout."""
    p("\n================ streaming job benchmark ================")
    env, iso = rep.environment, rep.isolation
    p(f"machine: {env['cpus']} CPUs; load average at start {env['loadavg_start']}, at end {env.get('loadavg_end')}")
    p(f"isolation: suffix {iso['suffix']}, schema {iso['schema']}, redis {iso['redis_url']}")
    _print_throughput(rep.throughput)
    _print_latency(rep.latency)
    _print_memory(rep.memory)
    if rep.errors:
        p("\n-- errors")
        for e in rep.errors:
            p(f"  {e}")
    if rep.cleanup_problems:
        p(f"cleanup problems: {rep.cleanup_problems}")
    p(f"\nbenchmark runtime: {rep.runtime_s}s")
