"""Where the streaming job's CPU goes: py-spy on one drain of a generated stream, summarised per stage.

    python -m scripts.profile_job --events 100000 --out out/profile

Produces ``--events`` events (two hours of event time) into topics of their own
(the tests' isolated stack: own topics, Postgres schema, Redis DB, removed
afterwards), runs ``pipelines.streaming --until_idle`` on them under
``py-spy record`` (the SDK worker runs in the launcher process on Prism's
LOOPBACK environment, so one Python process holds all the pipeline's work;
``--subprocesses`` follows workers started otherwise), and prints:

- per stage: the share of samples under each project function (the outermost
  frame in transforms/ of a sample names its stage), and the harness's share
  with no project frame (decoding elements, the data plane, gRPC, idle waits);
- the top functions by their own samples (where the time is actually spent).

The raw py-spy output (collapsed stacks) is kept in ``--out`` for flame graphs.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Optional

from scripts.produce import TrafficConfig, generate, produce
from tests.integration.conftest import BROKERS, REDIS_BASE, REPO, isolated_stack

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]+)(?::(?P<line>\d+))?\)$")
IDLE = ("wait", "select", "poll", "sleep", "_wait_for_tstate_lock", "acquire", "get", "epoll")


def _parse(raw_path: str) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw (collapsed) output -> [(frames outermost first as (func, file)), count]."""
    stacks = []
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = []
            for part in stack.split(";"):
                if part.startswith("process "):  # --subprocesses: the process is the root frame
                    continue
                m = FRAME.match(part)
                frames.append((m["func"], m["file"]) if m else (part, ""))
            stacks.append((frames, int(count)))
    return stacks


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return os.path.relpath(file, REPO) if file.startswith(REPO) else file


PROJECT_DIRS = ("transforms/", "pipelines/", "schemas/", "service/")


def _ours(file: str) -> bool:
    """A project file: py-spy shows them relative to the job's working directory (``-m``)."""
    rel = os.path.relpath(file, REPO) if os.path.isabs(file) else file
    return rel.startswith(PROJECT_DIRS) and "site-packages" not in file


def _idle(frames: list[tuple[str, str]]) -> bool:
    func, file = frames[-1]
    return func.split(".")[-1] in IDLE or file.endswith("threading.py")


def summarise(raw_path: str, top: int = 20) -> dict:
    """Per-stage inclusive shares and the top self-time functions of a py-spy raw profile."""
    stacks = [(frames, c) for frames, c in _parse(raw_path) if frames]
    idle = sum(c for frames, c in stacks if _idle(frames))
    stacks = [(frames, c) for frames, c in stacks if not _idle(frames)]
    total = sum(c for _, c in stacks) or 1
    stages: collections.Counter = collections.Counter()
    selfs: collections.Counter = collections.Counter()
    for frames, count in stacks:
        stage = next((f"{_short(file)}:{func}" for func, file in frames if _ours(file)), None)
        stages[stage or f"(harness: {_area(frames)})"] += count
        func, file = frames[-1]
        selfs[f"{func} ({_short(file)})"] += count
    pct = lambda c: round(100.0 * c / total, 1)  # noqa: E731
    return {"samples": total, "idle_samples": idle,
            "stages": [(name, pct(c)) for name, c in stages.most_common(top)],
            "self": [(name, pct(c)) for name, c in selfs.most_common(top)]}


def _area(frames: list[tuple[str, str]]) -> str:
    """The deepest apache_beam package of a sample without project frames (coders, data plane...)."""
    for func, file in reversed(frames):
        if "apache_beam/" in file:
            return "/".join(file.split("apache_beam/", 1)[1].split("/")[:2])
    return _short(frames[-1][1]) or frames[-1][0]


def _print(summary: dict, seconds: float) -> None:
    print(f"\n{summary['samples']:,} busy samples ({summary['idle_samples']:,} idle waits left out) "
          f"over {seconds:.1f} s")
    print("\nper stage (outermost project frame; % of busy samples):")
    for name, p in summary["stages"]:
        print(f"  {p:5.1f}%  {name}")
    print("\ntop functions by own samples (% of busy samples):")
    for name, p in summary["self"]:
        print(f"  {p:5.1f}%  {name}")


def run(events: int, out: str, rate: int, pipeline_args: list[str], redis_db: int,
        gil: bool = False) -> Optional[dict]:
    if shutil.which("py-spy") is None:
        print("profile_job: py-spy is not installed: pip install py-spy", file=sys.stderr)
        return None
    os.makedirs(out, exist_ok=True)
    raw = os.path.join(out, "profile.raw")
    with isolated_stack(redis_base=REDIS_BASE, redis_db=redis_db) as stack:
        print(f"producing {events:,} events into *.{stack.suffix}", file=sys.stderr)
        stack.produce(TrafficConfig(events=events, span_seconds=7200, malformed_fraction=0.02, seed=11))
        job = [sys.executable, "-m", "pipelines.streaming",
               *stack.pipeline_args(until_idle=3, start_from="earliest"), *pipeline_args]
        cmd = ["py-spy", "record", "--rate", str(rate), "--subprocesses", "--format", "raw",
               *(["--gil"] if gil else []), "--output", raw, "--", *job]
        began = time.monotonic()
        with open(os.path.join(out, "job.log"), "w") as log:
            rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        seconds = time.monotonic() - began
    if rc != 0:
        print(f"profile_job: the job (under py-spy) exited {rc}; see {out}/job.log", file=sys.stderr)
    summary = summarise(raw)
    _print(summary, seconds)
    print(f"\nraw stacks: {raw} (e.g. flamegraph.pl {raw} > flame.svg)")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.profile_job", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--events", type=int, default=100000, help="events to produce and drain")
    ap.add_argument("--out", default="out/profile", help="directory for the raw profile and the job's log")
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    ap.add_argument("--redis_db", type=int, default=13, help="Redis database to use, flushed")
    ap.add_argument("--pipeline_arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the streaming job, repeatable")
    ap.add_argument("--gil", action="store_true",
                    help="count only samples of the thread holding the GIL: where the worker's one core of "
                         "Python goes (without it, threads waiting for the GIL count as busy too)")
    ap.add_argument("--summarise", metavar="RAW", default=None,
                    help="only summarise an earlier raw profile (no job is run)")
    a = ap.parse_args(argv)
    if a.summarise:
        _print(summarise(a.summarise), 0.0)
        return 0
    return 0 if run(a.events, a.out, a.rate, a.pipeline_arg, a.redis_db, a.gil) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
