"""The streaming job: Kafka events -> validated, windowed analytics in Redis, Postgres and Kafka.

    python -m pipelines.streaming                       # runs until stopped (Ctrl-C / SIGTERM)
    python -m pipelines.streaming --until_idle 10       # drain what the topics hold, then exit 0
    python -m pipelines.streaming --http_port 0         # without the HTTP service

While it runs, the analytics service (service/) answers on --http_host:--http_port
(127.0.0.1:8080): /health, /metrics (Prometheus), /events/status and /events/replay;
it starts before the pipeline and stops after the job ended. On SIGTERM or Ctrl-C,
/health answers 503 "draining" while the job is cancelled (reading stops;
bundles not finished are not committed, and a restart reads them again), then
the server stops and the command exits 0; the cancel and the server's stop are
bounded (CANCEL_S, the server's STOP_S), so a runner that does not answer
cannot keep the process waiting.

Logs: ``--log_format text|json`` and ``--log_level`` (pipelines/logs.py); the
job's start (its options, redacted) and stop (exit code, reason) are INFO lines.

Flow: ReadValidEvents (ReadEvents, one restriction per partition, then
DecodeAndValidate) -> ArchiveRawEvents (Postgres), WindowedMetricsToSinks
(1m/5m/1h/1d, early/on-time/late panes, to Redis, Postgres and the aggregates
topic), UpdateProfiles (learner profiles in Postgres and Redis, fast-answers
signals); every step's dead letters -> PublishDeadLetterStreams; the 1m/5m panes,
the dead letters and the profiles' signals -> EvaluateAlertRules -> PublishAlerts
(one alert per anomaly episode, on --alerts_topic, in Postgres ``alerts`` and
Redis). Run ``--help``
for every option.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import logs
from pipelines.options import (AnalyticsOptions, LogOptions, ServiceOptions, lenient, check_options, fail,
                               help_if_asked, redact, use_local_runner)
from pipelines.preflight import check_services
from pipelines.workers import WorkerWatch, pin_chains, use_worker_processes
from service.launcher import Stop, run_job
from service.launcher import _on_signal as launcher_signal_handler  # WorkerWatch: has a signal come?
from service.server import ServerError, Service
from service.status import redact_options
from transforms.aggregate import WindowedMetrics
from transforms.alerts.evaluate import EvaluateAlertRules
from transforms.alerts.publish import AlertTargets, PublishAlerts
from transforms.dead_letter_log import DEAD_LETTER_LOG
from transforms.dead_letter_streams import DeadLetterTopic, PublishDeadLetterStreams
from transforms.kafka_read import KafkaReadConfig
from transforms.ledger import WindowLedger
from transforms.metrics_to_sinks import WindowedMetricsToSinks
from transforms.profiles.update import UpdateProfiles
from transforms.resume import LedgerCompactor, ResumePoint, resume_point
from transforms.sinks.postgres_sink import ArchiveRawEvents
from transforms.valid_events import ReadValidEvents

LOG = logging.getLogger("pipelines.streaming")
# Early panes of windows that ended longer ago than this are not written (a backlog).
CATCH_UP_AFTER_S = 60


class StreamingOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--until_idle", type=float, default=None,
                            help="exit 0 once no record has arrived for this many seconds, "
                                 "after flushing every window")
        parser.add_argument("--stall_timeout", type=lenient(float), default=300.0,
                            help="exit 3 when the runner has scheduled no Kafka read for this many seconds "
                                 "while partitions are open, so a supervisor restarts the job (seen once "
                                 "after a broker outage on Prism 2.77; a restart is exact); 0 turns it off")
        parser.add_argument("--start_from", default="committed",
                            choices=["committed", "earliest", "latest"],
                            help="where to start a partition without a committed offset "
                                 "('committed' falls back to earliest)")
        parser.add_argument("--profiles", default="true", choices=["true", "false"],
                            help="keep learner behaviour profiles in Postgres learner_profiles and Redis "
                                 "(analytics:profile:<user>), and the fast-answers alert rule")
        parser.add_argument("--latency_trace", default=None, metavar="PATH",
                            help="debug: append to PATH, per bundle, when events of each 1-minute window "
                                 "were polled, folded, fired by the trigger and emitted as a pane "
                                 "(transforms/latency_trace.py; the latency benchmark reads it)")
        parser.add_argument("--worker_processes", type=int, default=1,
                            help="run the job's Python work in this many SDK worker processes: the "
                                 "partitions are shared among as many reads, each with its archive, "
                                 "fold and profiles, each in a process of its own (the first with the "
                                 "windows' merge and the sinks); 1 runs it in this process")
        parser.add_argument("--read_chains", type=int, default=None,
                            help="how many reads share the partitions (default: --worker_processes); "
                                 "more reads than processes measure what the split alone does")


def read_config(opts: AnalyticsOptions) -> KafkaReadConfig:
    sopts = opts.view_as(StreamingOptions)
    return KafkaReadConfig(brokers=opts.brokers, group_id=opts.group_id, batch_size=opts.batch_size,
                           max_out_of_orderness_s=opts.max_out_of_orderness,
                           idle_timeout_s=sopts.until_idle, start_from=sopts.start_from,
                           stall_exit_s=float(sopts.stall_timeout) or None, trace_path=sopts.latency_trace)


def resume(opts: AnalyticsOptions) -> ResumePoint:
    """Offsets, window totals and decided records from where the group stopped."""
    return resume_point(read_config(opts), opts.topic_list(), WindowLedger(opts.postgres_dsn, opts.group_id),
                        opts.dlq_topic, min(opts.window_sizes_s()), opts.allowed_lateness * 1000)


def windows(opts: AnalyticsOptions, point: ResumePoint) -> WindowedMetrics:
    """The windows, started from the ledger's seeds; an open-ended job forgets closed ones."""
    return WindowedMetrics(
        opts.window_sizes_s(), early_firing_s=opts.early_firing, allowed_lateness_s=opts.allowed_lateness,
        catch_up_after_s=CATCH_UP_AFTER_S, expire_state=opts.view_as(StreamingOptions).until_idle is None,
        ledger=point.ledger, seeds=point.read_seeds(), dead_lettered=point.dead_lettered,
        retry=opts.sink_retry_config(), trace_path=opts.view_as(StreamingOptions).latency_trace)


