"""The replay job: the streaming transforms as a bounded job over archived offsets.

    python -m pipelines.replay --start 2026-11-28T08:00:00Z --end 2026-11-28T09:00:00Z \\
        --output /data/training/2026-11-28T08 --aggregates
    python -m pipelines.replay --offsets learning.events.v1:0:100-5000 --output out/ds

Reads an offset range per partition (from event times through offsets-for-times,
or given), decodes and validates with the very same DecodeAndValidate, and writes:

- ``--output DIR``: the valid events as Parquet (event_date=/event_type=
  folders) with ``_manifest.json`` (range asked, offsets read per partition,
  counts per event type and schema version, dead letters by code, archive use).
  Written to ``DIR.tmp-*`` and renamed into place only when the job succeeded;
  an existing DIR is refused unless ``--overwrite``.
- ``--aggregates``: the windows recomputed by the same WindowedMetrics, into
  ``window_metrics_replay`` (upserted: a second run leaves the same rows).
  With a time range, only windows wholly inside it are written.
- ``--dead_letters``: the range's dead letters, to the dead-letter topic.

Where retention already deleted the start of the range, those events come
from the Postgres raw-event archive, and the manifest says so. Runs on Beam's
batch runner with one worker process per core.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from pipelines import logs
from pipelines.options import AnalyticsOptions, LogOptions, check_options, fail, help_if_asked, use_batch_runner
from pipelines.preflight import check_services
from transforms.aggregate import WindowedMetrics
from transforms.archive_read import ReadArchivedEvents
from transforms.dataset import WriteTrainingDataset
from transforms.dataset_staging import StagedDataset
from transforms.dead_letter_streams import DeadLetterTopic, PublishDeadLetterStreams
from transforms.kafka_range import BadRangeRequest, ResolvedRange
from transforms.kafka_read import KafkaReadConfig
from transforms.metrics_to_sinks import WindowedMetricsToSinks
from transforms.replay_manifest import replay_manifest
from transforms.replay_progress import ReplayProgress
from transforms.replay_request import check_outputs, resolve_request
from transforms.sinks import AggregateSinks
from transforms.valid_events import ReadValidEvents

LOG = logging.getLogger("pipelines.replay")


class ReplayOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--start", help="range start, ISO-8601 with a zone (event time)")
        parser.add_argument("--end", help="range end, exclusive")
        parser.add_argument("--offsets", help="instead of times: topic:partition:start-end,...")
        parser.add_argument("--output", help="folder for the Parquet training dataset")
        parser.add_argument("--aggregates", action="store_true",
                            help="recompute the windows into Postgres window_metrics_replay")
        parser.add_argument("--dead_letters", action="store_true",
                            help="publish the range's dead letters to the dead-letter topic")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
        parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                            help="worker processes of the batch runner")
        parser.add_argument("--progress_every", type=float, default=5.0,
                            help="seconds between progress lines (records read of the range) on stderr")


def resolve(opts: AnalyticsOptions, ropts: ReplayOptions) -> tuple[ResolvedRange, Optional[tuple[int, int]]]:
    """The offsets to read, and the time range when one was asked for; exits 2 on a bad request."""
    config = KafkaReadConfig(brokers=opts.brokers, commit_offsets=False)
    try:
        return resolve_request(config, opts.topic_list(), ropts.start, ropts.end, ropts.offsets)
    except BadRangeRequest as e:
        fail(str(e))


def build(p: beam.Pipeline, opts: AnalyticsOptions, ropts: ReplayOptions, offsets: ResolvedRange,
          span: Optional[tuple[int, int]], dataset: Optional[StagedDataset],
          progress: Optional[ReplayProgress] = None) -> None:
    """Wires the transforms for the request; connects to nothing, exits nothing."""
    config = KafkaReadConfig(brokers=opts.brokers, batch_size=opts.batch_size, commit_offsets=False,
                             **(progress.reader_settings() if progress else {}))
    decoded = p | "ValidEvents" >> ReadValidEvents(config, offsets.partitions, opts.max_future * 1000)
    events = decoded.events
    if offsets.archive_gaps:
        archived = p | "ReadArchivedEvents" >> ReadArchivedEvents(opts.postgres_dsn, offsets.archive_gaps)
        events = (events, archived) | "KafkaAndArchive" >> beam.Flatten()
    if dataset:
        events | "WriteTrainingDataset" >> WriteTrainingDataset(dataset.data_dir, dataset.temp_dir)
    if ropts.aggregates:
        events | "Windows" >> WindowedMetricsToSinks(
            WindowedMetrics(opts.window_sizes_s(), early_firing_s=None,
                            allowed_lateness_s=opts.allowed_lateness, expire_state=False),
            AggregateSinks(postgres_dsn=opts.postgres_dsn, postgres_table="window_metrics_replay",
                           retry=opts.sink_retry_config()),
            within=span)
    if ropts.dead_letters:
        {"": decoded.dead_letters} | "DeadLetters" >> PublishDeadLetterStreams(
            DeadLetterTopic(opts.brokers, opts.dlq_topic, opts.sink_retry_config()))


def run(argv: Optional[list[str]] = None) -> int:
    help_if_asked(argv, "python -m pipelines.replay", __doc__.split("\n\n")[0], AnalyticsOptions, ReplayOptions,
                  LogOptions)
    options = PipelineOptions(argv)
    check_options(options)
    opts, ropts = options.view_as(AnalyticsOptions), options.view_as(ReplayOptions)
    try:
        output = check_outputs(ropts.output, ropts.aggregates, ropts.dead_letters, ropts.overwrite)
    except BadRangeRequest as e:
        fail(str(e))
    check_services(opts, redis_=False, postgres=ropts.aggregates or bool(ropts.output))
    offsets, span = resolve(opts, ropts)
    print(logs.tag(f"replay: {offsets.total_records:,} records in {len(offsets.partitions)} partition ranges"
                   + (f", plus the archive for {len(offsets.archive_gaps)} partitions" if offsets.archive_gaps
                      else "")), file=sys.stderr)

    runner = use_batch_runner(options, ropts.workers)
    dataset = StagedDataset(output) if output else None
    _ask_beam_about_ipython_now()
    began = time.monotonic()
    progress = ReplayProgress(opts.brokers, offsets, ropts.progress_every, suffix=logs.tag(""))
    try:
        p = beam.Pipeline(runner=runner, options=options)
        build(p, opts, ropts, offsets, span, dataset, progress)
        progress.start()
        result = p.run()
        state = result.wait_until_finish()
        _PUBLISHING.set()  # from here SIGTERM waits: the output appears whole or not at all
        progress.finish()
        if state != PipelineState.DONE:
            raise RuntimeError(f"job ended in state {state}")
        requested = {"start": ropts.start, "end": ropts.end, "offsets": ropts.offsets}
        summary = replay_manifest(result, offsets, requested, time.monotonic() - began)
        if dataset:
            dataset.publish(summary, ropts.overwrite)
    except (Exception, Terminated) as e:  # a failed replay leaves nothing that looks complete
        if progress.is_alive():
            progress.finish()
        if dataset:
            dataset.discard()
        LOG.debug("replay failed", exc_info=True)
        print(logs.tag(f"error: replay failed: {type(e).__name__}: {e}"), file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("records_in_range", "records_read", "valid_events",
                                               "dead_letters_by_code", "seconds")}))
    if output:
        print(logs.tag(f"dataset: {output}"), file=sys.stderr)
    return 0


def _ask_beam_about_ipython_now() -> None:
    """Beam 2.77 asks ``is_in_ipython()`` on every ``apply`` and again as ``Pipeline.run``
    ends, and that imports IPython wherever it is installed: 0.3 to 1 s of the job's own
    time (measured with py-spy on a 200,000-event replay). Asked once here, with the other
    start-up imports, the job's time is the job's; the answer is the same (an import is
    cached). tests/test_runner_behaviours.py pins that Beam still asks."""
    from apache_beam.utils.interactive_utils import is_in_ipython
    is_in_ipython()


class Terminated(BaseException):
    """SIGTERM arrived before the output was being published: the replay stops, publishing nothing.
    A BaseException, like KeyboardInterrupt: the runner's own ``except Exception`` must not swallow it."""


_PUBLISHING = threading.Event()


def _on_sigterm(signum: int, frame) -> None:
    # Raised in the main thread wherever it waits (the job's end, mostly), so
    # run()'s failure path discards the staging folder and the progress group.
    # Once publishing began (one rename) it is let finish.
    if not _PUBLISHING.is_set():
        raise Terminated("stopped by SIGTERM; nothing was published")


def _log_thread_failure(args: threading.ExceptHookArgs) -> None:
    # A runner thread that fails (e.g. a worker stopped by SIGTERM) is one log line,
    # with the correlation id like every other; the job's own error line follows.
    LOG.error("thread %s failed: %s: %s", getattr(args.thread, "name", "?"), args.exc_type.__name__,
              args.exc_value)
    LOG.debug("thread failure", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def main() -> int:
    """The console entry point (setup.py), and ``python -m pipelines.replay``.
    SIGTERM stops a replay cleanly: exit code 1, no dataset, no staging folder."""
    logs.configure_from(sys.argv[1:])
    signal.signal(signal.SIGTERM, _on_sigterm)
    threading.excepthook = _log_thread_failure
    try:
        return run()
    except Terminated as e:  # before the job started: nothing to clean up
        print(logs.tag(f"error: replay failed: {e}"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
