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
import shutil
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineState
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipelines.options import AnalyticsOptions, check_options, help_if_asked, check_services, fail
from schemas.settings import parse_instant
from transforms.aggregate import WindowedMetrics
from transforms.archive_read import ReadArchivedEvents
from transforms.dataset import WriteTrainingDataset, arrange_partitions
from transforms.decode import DecodeAndValidate
from transforms.kafka_range import (BadRangeRequest, ResolvedRange, parse_offsets, resolve_offsets,
                                    resolve_time_range)
from transforms.kafka_read import KafkaReadConfig, ReadEvents
from transforms.sinks.kafka_sink import PublishDeadLetters
from transforms.sinks.postgres_sink import WriteMetricsToPostgres

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


def _millis(text: str, name: str) -> int:
    try:
        return int(parse_instant(text).timestamp() * 1000)
    except ValueError as e:
        fail(f"--{name} {e}")


def resolve(opts: AnalyticsOptions, ropts: ReplayOptions) -> tuple[ResolvedRange, Optional[tuple[int, int]]]:
    """The offsets to read, and the time range when one was asked for; exits 2 on a bad request."""
    config = KafkaReadConfig(brokers=opts.brokers, commit_offsets=False)
    try:
        if ropts.offsets:
            if ropts.start or ropts.end:
                raise BadRangeRequest("give either --offsets or --start/--end, not both")
            return resolve_offsets(config, parse_offsets(ropts.offsets)), None
        if not (ropts.start and ropts.end):
            raise BadRangeRequest("give --start and --end, or --offsets")
        span = (_millis(ropts.start, "start"), _millis(ropts.end, "end"))
        return resolve_time_range(config, opts.topic_list(), *span), span
    except BadRangeRequest as e:
        fail(str(e))


class ReplayProgress(threading.Thread):
    """Prints "read X of Y records" every ``every_s`` while the job runs.

    The readers run in the runner's worker processes; they commit their
    positions to a throwaway consumer group (``group``) as they go, and this
    thread reads those offsets. The group is deleted at the end.
    """

    def __init__(self, brokers: str, rng: ResolvedRange, every_s: float = 5.0):
        super().__init__(daemon=True, name="replay-progress")
        self.brokers, self.rng, self.every_s = brokers, rng, every_s
        self.group = f"replay-progress-{uuid.uuid4().hex[:12]}"
        self.done = threading.Event()

    def read_so_far(self, consumer: Consumer) -> int:
        specs = self.rng.partitions
        committed = consumer.committed([TopicPartition(s.topic, s.partition) for s in specs], timeout=5)
        return sum(min(c.offset, s.stop) - s.start for c, s in zip(committed, specs) if c.offset > s.start)

    def run(self) -> None:
        total, began = self.rng.total_records, time.monotonic()
        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": self.group})
        try:
            while True:
                finishing = self.done.wait(self.every_s)  # one last line once the job ended
                read = self.read_so_far(consumer)
                rate = read / (time.monotonic() - began)
                print(f"replay: read {read:,} of {total:,} records ({100 * read / max(total, 1):.0f}%), "
                      f"{rate:,.0f}/s", file=sys.stderr, flush=True)
                if finishing:
                    break
        except Exception as e:  # progress is a courtesy; it never fails the replay
            LOG.warning("progress reporting stopped: %s", e)
        finally:
            consumer.close()

    def finish(self) -> None:
        self.done.set()
        self.join(10)
        admin = AdminClient({"bootstrap.servers": self.brokers})  # kept: its futures die with it
        try:
            for future in admin.delete_consumer_groups([self.group], request_timeout=10).values():
                future.result(timeout=15)
        except Exception:
            pass  # a group that never committed does not exist


def build(p: beam.Pipeline, opts: AnalyticsOptions, ropts: ReplayOptions, rng: ResolvedRange,
          span: Optional[tuple[int, int]], dataset_dir: Optional[str], temp_dir: Optional[str],
          progress: Optional[ReplayProgress] = None) -> None:
    gauge = {"group_id": progress.group, "progress_commit_s": progress.every_s / 2} if progress else {}
    config = KafkaReadConfig(brokers=opts.brokers, batch_size=opts.batch_size, commit_offsets=False, **gauge)
    decoded = (p | "ReadEvents" >> ReadEvents(config, partitions=rng.partitions)
               | "DecodeAndValidate" >> DecodeAndValidate(max_future_ms=opts.max_future * 1000))
    events = decoded.events
    if rng.archive_gaps:
        archived = p | "ReadArchivedEvents" >> ReadArchivedEvents(opts.postgres_dsn, rng.archive_gaps)
        events = (events, archived) | "KafkaAndArchive" >> beam.Flatten()
    if dataset_dir:
        events | "WriteTrainingDataset" >> WriteTrainingDataset(dataset_dir, temp_dir)
    if ropts.aggregates:
        panes = events | "WindowedMetrics" >> WindowedMetrics(
            opts.window_sizes_s(), early_firing_s=None, allowed_lateness_s=opts.allowed_lateness,
            expire_state=False)
        for label, aggregates in panes.panes.items():
            if span is not None:  # a window cut by the range would overwrite a whole one with a part
                aggregates = aggregates | f"WholeWindows{label}" >> beam.Filter(
                    lambda a, lo=span[0], hi=span[1]: lo <= a.window_start_ms and a.window_end_ms <= hi)
            aggregates | f"Write{label}" >> WriteMetricsToPostgres(opts.postgres_dsn, "window_metrics_replay")
    if ropts.dead_letters:
        decoded.dead_letters | "PublishDeadLetters" >> PublishDeadLetters(opts.brokers, opts.dlq_topic)


