"""check_options: every bad option ends the job before it starts, with one line.

The subprocess tests run ``python -m pipelines.streaming`` as an operator
would, in both forms (environment variable and flag), and need no service: the
check comes before anything connects. Should the check ever let a bad value
through, the job is pointed at a topic that does not exist, so it still stops
(on a different line, which fails the test) instead of running.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

import pipelines.replay  # noqa: F401  registers ReplayOptions (--workers, --progress_every)
import pipelines.streaming  # noqa: F401  registers StreamingOptions (--until_idle)
from pipelines.options import AnalyticsOptions, check_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_VARIABLES = ("KAFKA_BROKERS", "REDIS_URL", "ANALYTICS_GROUP_ID", "BATCH_SIZE", "WINDOW_SIZE_MS",
                  "POSTGRES_DSN", "PRISM_PATH", "HTTP_PORT")
SAFETY = ["--topics", "options.test.absent"]
TIMEOUT_S = 60

# (environment, flags, the option the line must name, text it must also hold)
CASES = {
    "BATCH_SIZE=abc": ({"BATCH_SIZE": "abc"}, [], "--batch_size", "BATCH_SIZE"),
    "BATCH_SIZE=0": ({"BATCH_SIZE": "0"}, [], "--batch_size", "BATCH_SIZE"),
    "BATCH_SIZE=-5": ({"BATCH_SIZE": "-5"}, [], "--batch_size", "BATCH_SIZE"),
    "--batch_size abc": ({}, ["--batch_size", "abc"], "--batch_size", "whole number"),
    "--batch_size 0": ({}, ["--batch_size", "0"], "--batch_size", "less than 1"),
    "WINDOW_SIZE_MS=-5": ({"WINDOW_SIZE_MS": "-5"}, [], "--window_sizes", "WINDOW_SIZE_MS"),
    "WINDOW_SIZE_MS=abc": ({"WINDOW_SIZE_MS": "abc"}, [], "--window_sizes", "WINDOW_SIZE_MS"),
    "WINDOW_SIZE_MS=0": ({"WINDOW_SIZE_MS": "0"}, [], "--window_sizes", "WINDOW_SIZE_MS"),
    "--window_sizes 60,-5": ({}, ["--window_sizes", "60,-5"], "--window_sizes", "'-5'"),
    "--window_sizes abc": ({}, ["--window_sizes", "abc"], "--window_sizes", "'abc'"),
    "--allowed_lateness -1": ({}, ["--allowed_lateness", "-1"], "--allowed_lateness", "less than 0"),
    "--early_firing 0": ({}, ["--early_firing", "0"], "--early_firing", "less than 0.1"),
    "--early_firing 0.05": ({}, ["--early_firing", "0.05"], "--early_firing", "less than 0.1"),
    "--max_out_of_orderness x": ({}, ["--max_out_of_orderness", "x"], "--max_out_of_orderness", "number"),
    "--max_future -300": ({}, ["--max_future", "-300"], "--max_future", "less than 0"),
    "--until_idle abc": ({}, ["--until_idle", "abc"], "--until_idle", "'abc'"),
    "--until_idle 0": ({}, ["--until_idle", "0"], "--until_idle", "not above 0"),
    "REDIS_URL=127.0.0.1:6379": ({"REDIS_URL": "127.0.0.1:6379"}, [], "--redis_url", "REDIS_URL"),
    "--redis_url localhost": ({}, ["--redis_url", "localhost"], "--redis_url", "redis://"),
    "POSTGRES_DSN=nonsense": ({"POSTGRES_DSN": "nonsense"}, [], "--postgres_dsn", "POSTGRES_DSN"),
    "--postgres_dsn bad port": ({}, ["--postgres_dsn", "postgresql://analytics:s3cret@127.0.0.1:pg/analytics"],
                                "--postgres_dsn", "port 'pg'"),
    "KAFKA_BROKERS=host:abc": ({"KAFKA_BROKERS": "127.0.0.1:abc"}, [], "--brokers", "KAFKA_BROKERS"),
    "HTTP_PORT=abc": ({"HTTP_PORT": "abc"}, [], "--http_port", "HTTP_PORT"),
    "--http_port 70000": ({}, ["--http_port", "70000"], "--http_port", "more than 65535"),
    "--http_port -1": ({}, ["--http_port", "-1"], "--http_port", "less than 0"),
    "--http_host ''": ({}, ["--http_host", ""], "--http_host", "empty"),
}


def _run(env_extra: dict, flags: list) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SEED_VARIABLES}
    env.update(env_extra, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "pipelines.streaming", *SAFETY, *flags], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def runs() -> dict:
    """Every case run at once: each start costs about 2 s of imports, mostly Beam's."""
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_run, env, flags) for name, (env, flags, _, _) in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_option_is_one_error_line_and_exit_2(runs, case):
    _, _, option, detail = CASES[case]
    done = runs[case]
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {option}"), lines[0]
    assert detail in lines[0], lines[0]
    assert "give" in lines[0] or "choose from" in lines[0], lines[0]  # says what to give instead


