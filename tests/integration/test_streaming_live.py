"""The streaming job on an open stream: windows fire while input keeps coming,
SIGTERM stops it cleanly, and unreachable services give one clear line."""
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from scripts.produce import TrafficConfig
from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


def send_now(stack, n, seed, per_window, end_ms=None):
    """Produces ``n`` records stamped with the second before ``end_ms`` (now by
    default); counts the valid ones by 1-minute window into ``per_window``."""
    end_ms = end_ms or int(time.time() * 1000)
    cfg = TrafficConfig(events=n, span_seconds=1, end_time_ms=end_ms, max_disorder_ms=0, seed=seed)
    records = stack.produce(cfg)
    for r in records:
        if r.error_code is None:
            start = r.fields["occurred_at"] // 60_000 * 60_000
            per_window[start] = per_window.get(start, 0) + 1


def test_windows_keep_firing_on_an_open_stream_and_sigterm_stops_the_job(stack):
    """While input keeps coming: the first window gets its exact ON_TIME value,
    the next one shows EARLY values before it ends, and late events for the
    closed window refire it as LATE with the exact new total. (On Prism 2.75
    an accumulating window once held the watermark, so after the first early
    panes nothing more reached Redis; and a stateful step's state was dropped
    at the end of its window, so a late pane replaced the total with itself.)"""
    cmd = [sys.executable, "-m", "pipelines.streaming", *stack.pipeline_args(early_firing=1)]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)

    def overall(start):
        return r.hgetall(f"analytics:1m:{start}:overall:all")

    per_window, early_while_open = {}, {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and job.poll() is None:
            send_now(stack, 100, seed=int(time.time() * 1000), per_window=per_window)
            first = min(per_window)
            current = int(time.time() // 60 * 60_000)
            if current > first:
                value = overall(current)
                if value.get("pane_timing") == "EARLY":
                    early_while_open[current] = float(value["events"])
            closed = overall(first)
            if closed.get("pane_timing") == "ON_TIME" and early_while_open:
                break
            time.sleep(max(0.0, 1 - time.time() % 1))
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert closed.get("pane_timing") == "ON_TIME", f"window {first} never closed: {closed}"
        assert float(closed["events"]) == per_window[first]
        assert early_while_open, "no early value for a window opened after the first one"

        send_now(stack, 30, seed=1, per_window=per_window, end_ms=first + 30_000)
        late, deadline = {}, time.monotonic() + 60
        # The late events reach the window in one LATE pane or several.
        while time.monotonic() < deadline and float(late.get("events", 0)) != per_window[first]:
            send_now(stack, 100, seed=int(time.time() * 1000), per_window=per_window)
            time.sleep(1)
            late = overall(first)
        assert late.get("pane_timing") == "LATE", f"no late pane for window {first}: {late}"
        assert float(late["events"]) == per_window[first] > float(closed["events"])
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