def chain_suffix(i: int) -> str:
    """The step-name suffix of read chain ``i``: none for the first (the graph
    of one chain is the graph of old), ``Chain<i>`` after."""
    return f"Chain{i}" if i else ""


def share_partitions(partitions: list, chains: int) -> list[list]:
    """``partitions`` dealt round-robin into ``chains`` shares (each non-empty)."""
    return [s for s in (partitions[i::chains] for i in range(chains)) if s]


def build(p: beam.Pipeline, opts: AnalyticsOptions, point: ResumePoint, chains: int = 1) -> int:
    """Wires the transforms; shared by ``run`` and the tests. Connects to nothing, exits nothing.

    ``chains``: how many reads, each of a share of the partitions, each with
    everything that must be durable before its offsets are committed fused
    behind it (archive, lateness and fold with the ledger, profiles, dead
    letters); their partials meet in the windows' merge. Steps of chain i > 0
    carry the suffix ``Chain<i>`` (see pipelines.workers, which runs each
    chain in a worker process of its own). Returns the number of chains built
    (fewer than ``chains`` when there are fewer partitions)."""
    retry = opts.sink_retry_config()
    profiles = opts.view_as(StreamingOptions).profiles == "true"
    events, letters, profile_signals = [], {}, {}
    for i, share in enumerate(share_partitions(point.partitions, chains)):
        sfx = chain_suffix(i)
        decoded = p | f"ValidEvents{sfx}" >> ReadValidEvents(read_config(opts), share, opts.max_future * 1000)
        events.append(decoded.events)
        letters[sfx] = decoded.dead_letters
        if opts.archive == "true":
            letters[f"ArchiveErrors{sfx}"] = decoded.events | f"ArchiveRawEvents{sfx}" >> ArchiveRawEvents(
                opts.postgres_dsn, retry)
        if profiles:  # AlertSignals of the fast-answers rule; published below with the other rules' signals.
            profile_signals[f"Profiles{sfx}"] = decoded.events | f"Profiles{sfx}" >> UpdateProfiles(
                opts.postgres_dsn, opts.redis_url, opts.group_id, retry)
    windowed = (events[0] if len(events) == 1 else tuple(events)) | "Windows" >> WindowedMetricsToSinks(
        windows(opts, point), opts.aggregate_sinks())
    too_late, fold_errors = ((windowed.too_late,), (windowed.fold_errors,)) if len(events) == 1 else (
        windowed.too_late, windowed.fold_errors)
    for i, (late, errors) in enumerate(zip(too_late, fold_errors)):
        letters[f"TooLate{chain_suffix(i)}"], letters[f"FoldErrors{chain_suffix(i)}"] = late, errors
    # One producer step per stream, no Flatten: each stays fused with the
    # reader, whose offsets are committed only once their bundle's dead
    # letters are flushed.
    letters | "DeadLetters" >> PublishDeadLetterStreams(
        DeadLetterTopic(opts.brokers, opts.dlq_topic, retry), already_published=point.dead_lettered)
    # Anomaly alerts: rules on the 1m/5m panes and the dead letters, one alert per episode. Each
    # signal stream gets its own publisher (no Flatten), fused with the step that judged it, so
    # that an entity's signals arrive in window order; Postgres decides, whichever publisher asks.
    signals = windowed.panes | "AlertRules" >> EvaluateAlertRules(
        opts.topic_list(), opts.postgres_dsn if "postgres" in opts.sink_set() else None, retry, letters,
        letters_dsn=opts.postgres_dsn)
    signals.update(profile_signals)
    targets = AlertTargets(opts.brokers, opts.postgres_dsn,
                           opts.redis_url if "redis" in opts.sink_set() else None, opts.alerts_topic, retry)
    for name, stream in signals.items():
        stream | f"Alerts{name}" >> PublishAlerts(targets)
    return len(events)


