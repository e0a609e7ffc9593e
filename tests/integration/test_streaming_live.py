"""The streaming job on an open stream: windows fire while input keeps coming,
SIGTERM stops it cleanly, and unreachable services give one clear line."""
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from scripts.produce import TrafficConfig, generate, produce
from tests.integration.conftest import BROKERS, REPO

pytestmark = pytest.mark.integration


def send_now(stack, n, seed):
    now = int(time.time() * 1000)
    cfg = TrafficConfig(events=n, span_seconds=1, end_time_ms=now, max_disorder_ms=0, seed=seed)
    records = [r._replace(topic=stack.topic_for(r.topic)) for r in generate(cfg)]
    produce(iter(records), BROKERS)
    return sum(1 for r in records if r.error_code is None)


def test_windows_fire_on_an_open_stream_and_sigterm_stops_the_job(stack):
    cmd = [sys.executable, "-m", "pipelines.streaming", *stack.pipeline_args(early_firing=1)]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        time.sleep(6)  # the job starts up; what is produced before it reads is read from the start
        sent, seen, deadline = 0, 0.0, time.monotonic() + 90
        while time.monotonic() < deadline and job.poll() is None:
            sent += send_now(stack, 200, seed=int(time.time()))
            window = int(time.time() // 60 * 60 * 1000)
            seen = float(r.hget(f"analytics:1m:{window}:overall:all", "events") or 0)
            if seen > 0:
                break
            time.sleep(1)
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert seen > 0, "no 1-minute value in Redis while the stream was open"
        assert r.hget(f"analytics:1m:{window}:overall:all", "pane_timing") in ("EARLY", "ON_TIME")
    finally:
        job.send_signal(signal.SIGTERM)
        try:
            rc = job.wait(60)
        except subprocess.TimeoutExpired:
            job.kill()
            raise
    assert rc == 0, job.stderr.read()[-3000:]


@pytest.mark.parametrize("flag,words", [
    ("--brokers=127.0.0.1:1", "cannot reach Kafka"),
    ("--redis_url=redis://127.0.0.1:1/0", "cannot reach Redis"),
    ("--postgres_dsn=postgresql://analytics:analytics@127.0.0.1:1/analytics", "cannot reach Postgres"),
    ("--topics=no.such.topic", "topics missing"),
])
def test_an_unreachable_service_is_one_clear_line(services, flag, words):
    proc = subprocess.run([sys.executable, "-m", "pipelines.streaming", flag, "--until_idle=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert "analytics:analytics@" not in lines[0]  # no password in messages