def test_a_password_is_not_shown(runs):
    assert "s3cret" not in runs["--postgres_dsn bad port"].stderr


# -- in-process: the same function, cheaper, for the finer points -----------------


def _error_of(capsys, flags: list) -> str:
    with pytest.raises(SystemExit) as stop:
        check_options(PipelineOptions(flags))
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch):
    for name in SEED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("flags,expected", [
    (["--batch_size", "1.5"], "error: --batch_size '1.5': not a whole number; give"),
    (["--batch_size", "1000001"], "error: --batch_size '1000001': more than 1e+06; give"),
    (["--max_out_of_orderness", "nan"], "error: --max_out_of_orderness 'nan': not a finite number; give"),
    (["--max_out_of_orderness", "-0.5"], "error: --max_out_of_orderness '-0.5': less than 0; give"),
    (["--until_idle", "-2"], "error: --until_idle '-2.0': less than 0; give"),
    (["--workers", "0"], "error: --workers '0': less than 1; give"),
    (["--progress_every", "0"], "error: --progress_every '0.0': not above 0; give"),
    (["--window_sizes", "60,,300"], "error: --window_sizes '60,,300': '' is not a whole number; give"),
    (["--brokers", " , "], "error: --brokers ' , ': empty; give"),
    (["--brokers", "127.0.0.1:0"], "error: --brokers '127.0.0.1:0': '127.0.0.1:0' is not host:port; give"),
    (["--redis_url", "http://127.0.0.1:6379/0"], "error: --redis_url 'http://127.0.0.1:6379/0': no redis://"),
    (["--redis_url", "redis://127.0.0.1:6379/zero"], "error: --redis_url 'redis://127.0.0.1:6379/zero': "
                                                     "database 'zero' is not a number; give"),
    (["--postgres_dsn", ""], "error: --postgres_dsn '': empty; give"),
    (["--postgres_dsn", "host=h password=pw bogus=1"],
     "error: --postgres_dsn 'host=h password=*** bogus=1': invalid dsn: invalid connection option"),
    (["--group_id", " "], "error: --group_id ' ': empty; give"),
    (["--archive", "maybe"], "error: --archive: invalid choice: 'maybe'"),
    (["--sinks", "redis,memcache"], "error: --sinks: unknown sink(s) memcache; choose from redis, postgres"),
    (["--direct_num_workers", "two"], "error: --direct_num_workers: invalid int value: 'two'; give a whole number"),
])
def test_each_check_says_what_is_wrong(clean_env, capsys, flags, expected):
    assert _error_of(capsys, flags).startswith(expected)


def test_a_flag_overrides_a_bad_environment_variable(clean_env, capsys):
    clean_env.setenv("BATCH_SIZE", "abc")
    clean_env.setenv("WINDOW_SIZE_MS", "-5")
    check_options(PipelineOptions(["--batch_size", "10", "--window_sizes", "60,300"]))
    # ...and the flag, not the variable, is named when the flag is the bad one.
    clean_env.setenv("BATCH_SIZE", "10")
    assert _error_of(capsys, ["--batch_size", "0"]).startswith("error: --batch_size '0': less than 1")


