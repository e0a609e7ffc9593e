"""How long the streaming job takes from SIGTERM to exit, during a live stream.

    python -m scripts.shutdown_time --trials 5 [--rate 2000] [--run_s 8]

Each trial runs on its own topics, Postgres schema and Redis database (as the
integration tests do): events flow at ``--rate`` per second, the job runs
with the HTTP service for ``--run_s`` seconds after its first valid event,
then gets SIGTERM. Prints per trial the seconds from the signal to the
process's exit, its exit code, whether /health said "draining", and the
slowest trial. A figure, not a test: the README states the bound.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from scripts.produce import TrafficConfig, generate, produce
from tests.integration.conftest import BROKERS, REPO, isolated_stack
from tests.integration.instances import free_port


def watch_draining(base: str, job: subprocess.Popen, seen: list) -> None:
    """Polls /health until the job exits; appends every status it saw."""
    while job.poll() is None:
        try:
            seen.append(httpx.get(f"{base}/health", timeout=2).json().get("status"))
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.05)


def trial(n: int, rate: float, run_s: float) -> tuple[float, int, bool]:
    """One job, SIGTERM during traffic: (seconds to exit, exit code, /health said draining)."""
    with isolated_stack() as stack, tempfile.TemporaryFile("w+") as log:
        stop = threading.Event()
        config = TrafficConfig(events=int(rate * 600), span_seconds=600, seed=n, malformed_fraction=0.02)
        records = (r._replace(topic=stack.topic_for(r.topic)) for r in generate(config))
        traffic = threading.Thread(target=lambda: produce(iter(lambda: next(records) if not stop.is_set()
                                                                else None, None), BROKERS, rate=rate),
                                   daemon=True)
        traffic.start()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "pipelines.streaming", *stack.pipeline_args(http_port=port)]
        job = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and job.poll() is None:
                try:
                    if httpx.get(f"{base}/events/status", timeout=2).json()["events"]["valid"] > 0:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.25)
            time.sleep(run_s)
            seen: list = []
            watcher = threading.Thread(target=watch_draining, args=(base, job, seen), daemon=True)
            sent = time.monotonic()
            job.send_signal(signal.SIGTERM)
            watcher.start()
            code = job.wait(120)
            took = time.monotonic() - sent
            return took, code, "draining" in seen
        finally:
            stop.set()
            if job.poll() is None:
                job.kill()
                job.wait(30)
            traffic.join(30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.shutdown_time", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--rate", type=float, default=2000.0, help="events per second while the job runs")
    ap.add_argument("--run_s", type=float, default=8.0, help="seconds of traffic before SIGTERM")
    a = ap.parse_args(argv)
    times = []
    for n in range(a.trials):
        took, code, drained = trial(n, a.rate, a.run_s)
        times.append(took)
        print(f"trial {n + 1}: SIGTERM -> exit {took:5.2f} s, exit code {code}, /health draining seen: {drained}",
              flush=True)
    print(f"slowest {max(times):.2f} s, mean {sum(times) / len(times):.2f} s over {len(times)} trials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
