"""Command-line options shared by the streaming and replay pipelines.

Every option defaults to the environment variable of the deployment seed when
it is set (KAFKA_BROKERS, REDIS_URL, ANALYTICS_GROUP_ID, BATCH_SIZE,
WINDOW_SIZE_MS, POSTGRES_DSN), else to the local stack of scripts/stack.sh.

:func:`check_options` checks them all before anything connects or builds: a
number that is not one, or is zero or negative where that makes no sense, a
malformed broker list, Redis URL or Postgres DSN, each stop the job with one
``error:`` line naming the option (and the environment variable it came from)
and exit code 2. Parsing never raises on its own: numbers are converted
leniently and a value that does not convert is left as text for the check to
name, since argparse would print its usage and Beam's parser could fail while
merely being built.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import sys
from typing import Any, NamedTuple, Optional

import psycopg2.extensions
import redis.connection
from apache_beam.options.pipeline_options import (DebugOptions, DirectOptions, PipelineOptions, PortableOptions,
                                                  PrismRunnerOptions, StandardOptions)
from apache_beam.runners.runner import PipelineRunner

from pipelines import logs
from pipelines.logs import tag
from schemas.settings import WINDOW_SIZES_S, redact, setting  # noqa: F401  (redact: for the commands)
from schemas.topics import AGGREGATES_TOPIC, ALERTS_TOPIC, DLQ_TOPIC, EVENT_TOPICS
from transforms.sinks import AggregateSinks
from transforms.sinks.resilience import SinkRetryConfig

PRISM_NO_SPLITS = "prism_disable_sdf_split"  # see use_local_runner
DEFAULT_PRISM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             ".stack", "bin", "prism")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def lenient(kind: type):
    """An argparse ``type`` that never raises: ``kind(text)``, or ``text`` itself
    when it does not convert, for :func:`check_options` to name."""
    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            return text
    convert.__name__ = kind.__name__
    return convert


def default_window_sizes() -> str:
    """1m, 5m, 1h, 1d; WINDOW_SIZE_MS, when set, replaces the finest size.

    Never raises: a WINDOW_SIZE_MS that is not a positive multiple of 1000 is
    left out here and refused by :func:`check_options`, which can name it.
    """
    sizes = list(WINDOW_SIZES_S)
    ms = lenient(int)(os.environ.get("WINDOW_SIZE_MS") or "")
    if isinstance(ms, int) and ms > 0 and ms % 1000 == 0:
        sizes[0] = ms // 1000
    return ",".join(str(s) for s in sorted(set(sizes)))


class AnalyticsOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("learning analytics")
        g.add_argument("--brokers", default=setting("KAFKA_BROKERS"),
                       help="Kafka bootstrap servers [KAFKA_BROKERS]")
        g.add_argument("--topics", default=",".join(EVENT_TOPICS), help="comma-separated event topics")
        g.add_argument("--dlq_topic", default=DLQ_TOPIC, help="where dead letters are published")
        g.add_argument("--aggregates_topic", default=AGGREGATES_TOPIC,
                       help="where the Kafka sink publishes window aggregates")
        g.add_argument("--alerts_topic", default=ALERTS_TOPIC,
                       help="where anomaly alerts are published (schema 'alert')")
        g.add_argument("--group_id", default=setting("ANALYTICS_GROUP_ID"),
                       help="Kafka consumer group whose offsets are committed [ANALYTICS_GROUP_ID]")
        g.add_argument("--redis_url", default=setting("REDIS_URL"),
                       help="Redis for the real-time values [REDIS_URL]")
        g.add_argument("--postgres_dsn", default=setting("POSTGRES_DSN"),
                       help="Postgres for the archive, the window ledger and window_metrics [POSTGRES_DSN]")
        g.add_argument("--batch_size", type=lenient(int), default=setting("BATCH_SIZE"),
                       help="most records per Kafka poll, the unit of work [BATCH_SIZE]")
        g.add_argument("--window_sizes", default=default_window_sizes(),
                       help="comma-separated window sizes in seconds [WINDOW_SIZE_MS replaces the first]")
        g.add_argument("--allowed_lateness", type=lenient(int), default=3600,
                       help="seconds after a window closes in which late events still update it")
        g.add_argument("--early_firing", type=lenient(float), default=5,
                       help="seconds between early (speculative) panes of an open 1-minute window, "
                            "fractions allowed (e.g. 0.5 for lower latency, at more sink writes); "
                            "larger windows fire at most every max(this, size / 60 up to 60) s")
        g.add_argument("--max_out_of_orderness", type=lenient(float), default=5.0,
                       help="seconds the watermark trails the newest record time")
        g.add_argument("--max_future", type=lenient(int), default=300,
                       help="seconds an event time may be ahead of the clock before it is a dead letter")
        g.add_argument("--sinks", default="redis,postgres,kafka",
                       help="which aggregate sinks to write: any of redis,postgres,kafka")
        g.add_argument("--archive", default="true", choices=["true", "false"],
                       help="archive every valid event in Postgres raw_events")
        g.add_argument("--prism_path", default=_env("PRISM_PATH", DEFAULT_PRISM),
                       help="Prism runner binary, built by scripts/stack.sh [PRISM_PATH]")
        # Sink retries and circuit breakers (transforms/sinks/resilience.py).
        g.add_argument("--sink_retries", type=lenient(int), default=3,
                       help="attempts of a sink write (the first included, with jittered exponential "
                            "back-off) before that sink's circuit breaker opens and holds writes")
        g.add_argument("--sink_probe_interval", type=lenient(float), default=2.0,
                       help="seconds between probes of a sink whose circuit breaker is open")

    def topic_list(self) -> list[str]:
        return [t.strip() for t in self.topics.split(",") if t.strip()]

    def window_sizes_s(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.window_sizes.split(","))

    def sink_retry_config(self) -> SinkRetryConfig:
        """--sink_retries and --sink_probe_interval, for every sink DoFn (check_options refused bad ones)."""
        return SinkRetryConfig(retries=int(self.sink_retries), probe_interval_s=float(self.sink_probe_interval))

    def sink_set(self) -> set[str]:
        """The chosen aggregate sinks; 'none' for none (e.g. to measure the pipeline alone).

        Pure: check_options refused unknown names before anything is built."""
        return _sink_names(self.sinks) - {"none"}

    def aggregate_sinks(self) -> AggregateSinks:
        """Where the streaming job writes its panes: the --sinks chosen, with their addresses."""
        chosen = self.sink_set()
        return AggregateSinks(redis_url=self.redis_url if "redis" in chosen else None,
                              postgres_dsn=self.postgres_dsn if "postgres" in chosen else None,
                              kafka_brokers=self.brokers if "kafka" in chosen else None,
                              kafka_topic=self.aggregates_topic, retry=self.sink_retry_config())


class ServiceOptions(PipelineOptions):
    """The analytics service beside the streaming job (service/): HTTP health, status, metrics, replay."""
    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("analytics service")
        g.add_argument("--http_host", default="127.0.0.1",
                       help="address the HTTP service listens on (0.0.0.0: every interface)")
        g.add_argument("--http_port", type=lenient(int), default=lenient(int)(_env("HTTP_PORT", "8080")),
                       help="port of /health, /metrics, /events/status and /events/replay; 0 turns "
                            "the service off [HTTP_PORT]")


class LogOptions(PipelineOptions):
    """How the command logs (pipelines/logs.py reads these before the options are parsed)."""
    @classmethod
    def _add_argparse_args(cls, parser):
        logs.add_arguments(parser.add_argument_group("logs"))


def help_if_asked(argv: Optional[list], prog: str, description: str, *option_classes) -> None:
    """Answers -h/--help with every option of ``option_classes``, its default
    and environment variable, then exits 0. (Beam's PipelineOptions(argv)
    answers --help with a parser that knows none of them.)"""
    args = sys.argv[1:] if argv is None else argv
    if not {"-h", "--help"} & set(args):
        return
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Beam's own pipeline options (--runner, --prism_location, ...) are accepted too.")
    for cls in option_classes:
        cls._add_argparse_args(parser)
    parser.print_help()
    sys.exit(0)


def use_local_runner(options: PipelineOptions, streaming: bool) -> None:
    """DirectRunner means Beam's local Prism runner, handed our own build.

    The Python DirectRunner would try to download Prism (impossible offline)
    and silently fall back to a runner on which event-time windows over an
    unbounded read never fire; so we select Prism explicitly.
    """
    std = options.view_as(StandardOptions)
    std.streaming = streaming
    if std.runner in (None, "DirectRunner", "PrismRunner"):
        std.runner = "PrismRunner"
        prism = options.view_as(AnalyticsOptions).prism_path
        if not os.path.exists(prism):
            fail(f"Prism runner not found at {prism}: run scripts/stack.sh up, or pass --prism_path")
        options.view_as(PrismRunnerOptions).prism_location = prism
        # Prism 2.77 splits a bundle of any stage that shows no progress for
        # about 200 ms (common on a loaded machine), and a split bundle of a
        # stateful step writes back the state it read, undoing what the
        # split-off rest added meanwhile: a window total lost one pane in about
        # one loaded 200,000-event drain in five (12 of 63; 0 of 40 with this).
        # The reader's own checkpoints are unaffected. Delete when Prism keeps
        # state across splits; `python -m scripts.benchmark --drains 20 --load 2
        # --pipeline-arg=--experiments=...` shows whether it does, and
        # test_the_local_runner_does_not_split_bundles pins the setting.
        options.view_as(DebugOptions).add_experiment(PRISM_NO_SPLITS)
        if streaming:
            no_stream_deadline(options)


# Beam's own default of --job_server_timeout (PortableOptions).
BEAM_JOB_SERVER_TIMEOUT_S = 300


def no_stream_deadline(options: PipelineOptions) -> None:
    """An open-ended job must not end after --job_server_timeout.

    Beam 2.77's PortableRunner (which PrismRunner submits through) opens the
    job's state and message streams with that gRPC deadline, 300 s by
    default: the launcher's wait then fails with DEADLINE_EXCEEDED and a
    streaming job exits 1 after five minutes (apache/beam#35867). Left at
    Beam's default, it becomes None (no deadline); the same value bounds only
    the describe-options and prepare calls to Prism, which answer at once.
    An explicit other value is kept. Delete when the runner puts no deadline
    on the streams; test_prism_ends_a_job_at_the_job_server_timeout pins it.
    """
    portable = options.view_as(PortableOptions)
    if portable.job_server_timeout == BEAM_JOB_SERVER_TIMEOUT_S:
        portable.job_server_timeout = None


def use_batch_runner(options: PipelineOptions, workers: int) -> Optional[PipelineRunner]:
    """Beam's batch runner (what the DirectRunner uses for bounded jobs) with
    ``workers`` processes, unless another runner was chosen (then None: Beam's own)."""
    std = options.view_as(StandardOptions)
    std.runner = std.runner or "DirectRunner"
    direct = options.view_as(DirectOptions)
    direct.direct_num_workers = workers
    direct.direct_running_mode = "multi_processing" if workers > 1 else "in_memory"
    if std.runner != "DirectRunner":
        return None
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    return FnApiRunner()


def fail(message: str, code: int = 2) -> None:
    print(tag(f"error: {message}"), file=sys.stderr)
    sys.exit(code)


class _Number(NamedTuple):
    """What a numeric option must be."""
    kind: type                 # int or float
    low: float                 # the smallest sensible value...
    low_allowed: bool          # ...and whether it is itself allowed
    high: Optional[float]      # the largest, if there is one
    give: str                  # what to give instead, for the message


# Every numeric option, of whichever PipelineOptions class (a class not imported
# in this process, such as ReplayOptions in the streaming job, is skipped).
NUMERIC_OPTIONS = {
    # confluent_kafka's consume() refuses more than 1M messages at once.
    "batch_size": _Number(int, 1, True, 1_000_000, "a whole number of records per Kafka poll from 1 "
                                                   "to 1000000, e.g. 2000"),
    "allowed_lateness": _Number(int, 0, True, None, "a whole number of seconds, 0 or more, e.g. 3600"),
    # 0 would ask for early panes continuously; below 0.1 s the sinks would rewrite the
    # same rows many times a second.
    "early_firing": _Number(float, 0.1, True, None, "a number of seconds, 0.1 or more, e.g. 5 or 0.5"),
    "max_out_of_orderness": _Number(float, 0, True, None, "a number of seconds, 0 or more, e.g. 5"),
    "max_future": _Number(int, 0, True, None, "a whole number of seconds, 0 or more, e.g. 300"),
    "until_idle": _Number(float, 0, False, None, "a number of seconds above 0, e.g. 10"),
    "stall_timeout": _Number(float, 0, True, None, "a number of seconds, or 0 to turn the watchdog off, e.g. 300"),
    "workers": _Number(int, 1, True, None, "a whole number of worker processes, 1 or more, e.g. 4"),
    "worker_processes": _Number(int, 1, True, None, "a whole number of worker processes, 1 or more, e.g. 2"),
    "read_chains": _Number(int, 1, True, None, "a whole number of reads, 1 or more, e.g. 2"),
    "progress_every": _Number(float, 0, False, None, "a number of seconds above 0, e.g. 5"),
    "sink_retries": _Number(int, 1, True, None, "a whole number of attempts, 1 or more, e.g. 3"),
    "sink_probe_interval": _Number(float, 0, False, None, "a number of seconds above 0, e.g. 2"),
    "http_port": _Number(int, 0, True, 65535, "a port from 1 to 65535, or 0 to turn the service off, e.g. 8080"),
}
# Where an option's default comes from when it is not on the command line.
ENV_OF = {"brokers": "KAFKA_BROKERS", "group_id": "ANALYTICS_GROUP_ID", "redis_url": "REDIS_URL",
          "postgres_dsn": "POSTGRES_DSN", "batch_size": "BATCH_SIZE", "prism_path": "PRISM_PATH",
          "http_port": "HTTP_PORT"}
_BROKER = re.compile(r"(?:[A-Za-z_]+://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(\d+))?")
_WINDOW_SIZES_GIVE = "comma-separated whole seconds above 0, e.g. 60,300,3600,86400"


def check_options(options: PipelineOptions) -> None:
    """Exits 2 with one ``error:`` line at the first option that cannot work.

    In: the job's options (any view), before anything connects or builds. Out:
    nothing; the options are left as they are. Checks every option argparse
    knows (its own errors become one line), every number of
    :data:`NUMERIC_OPTIONS`, the window sizes (and WINDOW_SIZE_MS), the broker
    list, the Redis URL, the Postgres DSN and --sinks. Reachability is
    pipelines.preflight's, also before the pipeline is built.
    """
    values = _parse_every_option(options)

    def name(option: str, value: Any) -> str:
        """``--option 'value'``, or ``--option (from VAR='value')`` when the environment gave it."""
        shown = redact(str(value)) if option in ("redis_url", "postgres_dsn") else str(value)
        var = ENV_OF.get(option)
        kind = NUMERIC_OPTIONS[option].kind if option in NUMERIC_OPTIONS else str
        if var and os.environ.get(var) and value == lenient(kind)(os.environ[var]):
            return f"--{option} (from {var}={shown!r})"
        return f"--{option} {shown!r}"

    for option, rule in NUMERIC_OPTIONS.items():
        if option in values and values[option] is not None:  # None: an option left unset (--until_idle)
            problem = _number_problem(values[option], rule)
            if problem:
                fail(f"{name(option, values[option])}: {problem}; give {rule.give}")
    if "window_sizes" in values:
        # Equal to its default: not on the command line, so WINDOW_SIZE_MS (if set) is behind it.
        given = values["window_sizes"] != default_window_sizes()
        _check_window_sizes(values["window_sizes"], given)
    for option, check in (("brokers", _brokers_problem), ("redis_url", _redis_url_problem),
                          ("postgres_dsn", _postgres_dsn_problem)):
        if option in values:
            problem = check(str(values[option]))
            if problem:
                fail(f"{name(option, values[option])}: {problem}")
    if "sinks" in values:
        unknown = _sink_names(str(values["sinks"])) - SINKS
        if unknown:
            fail(f"--sinks: unknown sink(s) {', '.join(sorted(unknown))}; choose from redis, postgres, kafka, none")
    if "http_host" in values and not str(values["http_host"]).strip():
        fail(f"--http_host {values['http_host']!r}: empty; give an address of this machine, e.g. 127.0.0.1")
    if "group_id" in values and not str(values["group_id"]).strip():
        fail(f"--group_id {values['group_id']!r}: empty; give a Kafka consumer group name, "
             "e.g. learning-analytics")


SINKS = {"redis", "postgres", "kafka", "none"}


def _sink_names(sinks: str) -> set[str]:
    return {s.strip() for s in sinks.split(",") if s.strip()}


def _parse_every_option(options: PipelineOptions) -> dict:
    """Every option of every PipelineOptions class; argparse's error as one line.

    argparse prints its usage and the error, then exits 2: the usage is
    swallowed here and the error is said once, with what to give instead.
    """
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            return options.get_all_options()
    except SystemExit as e:
        if not e.code:
            raise  # --help
        said = [line for line in usage.getvalue().splitlines() if "error: " in line]
        message = said[-1].split("error: ", 1)[1] if said else "cannot be parsed"
        m = re.match(r"argument ([^/:\s]+)(?:/\S+)?: (.*)", message)
        option, problem = (m.group(1), m.group(2)) if m else ("options", message)
        kind = re.search(r"invalid (int|float) value", problem)
        give = {"int": "; give a whole number", "float": "; give a number"}.get(kind.group(1)) if kind else ""
        fail(f"{option}: {problem}{give}")
        raise  # fail() exits; this only tells a reader (and a type checker) that nothing returns


def _number_problem(value: Any, rule: _Number) -> Optional[str]:
    """What is wrong with ``value`` for ``rule``, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = rule.kind(str(value).strip())
        except ValueError:
            return "not a whole number" if rule.kind is int else "not a number"
    if isinstance(value, float) and not math.isfinite(value):
        return "not a finite number"
    if rule.kind is int and value != int(value):
        return "not a whole number"
    if value < rule.low:
        return f"less than {rule.low:g}"
    if value == rule.low and not rule.low_allowed:
        return f"not above {rule.low:g}"
    if rule.high is not None and value > rule.high:
        return f"more than {rule.high:g}"
    return None


def _check_window_sizes(window_sizes: Any, given: bool) -> None:
    """--window_sizes, or the WINDOW_SIZE_MS behind its default: exits 2 when unusable."""
    raw_ms = os.environ.get("WINDOW_SIZE_MS")
    if not given and raw_ms:
        # default_window_sizes() left a bad WINDOW_SIZE_MS out; say so rather than run without it.
        ms = lenient(int)(raw_ms.strip())
        problem = ("not a whole number of milliseconds" if not isinstance(ms, int)
                   else "not above 0" if ms <= 0
                   else "not a whole number of seconds (windows are whole seconds)" if ms % 1000
                   else None)
        if problem:
            fail(f"--window_sizes (from WINDOW_SIZE_MS={raw_ms!r}): {problem}; give WINDOW_SIZE_MS as "
                 "a multiple of 1000 above 0, e.g. 60000, or pass --window_sizes")
    parts = [p.strip() for p in str(window_sizes).split(",")]
    for part in parts:
        problem = _number_problem(part, _Number(int, 1, True, None, ""))
        if problem:
            fail(f"--window_sizes {str(window_sizes)!r}: {part!r} is {problem}; give {_WINDOW_SIZES_GIVE}")


def _brokers_problem(brokers: str) -> Optional[str]:
    parts = [b.strip() for b in brokers.split(",") if b.strip()]
    if not parts:
        return "empty; give comma-separated host:port pairs, e.g. 127.0.0.1:9092"
    for part in parts:
        m = _BROKER.fullmatch(part)
        if not m or (m.group(1) is not None and not 0 < int(m.group(1)) < 65536):
            return f"{part!r} is not host:port; give comma-separated host:port pairs, e.g. 127.0.0.1:9092"
    return None


def _redis_url_problem(url: str) -> Optional[str]:
    """redis-py's own parser decides, plus a database that must be a number."""
    give = "give redis://host:port/db, rediss://host:port/db or unix:///path/to/redis.sock, " \
           "e.g. redis://127.0.0.1:6379/0"
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return f"no redis://, rediss:// or unix:// scheme; {give}"
    try:
        redis.connection.parse_url(url)
    except ValueError as e:
        return f"{redact(str(e))}; {give}"
    path = re.sub(r"^rediss?://[^/?#]*", "", url).split("?")[0].strip("/")
    if url.startswith("redis") and path and not path.isdigit():
        return f"database {path!r} is not a number; {give}"
    return None


def _postgres_dsn_problem(dsn: str) -> Optional[str]:
    """libpq's own parser (through psycopg2) decides, plus ports that must be numbers."""
    give = ("give a URI such as postgresql://user:password@host:5432/dbname "
            "or key=value pairs such as 'host=127.0.0.1 port=5432 dbname=analytics user=analytics'")
    if not dsn.strip():
        return f"empty; {give}"
    try:
        parts = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.Error as e:
        return f"{redact(str(e).strip().splitlines()[0])}; {give}"
    for port in str(parts.get("port", "5432")).split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            return f"port {port!r} is not a number from 1 to 65535; {give}"
    return None
