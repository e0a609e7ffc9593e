"""The streaming job: Kafka events -> validated, windowed analytics in Redis, Postgres and Kafka.

    python -m pipelines.streaming                       # runs until stopped (Ctrl-C / SIGTERM)
    python -m pipelines.streaming --until_idle 10       # drain what the topics hold, then exit 0

Flow: ReadEvents (one restriction per partition) -> DecodeAndValidate (bad
records to the dead-letter topic) -> ArchiveRawEvents (Postgres) and
WindowedMetrics (1m/5m/1h/1d, early/on-time/late panes) -> Redis, Postgres and
the aggregates topic. Run ``--help`` for every option.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult, PipelineState

from pipelines.options import AnalyticsOptions, check_options, help_if_asked, check_services, fail, use_local_runner
from transforms.aggregate import WindowedMetrics
from transforms.decode import DecodeAndValidate
from transforms.kafka_read import KafkaReadConfig, ReadEvents
from transforms.ledger import WindowLedger
from transforms.resume import LedgerCompactor, ResumePoint, SkipPublishedDeadLetters, resume_point
from transforms.sinks import AggregateSinks, WriteAggregates
from transforms.sinks.kafka_sink import PublishDeadLetters
from transforms.sinks.postgres_sink import ArchiveRawEvents

LOG = logging.getLogger("pipelines.streaming")
# Early panes of windows that ended longer ago than this are not written (a backlog).
CATCH_UP_AFTER_S = 60


class StreamingOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--until_idle", type=float, default=None,
                            help="exit 0 once no record has arrived for this many seconds, "
                                 "after flushing every window")
        parser.add_argument("--start_from", default="committed",
                            choices=["committed", "earliest", "latest"],
                            help="where to start a partition without a committed offset "
                                 "('committed' falls back to earliest)")


def read_config(opts: AnalyticsOptions) -> KafkaReadConfig:
    sopts = opts.view_as(StreamingOptions)
    return KafkaReadConfig(brokers=opts.brokers, group_id=opts.group_id, batch_size=opts.batch_size,
                           max_out_of_orderness_s=opts.max_out_of_orderness,
                           idle_timeout_s=sopts.until_idle, start_from=sopts.start_from)


def resume(opts: AnalyticsOptions) -> ResumePoint:
    """Offsets, window totals and decided records from where the group stopped."""
    return resume_point(read_config(opts), opts.topic_list(), WindowLedger(opts.postgres_dsn, opts.group_id),
                        opts.dlq_topic, min(opts.window_sizes_s()), opts.allowed_lateness * 1000)


def build(p: beam.Pipeline, opts: AnalyticsOptions, point: ResumePoint) -> None:
    """Wires the transforms; shared by ``run`` and the tests."""
    until_idle = opts.view_as(StreamingOptions).until_idle
    decoded = (p | "ReadEvents" >> ReadEvents(read_config(opts), partitions=point.partitions)
               | "DecodeAndValidate" >> DecodeAndValidate(max_future_ms=opts.max_future * 1000))
    retry = opts.sink_retry_config()
    refused = (decoded.events | "ArchiveRawEvents" >> ArchiveRawEvents(opts.postgres_dsn, retry)
               if opts.archive == "true" else None)
    windowed = decoded.events | "WindowedMetrics" >> WindowedMetrics(
        opts.window_sizes_s(), early_firing_s=opts.early_firing,
        allowed_lateness_s=opts.allowed_lateness, catch_up_after_s=CATCH_UP_AFTER_S,
        expire_state=until_idle is None, ledger=point.ledger,
        seeds=point.read_seeds(), dead_lettered=point.dead_lettered, retry=retry)
    # Each dead-letter stream gets its own producer step rather than a Flatten,
    # so that both stay fused with the reader: its offsets are committed only
    # once their bundle's dead letters are flushed.
    streams = [("", decoded.dead_letters), ("TooLate", windowed.too_late), ("FoldErrors", windowed.fold_errors)]
    if refused is not None:
        streams.append(("ArchiveErrors", refused))
    for label, letters in streams:
        (letters | f"SkipPublished{label}" >> SkipPublishedDeadLetters(point.dead_lettered)
         | f"PublishDeadLetters{label}" >> PublishDeadLetters(opts.brokers, opts.dlq_topic, retry))
    sinks = opts.sink_set()
    targets = AggregateSinks(redis_url=opts.redis_url if "redis" in sinks else None,
                             postgres_dsn=opts.postgres_dsn if "postgres" in sinks else None,
                             kafka_brokers=opts.brokers if "kafka" in sinks else None,
                             kafka_topic=opts.aggregates_topic, retry=retry)
    if targets.any():
        for label, aggregates in windowed.panes.items():
            aggregates | f"Write{label}" >> WriteAggregates(targets)


def print_summary(result: PipelineResult, seconds: float) -> None:
    """Counters of the run, for a person at the terminal."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception as e:  # a runner without metrics must not fail a finished job
        print(f"(no metrics from the runner: {e})", file=sys.stderr)
        return
    totals: dict[str, int] = {}
    for c in counters:
        if c.key.metric.namespace.startswith("beam"):
            continue  # the runner's own bookkeeping
        name = f"{c.key.metric.namespace}.{c.key.metric.name}"
        totals[name] = totals.get(name, 0) + (c.committed or c.attempted or 0)
    print(f"streaming job finished in {seconds:.1f}s")
    for name in sorted(totals):
        print(f"  {name:55s} {totals[name]:>12,}")


def run(argv: Optional[list[str]] = None) -> int:
    help_if_asked(argv, "python -m pipelines.streaming", __doc__.split("\n\n")[0], AnalyticsOptions, StreamingOptions)
    options = PipelineOptions(argv)
    check_options(options)
    opts = options.view_as(AnalyticsOptions)
    if not opts.topic_list():
        fail("--topics is empty")
    sinks = opts.sink_set()
    check_services(opts, redis_="redis" in sinks, postgres=True)  # Postgres holds the window ledger
    use_local_runner(options, streaming=True)

    try:
        point = resume(opts)
    except Exception as e:  # a service that went away since the checks, a dead-letter topic too long to read
        fail(f"cannot resume the consumer group {opts.group_id}: {type(e).__name__}: {e}")
    seeds = point.seeds
    print(f"resuming {len(point.partitions)} partitions: {seeds.windows} open windows to seed from "
          f"{seeds.rows} ledger rows (ready in {seeds.seconds:.2f}s), {len(point.dead_lettered)} records "
          "already dead-lettered", file=sys.stderr)
    p = beam.Pipeline(options=options)
    build(p, opts, point)
    began = time.monotonic()
    result = p.run()
    compactor = LedgerCompactor(read_config(opts), point.partitions, point.ledger,
                                min(opts.window_sizes_s()), opts.allowed_lateness * 1000)
    compactor.start()

    def stop(signum, _frame):
        LOG.warning("signal %d: cancelling the job", signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        state = result.wait_until_finish()
    except KeyboardInterrupt:
        compactor.stop()
        print("stopping: cancelling the job (offsets of finished bundles are committed)", file=sys.stderr)
        try:
            result.cancel()
        except Exception as e:  # already gone is fine when stopping
            LOG.info("cancel: %s", e)
        return 0
    compactor.stop()
    print_summary(result, time.monotonic() - began)
    if state != PipelineState.DONE:
        print(f"error: job ended in state {state}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run())
