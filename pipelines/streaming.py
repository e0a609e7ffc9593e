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

from pipelines.options import AnalyticsOptions, check_options, check_services, fail, use_local_runner
from transforms.aggregate import WindowedMetrics
from transforms.decode import DecodeAndValidate
from transforms.kafka_read import KafkaReadConfig, ReadEvents
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


def build(p: beam.Pipeline, opts: AnalyticsOptions) -> None:
    """Wires the transforms; shared by ``run`` and the tests."""
    until_idle = opts.view_as(StreamingOptions).until_idle
    config = KafkaReadConfig(brokers=opts.brokers, group_id=opts.group_id, batch_size=opts.batch_size,
                             max_out_of_orderness_s=opts.max_out_of_orderness,
                             idle_timeout_s=until_idle,
                             start_from=opts.view_as(StreamingOptions).start_from)
    decoded = (p | "ReadEvents" >> ReadEvents(config, topics=opts.topic_list())
               | "DecodeAndValidate" >> DecodeAndValidate(max_future_ms=opts.max_future * 1000))
    decoded.dead_letters | "PublishDeadLetters" >> PublishDeadLetters(opts.brokers, opts.dlq_topic)
    if opts.archive == "true":
        decoded.events | "ArchiveRawEvents" >> ArchiveRawEvents(opts.postgres_dsn)
    panes = decoded.events | "WindowedMetrics" >> WindowedMetrics(
        opts.window_sizes_s(), early_firing_s=opts.early_firing,
        allowed_lateness_s=opts.allowed_lateness, catch_up_after_s=CATCH_UP_AFTER_S,
        expire_state=until_idle is None)
    sinks = opts.sink_set()
    targets = AggregateSinks(redis_url=opts.redis_url if "redis" in sinks else None,
                             postgres_dsn=opts.postgres_dsn if "postgres" in sinks else None,
                             kafka_brokers=opts.brokers if "kafka" in sinks else None,
                             kafka_topic=opts.aggregates_topic)
    if targets.any():
        for label, aggregates in panes.items():
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
    options = PipelineOptions(argv)
    check_options(options)
    opts = options.view_as(AnalyticsOptions)
    if not opts.topic_list():
        fail("--topics is empty")
    sinks = opts.sink_set()
    check_services(opts, redis_="redis" in sinks,
                   postgres="postgres" in sinks or opts.archive == "true")
    use_local_runner(options, streaming=True)

    p = beam.Pipeline(options=options)
    build(p, opts)
    began = time.monotonic()
    result = p.run()

    def stop(signum, _frame):
        LOG.warning("signal %d: cancelling the job", signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        state = result.wait_until_finish()
    except KeyboardInterrupt:
        print("stopping: cancelling the job (offsets of finished bundles are committed)", file=sys.stderr)
        try:
            result.cancel()
        except Exception as e:  # already gone is fine when stopping
            LOG.info("cancel: %s", e)
        return 0
    print_summary(result, time.monotonic() - began)
    if state != PipelineState.DONE:
        print(f"error: job ended in state {state}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run())
