"""Chaos trials: kills and outages at random moments, every stored window checked after.

    python -m scripts.chaos --trials 20                  # about a minute a trial
    python -m scripts.chaos --trials 6 --kinds kill,term --seed 3

Each trial runs on topics, a Postgres schema and a Redis database of its own
(on the local stack of scripts/stack.sh, loopback only). A producer sends a
generated stream (2% malformed) at ``--rate`` while the streaming job runs
under a small supervisor that restarts it whenever it exits before the
stream is drained, as a process manager would. At a random moment one fault:

  kill      SIGKILL of the job's process group (launcher, Prism, workers)
  term      SIGTERM of the job
  redis     Redis stopped for --outage-seconds (scripts/stack.sh stop/start)
  postgres  Postgres stopped likewise
  kafka     the broker stopped likewise

Then the job drains and every window of every size and family is compared,
in Postgres and in Redis, with a count made here from what was produced
(tests/integration/expected.py, independent of the pipeline's code). The
table: windows exact of all windows, events lost and counted twice (summed
over the 1-minute overall rows in Postgres), every record's dead letter
published once, and the seconds from the end of the fault until the job had
committed everything sent before it. Bounded: every wait has a deadline, and
a trial that overruns is reported as failed. Exit code 1 if any trial was
not exact.
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from confluent_kafka import Consumer, TopicPartition

from scripts.produce import TrafficConfig, generate, produce
from tests.integration import conftest
from tests.integration.conftest import BROKERS, REPO, isolated_stack
from tests.integration.expected import expected_metrics
from tests.integration.readback import postgres_metrics, postgres_scalar, redis_metrics, topic_records

KINDS = ("kill", "term", "redis", "postgres", "kafka")
STACK = os.path.join(REPO, "scripts", "stack.sh")


@dataclass
class Trial:
    number: int
    kind: str
    at_s: float = 0.0
    windows: int = 0
    windows_exact: int = 0
    lost: int = 0
    twice: int = 0
    dead_letters_twice: int = 0
    archived_ok: bool = False
    recover_s: Optional[float] = None
    restarts: int = 0
    error: str = ""
    notes: list = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return (not self.error and self.windows and self.windows == self.windows_exact and not self.lost
                and not self.twice and not self.dead_letters_twice and self.archived_ok)


class Supervisor(threading.Thread):
    """Keeps the streaming job running until ``done`` is set and a run drained
    with exit 0; each run in a process group of its own."""

    def __init__(self, stack, until_idle: float, deadline: float):
        super().__init__(daemon=True)
        self.stack, self.until_idle, self.deadline = stack, until_idle, deadline
        self.job: Optional[subprocess.Popen] = None
        self.done = threading.Event()      # no more input will come
        self.finished = threading.Event()  # a run drained everything and exited 0
        self.runs = 0
        self.lock = threading.Lock()

    def run(self):
        while time.monotonic() < self.deadline:
            cmd = [sys.executable, "-m", "pipelines.streaming",
                   *self.stack.pipeline_args(until_idle=self.until_idle, early_firing=1)]
            with self.lock:
                self.job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                            text=True, start_new_session=True)
                self.runs += 1
            try:
                _, err = self.job.communicate(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                return
            if self.job.returncode == 0 and self.done.is_set() and all_committed(self.stack):
                self.finished.set()
                return
            time.sleep(2)  # a service may still be down: try again shortly

    def signal(self, sig: int) -> None:
        with self.lock:
            if self.job is not None and self.job.poll() is None:
                try:
                    os.killpg(self.job.pid, sig) if sig == signal.SIGKILL else self.job.send_signal(sig)
                except ProcessLookupError:
                    pass


def _consumer(group: str) -> Consumer:
    return Consumer({"bootstrap.servers": BROKERS, "group.id": group, "socket.timeout.ms": 5000})


def event_partitions(stack) -> list[TopicPartition]:
    c = _consumer("chaos-probe")
    try:
        return [TopicPartition(t, p) for t in stack.event_topics().split(",")
                for p in c.list_topics(t, timeout=10).topics[t].partitions]
    finally:
        c.close()


def end_offsets(stack) -> dict:
    c = _consumer("chaos-probe")
    try:
        return {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=10)[1] for tp in event_partitions(stack)}
    finally:
        c.close()


def committed(stack) -> dict:
    c = _consumer(stack.group_id)
    try:
        return {(tp.topic, tp.partition): tp.offset for tp in c.committed(event_partitions(stack), timeout=10)}
    finally:
        c.close()


def all_committed(stack, ends: Optional[dict] = None) -> bool:
    try:
        ends = ends or end_offsets(stack)
        got = committed(stack)
    except Exception:
        return False  # the broker is away
    return all(got.get(k, -1) >= v for k, v in ends.items())


def stack_verb(verb: str, service: str) -> None:
    subprocess.run(["bash", STACK, verb, service], cwd=REPO, check=True, capture_output=True, timeout=180)


def inject(trial: Trial, sup: Supervisor, outage_s: float) -> float:
    """Applies the fault; returns the monotonic time it ended."""
    if trial.kind == "kill":
        sup.signal(signal.SIGKILL)
    elif trial.kind == "term":
        sup.signal(signal.SIGTERM)
    else:
        stack_verb("stop", trial.kind)
        try:
            time.sleep(outage_s)
        finally:
            stack_verb("start", trial.kind)
    return time.monotonic()


def check(trial: Trial, stack, produced: list) -> None:
    valid = [(r.event_type, r.fields) for r in produced if r.error_code is None]
    expected = expected_metrics(valid)
    pg, rd = postgres_metrics(stack.dsn), redis_metrics(stack.redis_url)
    windows: dict = {}
    for key, want in expected.items():
        for name, store in (("postgres", pg), ("redis", rd)):
            if not _same(store.get(key), want):
                windows[key[:2]] = False
                if len(trial.notes) < 3:
                    trial.notes.append(f"{name} {key}: {_diff(store.get(key), want)}")
        windows.setdefault(key[:2], True)
    for key in set(pg) - set(expected):
        windows[key[:2]] = False
    trial.windows, trial.windows_exact = len(windows), sum(windows.values())
    for key, want in expected.items():
        if key[0] == 60 and key[2] == "overall":
            diff = (pg.get(key) or {}).get("events", 0) - want["events"]
            trial.lost += int(max(0, -diff))
            trial.twice += int(max(0, diff))
    trial.archived_ok = postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events") == len(valid)
    letters = Counter((rec["source_topic"], rec["source_partition"], rec["source_offset"])
                      for _, rec in topic_records(BROKERS, stack.topics["dlq"]))
    trial.dead_letters_twice = sum(n - 1 for n in letters.values())
    if len(letters) != sum(1 for r in produced if r.error_code):
        trial.notes.append(f"{len(letters)} dead-lettered records for "
                           f"{sum(1 for r in produced if r.error_code)} bad ones")
        trial.archived_ok = False


def _diff(have: Optional[dict], want: dict) -> str:
    if have is None:
        return "missing"
    return ", ".join(f"{n} {have.get(n)} != {v}" for n, v in want.items()
                     if n not in have or abs(float(have[n]) - v) > 1e-9 * max(1.0, abs(v)))


def _same(have: Optional[dict], want: dict) -> bool:
    return have is not None and all(
        name in have and abs(float(have[name]) - v) <= 1e-9 * max(1.0, abs(v)) for name, v in want.items())


def run_trial(trial: Trial, args, rng: random.Random) -> None:
    with isolated_stack() as stack:
        cfg = TrafficConfig(events=args.events, users=100, concepts=20, content_items=40,
                            span_seconds=args.span_seconds, malformed_fraction=0.02,
                            json_fraction=0.2, seed=rng.randrange(1 << 30))
        produced = [r._replace(topic=stack.topic_for(r.topic)) for r in generate(cfg)]
        deadline = time.monotonic() + args.trial_seconds
        sup = Supervisor(stack, until_idle=args.until_idle, deadline=deadline)
        # The sender waits out a broker outage rather than give records up.
        sender = threading.Thread(target=produce, args=(iter(produced), BROKERS, args.rate),
                                  kwargs={"deliver_within_s": args.trial_seconds}, daemon=True)
        began = time.monotonic()
        sup.start()
        sender.start()
        trial.at_s = rng.uniform(args.earliest, args.events / args.rate)
        time.sleep(max(0.0, began + trial.at_s - time.monotonic()))
        ended = inject(trial, sup, args.outage_seconds)
        sender.join(max(1.0, deadline - time.monotonic()))
        ends = end_offsets(stack)
        while not all_committed(stack, ends) and time.monotonic() < deadline:
            time.sleep(0.5)
        if all_committed(stack, ends):
            trial.recover_s = time.monotonic() - ended
        sup.done.set()
        sup.finished.wait(max(1.0, deadline - time.monotonic()))
        sup.signal(signal.SIGKILL)
        trial.restarts = sup.runs - 1
        if not sup.finished.is_set():
            trial.error = "did not drain in time"
            return
        check(trial, stack, produced)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20, help="how many trials (default 20)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"faults to draw from (default {','.join(KINDS)})")
    ap.add_argument("--events", type=int, default=20000, help="events per trial (default 20000)")
    ap.add_argument("--rate", type=float, default=2000, help="events sent per second (default 2000)")
    ap.add_argument("--span-seconds", type=float, default=1800,
                    help="event-time span of a trial's stream, ending now (default 1800)")
    ap.add_argument("--outage-seconds", type=float, default=30, help="how long a service is down (default 30)")
    ap.add_argument("--earliest", type=float, default=3, help="earliest fault, seconds after the start (default 3)")
    ap.add_argument("--until-idle", type=float, default=8, help="the job's --until_idle (default 8)")
    ap.add_argument("--trial-seconds", type=float, default=300, help="a trial's deadline (default 300)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds or args.trials < 1 or args.events < 1 or args.rate <= 0:
        print(f"error: --kinds must be some of {','.join(KINDS)}; --trials, --events, --rate positive",
              file=sys.stderr)
        return 2
    # Redis databases of their own, apart from the test suite's (1 and up) and
    # the benchmark's (14): a test run beside the trials must not flush them.
    conftest._free_redis_dbs[:] = [12, 13]
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    print(f"chaos: {args.trials} trials of {kinds}, {args.events} events at {args.rate:.0f}/s, seed {seed}")
    print(f"{'trial':>5} {'fault':9} {'at s':>6} {'windows exact':>14} {'lost':>6} {'twice':>6} "
          f"{'dlq twice':>9} {'archive':>7} {'restarts':>8} {'recover s':>9}")
    trials = []
    for n in range(1, args.trials + 1):
        trial = Trial(n, kinds[(n - 1) % len(kinds)] if len(kinds) > 1 else kinds[0])
        try:
            run_trial(trial, args, rng)
        except Exception as e:  # a trial that breaks is reported, not hidden
            trial.error = f"{type(e).__name__}: {e}"
        trials.append(trial)
        recover = "-" if trial.recover_s is None else f"{trial.recover_s:.1f}"
        print(f"{n:>5} {trial.kind:9} {trial.at_s:6.1f} {trial.windows_exact:>6}/{trial.windows:<7} {trial.lost:>6} "
              f"{trial.twice:>6} {trial.dead_letters_twice:>9} {'ok' if trial.archived_ok else 'WRONG':>7} "
              f"{trial.restarts:>8} {recover:>9} {trial.error} {'; '.join(trial.notes)}", flush=True)
    exact = sum(t.exact for t in trials)
    recovered = [t.recover_s for t in trials if t.recover_s is not None]
    print(f"chaos: {exact} of {len(trials)} trials exact; events lost {sum(t.lost for t in trials)}, "
          f"counted twice {sum(t.twice for t in trials)}, dead letters twice "
          f"{sum(t.dead_letters_twice for t in trials)}; recovery median "
          f"{sorted(recovered)[len(recovered) // 2] if recovered else float('nan'):.1f}s, max "
          f"{max(recovered, default=float('nan')):.1f}s")
    return 0 if exact == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