def test_a_good_configuration_passes_and_keeps_its_values(clean_env):
    clean_env.setenv("BATCH_SIZE", "500")
    clean_env.setenv("WINDOW_SIZE_MS", "30000")
    clean_env.setenv("REDIS_URL", "rediss://:pw@cache.internal:6380/2")
    clean_env.setenv("POSTGRES_DSN", "host=db.internal port=5433 dbname=analytics user=analytics")
    clean_env.setenv("KAFKA_BROKERS", "kafka-1:9092,kafka-2:9092,[::1]:9093")
    options = PipelineOptions(["--allowed_lateness", "0", "--max_future", "0", "--max_out_of_orderness", "0",
                               "--early_firing", "2", "--until_idle", "1.5"])
    assert check_options(options) is None
    opts = options.view_as(AnalyticsOptions)
    assert opts.batch_size == 500 and isinstance(opts.batch_size, int)
    assert opts.window_sizes_s() == (30, 300, 3600, 86400)
    assert (opts.allowed_lateness, opts.max_future, opts.max_out_of_orderness, opts.early_firing) == (0, 0, 0, 2)
    assert opts.redis_url == "rediss://:pw@cache.internal:6380/2"


def test_the_defaults_pass(clean_env):
    options = PipelineOptions([])
    check_options(options)
    opts = options.view_as(AnalyticsOptions)
    assert (opts.batch_size, opts.window_sizes_s()) == (2000, (60, 300, 3600, 86400))


RECOVERY_OPTIONS = ["--since", "--error_code", "--dlq_topic", "--postgres_dsn", "--dry_run", "--timeout"]


@pytest.mark.parametrize("module,options,variable", [
    ("pipelines.streaming", ["--brokers", "--batch_size", "--allowed_lateness", "--until_idle", "--sink_retries",
                             "--http_host", "--http_port"], "HTTP_PORT"),
    ("pipelines.replay", ["--start", "--end", "--output", "--aggregates", "--postgres_dsn"], "BATCH_SIZE"),
    ("pipelines.recover_dead_letters", RECOVERY_OPTIONS, "POSTGRES_DSN"),
    ("scripts.recover_dead_letters", RECOVERY_OPTIONS, "KAFKA_BROKERS"),  # the old name, kept one release
    ("scripts.produce", ["--brokers", "--events", "--rate", "--span_seconds", "--malformed_fraction"],
     "KAFKA_BROKERS"),
    ("scripts.summary", ["--brokers", "--redis_url", "--postgres_dsn", "--dlq_topic"], "REDIS_URL"),
    ("scripts.benchmark", ["--events", "--latency_seconds", "--drains", "--load", "--skip_replay"],
     "KAFKA_BROKERS"),
    ("scripts.chaos", ["--trials", "--kinds", "--outage_seconds", "--servers", "--seed"], None),
])
def test_help_lists_every_option_with_its_default(module, options, variable):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0].rstrip(",") for line in proc.stdout.splitlines() if line.startswith("  --")}
    assert set(options) <= listed, listed
    assert "(default:" in proc.stdout
    assert variable is None or f"[{variable}]" in proc.stdout


def test_the_local_runner_does_not_split_bundles():
    """Prism 2.77 loses a stateful step's updates when it splits its bundles
    (see use_local_runner); the job must always run Prism with splits off."""
    from apache_beam.options.pipeline_options import DebugOptions, StandardOptions

    from pipelines.options import PRISM_NO_SPLITS, use_local_runner
    prism = os.path.join(REPO, ".stack", "bin", "prism")
    if not os.path.exists(prism):
        pytest.skip("no Prism binary (scripts/stack.sh up builds it)")
    options = PipelineOptions([f"--prism_path={prism}"])
    use_local_runner(options, streaming=True)
    assert options.view_as(StandardOptions).runner == "PrismRunner"
    assert PRISM_NO_SPLITS in options.view_as(DebugOptions).experiments


@pytest.mark.parametrize("argv, expected", [([], None), (["--job_server_timeout=600"], 600)])
def test_the_streaming_job_has_no_deadline_on_its_state_stream_unless_asked(argv, expected):
    """Beam's 300 s --job_server_timeout would end an open-ended job after five
    minutes (test_prism_ends_a_job_at_the_job_server_timeout); the streaming
    job lifts Beam's default and keeps a value the user gave."""
    from apache_beam.options.pipeline_options import PortableOptions

    from pipelines.options import use_local_runner
    prism = os.path.join(REPO, ".stack", "bin", "prism")
    if not os.path.exists(prism):
        pytest.skip("no Prism binary (scripts/stack.sh up builds it)")
    options = PipelineOptions([f"--prism_path={prism}", *argv])
    use_local_runner(options, streaming=True)
    assert options.view_as(PortableOptions).job_server_timeout == expected