def run(argv: Optional[list[str]] = None) -> int:
    help_if_asked(argv, "python -m pipelines.streaming", __doc__.split("\n\n")[0], AnalyticsOptions, StreamingOptions,
                  ServiceOptions, LogOptions)
    options = PipelineOptions(argv)
    check_options(options)
    opts = options.view_as(AnalyticsOptions)
    if not opts.topic_list():
        fail("--topics is empty")
    profiles = options.view_as(StreamingOptions).profiles == "true"
    check_services(opts, redis_="redis" in opts.sink_set() or profiles, postgres=True)  # Postgres: the ledger
    use_local_runner(options, streaming=True)
    LOG.info("job starting: group %s, topics %s", opts.group_id, ",".join(opts.topic_list()),
             extra={"event": "job_start", "options": shown_options(options)})
    service = start_service(options)  # /health answers (job STARTING) while the group's lease is awaited
    stop = Stop()
    try:
        stop.code = resume_and_run(options, opts, service, stop)
    except SystemExit as e:  # fail(): one error: line was printed
        stop.code, stop.reason = e.code, stop.reason or "refused (see the error: line)"
        raise
    except BaseException as e:
        stop.code, stop.reason = 1, f"{type(e).__name__}: {e}"
        raise
    finally:
        if service is not None:
            service.stop()  # last: bounded by the server's STOP_S
        DEAD_LETTER_LOG.flush()  # the last summary: counts since the last one
        LOG.info("job stopped: exit code %s (%s)", stop.code, stop.reason,
                 extra={"event": "job_stop", "exit_code": stop.code, "reason": stop.reason})
    return stop.code


def resume_and_run(options: PipelineOptions, opts: AnalyticsOptions, service: Optional["Service"], stop: Stop) -> int:
    """Resumes the group, builds the pipeline and runs it; the exit code."""
    try:
        point = resume(opts)
    except Exception as e:  # a service that went away since the checks, a dead-letter topic too long to read
        fail(f"cannot resume the consumer group {opts.group_id}: {type(e).__name__}: {e}")
    seeds = point.seeds
    print(f"resuming {len(point.partitions)} partitions: {seeds.windows} open windows to seed from "
          f"{seeds.rows} ledger rows (ready in {seeds.seconds:.2f}s), {len(point.dead_lettered)} records "
          "already dead-lettered", file=sys.stderr)
    sopts = options.view_as(StreamingOptions)
    if sopts.worker_processes > 1:
        use_worker_processes(options)
    p = beam.Pipeline(options=options)
    chains = build(p, opts, point, chains=sopts.read_chains or sopts.worker_processes)
    if sopts.worker_processes > 1:
        pin_chains(p, {f"ValidEvents{chain_suffix(i)}": i % sopts.worker_processes for i in range(chains)})
    compactor = LedgerCompactor(read_config(opts), point.partitions, point.ledger,
                                min(opts.window_sizes_s()), opts.allowed_lateness * 1000)
    if sopts.worker_processes <= 1:
        return run_job(p, service, compactor, stop)
    watch = WorkerWatch(launcher_signal_handler).start()
    try:
        code = run_job(p, service, compactor, stop)
    finally:
        watch.stop()
    if watch.fired:
        code, stop.reason = 3, watch.fired
    return code


def option_names(*option_classes) -> list[str]:
    """The option names (dests) that ``option_classes`` define: what /events/status shows."""
    parser = argparse.ArgumentParser(add_help=False)
    for cls in option_classes:
        cls._add_argparse_args(parser)
    return [a.dest for a in parser._actions]


def shown_options(options: PipelineOptions) -> dict:
    """The job's own options and its runner, passwords redacted: for /events/status and the start line."""
    every = options.get_all_options()
    ours = {name: every.get(name)
            for name in option_names(AnalyticsOptions, StreamingOptions, ServiceOptions, LogOptions)}
    return redact_options(dict(ours, runner=every.get("runner")), redact)


def start_service(options: PipelineOptions) -> Optional[Service]:
    """Starts the analytics service before the pipeline runs (None when --http_port is 0); exits 2
    when it cannot listen."""
    sopts = options.view_as(ServiceOptions)
    if not int(sopts.http_port):
        return None
    shown = shown_options(options)
    try:
        service = Service.start(options.view_as(AnalyticsOptions), sopts.http_host, int(sopts.http_port), shown)
    except ServerError as e:
        fail(f"--http_host/--http_port: {e}")
    print(f"analytics service listening on {service.server.url} (dashboard: {service.server.url}/ ; "
          "/health, /metrics, /events/status, /events/replay, /dashboard/data, /learners/{id}, "
          "/concepts/hardest)", file=sys.stderr)
    return service


def main() -> int:
    """The console entry point (setup.py), and ``python -m pipelines.streaming``."""
    logs.configure_from(sys.argv[1:])
    return run()


if __name__ == "__main__":
    sys.exit(main())