def manifest(result, rng: ResolvedRange, ropts: ReplayOptions, seconds: float) -> dict:
    """What the dataset holds, from the job's own counters."""
    counters, offsets = {}, {}
    metrics = result.metrics().query()
    for c in metrics["counters"]:
        key = f"{c.key.metric.namespace}.{c.key.metric.name}"
        counters[key] = counters.get(key, 0) + (c.committed or 0)
    for d in metrics["distributions"]:
        if d.key.metric.name.startswith("offsets:"):
            _, topic, partition = d.key.metric.name.rsplit(":", 2)
            r = d.committed
            offsets[f"{topic}:{partition}"] = {"first": r.min, "last": r.max}
    per_type = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("WriteTrainingDataset.")}
    return {
        "requested": {"start": ropts.start, "end": ropts.end, "offsets": ropts.offsets},
        "partitions": [{"topic": s.topic, "partition": s.partition, "start": s.start, "stop": s.stop,
                        "read": offsets.get(f"{s.topic}:{s.partition}")} for s in rng.partitions],
        "records_in_range": rng.total_records,
        "records_read": counters.get("ReadEvents.records_read", 0),
        "archive": {"used": bool(rng.archive_gaps),
                    "gaps": [g._asdict() for g in rng.archive_gaps],
                    "events_read": counters.get("ReadArchivedEvents.events_read", 0)},
        "events_by_type_and_schema_version": dict(sorted(per_type.items())),
        "valid_events": counters.get("DecodeAndValidate.valid_events", 0)
        + counters.get("ReadArchivedEvents.events_read", 0),
        "dead_letters_by_code": {k.split("dead_letters_", 1)[1]: v for k, v in sorted(counters.items())
                                 if k.startswith("DecodeAndValidate.dead_letters_")},
        "seconds": round(seconds, 1),
        "written_at": datetime.now(timezone.utc).isoformat(),
    }


def run(argv: Optional[list[str]] = None) -> int:
    help_if_asked(argv, "python -m pipelines.replay", __doc__.split("\n\n")[0], AnalyticsOptions, ReplayOptions)
    options = PipelineOptions(argv)
    check_options(options)
    opts, ropts = options.view_as(AnalyticsOptions), options.view_as(ReplayOptions)
    if not (ropts.output or ropts.aggregates or ropts.dead_letters):
        fail("choose an output: --output DIR, --aggregates and/or --dead_letters")
    output = os.path.abspath(ropts.output) if ropts.output else None
    if output and os.path.exists(output) and not ropts.overwrite:
        fail(f"{output} exists; pass --overwrite to replace it")
    check_services(opts, redis_=False, postgres=ropts.aggregates or bool(ropts.output))
    rng, span = resolve(opts, ropts)
    print(f"replay: {rng.total_records:,} records in {len(rng.partitions)} partition ranges"
          + (f", plus the archive for {len(rng.archive_gaps)} partitions" if rng.archive_gaps else ""),
          file=sys.stderr)

    options.view_as(StandardOptions).runner = options.view_as(StandardOptions).runner or "DirectRunner"
    options.view_as(DirectOptions).direct_num_workers = ropts.workers
    options.view_as(DirectOptions).direct_running_mode = "multi_processing" if ropts.workers > 1 else "in_memory"
    staging = f"{output}.tmp-{uuid.uuid4().hex[:8]}" if output else None
    began = time.monotonic()
    progress = ReplayProgress(opts.brokers, rng, ropts.progress_every)
    try:
        p = beam.Pipeline(runner=_batch_runner(options), options=options)
        build(p, opts, ropts, rng, span, os.path.join(staging, "data") if staging else None,
              os.path.join(staging, "_temp") if staging else None, progress)
        progress.start()
        result = p.run()
        state = result.wait_until_finish()
        progress.finish()
        if state != PipelineState.DONE:
            raise RuntimeError(f"job ended in state {state}")
        summary = manifest(result, rng, ropts, time.monotonic() - began)
        if staging:
            _publish(staging, output, summary, ropts.overwrite)
    except Exception as e:  # a failed replay leaves nothing that looks complete
        if progress.is_alive():
            progress.finish()
        if staging and os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
        LOG.debug("replay failed", exc_info=True)
        print(f"error: replay failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("records_in_range", "records_read", "valid_events",
                                               "dead_letters_by_code", "seconds")}))
    if output:
        print(f"dataset: {output}", file=sys.stderr)
    return 0


def _batch_runner(options: PipelineOptions):
    """Beam's batch runner (what the DirectRunner uses for bounded jobs), unless one was chosen."""
    if options.view_as(StandardOptions).runner not in (None, "DirectRunner"):
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    return FnApiRunner()


def _publish(staging: str, output: str, summary: dict, overwrite: bool) -> None:
    """Moves the finished dataset into place, manifest first written beside it."""
    shutil.rmtree(os.path.join(staging, "_temp"), ignore_errors=True)
    data = os.path.join(staging, "data")
    os.makedirs(data, exist_ok=True)
    summary["files"] = arrange_partitions(data)
    with open(os.path.join(data, "_manifest.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if overwrite and os.path.exists(output):
        shutil.rmtree(output)
    os.rename(data, output)
    shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run())
