"""Chaos trials: kills and outages at random moments, every stored window checked after.

    python -m scripts.chaos --trials 20                  # about a minute a trial
    python -m scripts.chaos --trials 6 --kinds kill,term --seed 3
    python -m scripts.chaos --trials 5 --kinds redis --servers stack   # outages of the shared stack

The trials run on a Redis, a Postgres and a Kafka broker of their own
(``scripts/stack.sh instance``, on free loopback ports, purged at the end),
so they can run beside the test suite; ``--servers stack`` uses the shared
stack instead (and its outages then hit everything else that uses it). Each
trial has topics, a Postgres schema and a Redis database of its own. A producer sends a
generated stream (2% malformed) at ``--rate`` while the streaming job runs
under a small supervisor that restarts it whenever it exits before the
stream is drained, as a process manager would. At a random moment one fault:

  kill      SIGKILL of the job's process group (launcher, Prism, workers)
  term      SIGTERM of the job
  redis     Redis stopped for --outage-seconds
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
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Optional

from confluent_kafka import Consumer, TopicPartition

from scripts.produce import TrafficConfig, generate, produce
from tests.integration.conftest import BROKERS, PG_BASE, REDIS_BASE, REPO, isolated_stack
from tests.integration.instances import private
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
        self.stopping = threading.Event()  # the trial is over: start no more runs
        self.runs = 0
        self.stderr: list[str] = []  # each run's stderr, for the log of a trial that fails
        self.lock = threading.Lock()

    def run(self):
        while time.monotonic() < self.deadline and not self.stopping.is_set():
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
                self.stderr.append(self.job.communicate()[1])
                return
            self.stderr.append(err)
            if self.job.returncode == 0 and self.done.is_set() and all_committed(self.stack):
                self.finished.set()
                return
            time.sleep(2)  # a service may still be down: try again shortly

    def stop(self) -> None:
        """Starts no more runs and kills the current one."""
        self.stopping.set()
        self.signal(signal.SIGKILL)

    def signal(self, sig: int) -> None:
        with self.lock:
            if self.job is not None and self.job.poll() is None:
                try:
                    os.killpg(self.job.pid, sig) if sig == signal.SIGKILL else self.job.send_signal(sig)
                except ProcessLookupError:
                    pass


def _consumer(stack, group: str) -> Consumer:
    return Consumer({"bootstrap.servers": stack.brokers, "group.id": group, "socket.timeout.ms": 5000})


def event_partitions(stack) -> list[TopicPartition]:
    c = _consumer(stack, "chaos-probe")
    try:
        return [TopicPartition(t, p) for t in stack.event_topics().split(",")
                for p in c.list_topics(t, timeout=10).topics[t].partitions]
    finally:
        c.close()


def end_offsets(stack) -> dict:
    c = _consumer(stack, "chaos-probe")
    try:
        return {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=10)[1] for tp in event_partitions(stack)}
    finally:
        c.close()


def committed(stack) -> dict:
    c = _consumer(stack, stack.group_id)
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


@dataclass
class Servers:
    """Where the trials run, and how one of the services is stopped and started."""
    brokers: str
    pg_base: str
    redis_base: str
    instances: dict = field(default_factory=dict)  # kind -> Instance; empty: the shared stack

    def stop(self, kind: str) -> None:
        self.instances[kind].stop() if self.instances else stack_verb("stop", kind)

    def start(self, kind: str) -> None:
        self.instances[kind].start() if self.instances else stack_verb("start", kind)


@contextmanager
def private_servers() -> Iterator[Servers]:
    """A Redis, a Postgres and a Kafka broker of the trials' own, purged when they end."""
    print("chaos: starting private Redis, Postgres and Kafka (scripts/stack.sh instance up)", flush=True)
    with private("redis") as r, private("postgres") as pg, private("kafka", span=2) as k:
        yield Servers(f"127.0.0.1:{k.port}", f"postgresql://analytics:analytics@127.0.0.1:{pg.port}/analytics",
                      f"redis://127.0.0.1:{r.port}", {"redis": r, "postgres": pg, "kafka": k})


def inject(trial: Trial, sup: Supervisor, outage_s: float, servers: Servers) -> float:
    """Applies the fault; returns the monotonic time it ended."""
    if trial.kind == "kill":
        sup.signal(signal.SIGKILL)
    elif trial.kind == "term":
        sup.signal(signal.SIGTERM)
    else:
        servers.stop(trial.kind)
        try:
            time.sleep(outage_s)
        finally:
            servers.start(trial.kind)
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
                      for _, rec in topic_records(stack.brokers, stack.topics["dlq"]))
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


def run_trial(trial: Trial, args, rng: random.Random, servers: Servers) -> None:
    with isolated_stack(brokers=servers.brokers, pg_base=servers.pg_base, redis_base=servers.redis_base) as stack:
        cfg = TrafficConfig(events=args.events, users=100, concepts=20, content_items=40,
                            span_seconds=args.span_seconds, malformed_fraction=0.02,
                            json_fraction=0.2, seed=rng.randrange(1 << 30))
        produced = [r._replace(topic=stack.topic_for(r.topic)) for r in generate(cfg)]
        deadline = time.monotonic() + args.trial_seconds
        sup = Supervisor(stack, until_idle=args.until_idle, deadline=deadline)
        # The sender waits out a broker outage rather than give records up.
        sender = threading.Thread(target=produce, args=(iter(produced), stack.brokers, args.rate),
                                  kwargs={"deliver_within_s": args.trial_seconds}, daemon=True)
        began = time.monotonic()
        sup.start()
        sender.start()
        try:
            _drive(trial, args, rng, servers, stack, sup, sender, produced, began, deadline)
        finally:
            sup.stop()


def _drive(trial: Trial, args, rng: random.Random, servers: Servers, stack, sup: Supervisor,
           sender: threading.Thread, produced: list, began: float, deadline: float) -> None:
    """Injects the trial's fault, waits for the job to drain, checks the windows."""
    trial.at_s = rng.uniform(args.earliest, args.events / args.rate)
    time.sleep(max(0.0, began + trial.at_s - time.monotonic()))
    ended = inject(trial, sup, args.outage_seconds, servers)
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
    else:
        check(trial, stack, produced)
    if not trial.exact:
        keep_log(trial, sup, stack)


def keep_log(trial: Trial, sup: Supervisor, stack) -> None:
    """Writes the failed trial's job output (every run's stderr) and offsets to a file named in its notes."""
    path = os.path.join(tempfile.gettempdir(), f"chaos-trial-{trial.number}-{stack.suffix}.log")
    with open(path, "w") as f:
        for n, err in enumerate(sup.stderr, 1):
            f.write(f"==== run {n} stderr\n{err}\n")
        try:
            f.write(f"==== committed {committed(stack)}\n==== end offsets {end_offsets(stack)}\n")
        except Exception as e:  # the broker may be what failed
            f.write(f"==== offsets unavailable: {e}\n")
    trial.notes.append(f"log: {path}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m scripts.chaos", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Beam's spelling (underscores) like every command; the hyphenated forms still work.
    ap.add_argument("--trials", type=int, default=20, help="how many trials")
    ap.add_argument("--kinds", default=",".join(KINDS), help="faults to draw from, in turn")
    ap.add_argument("--events", type=int, default=20000, help="events per trial")
    ap.add_argument("--rate", type=float, default=2000, help="events sent per second")
    ap.add_argument("--span_seconds", "--span-seconds", type=float, default=1800,
                    help="event-time span of a trial's stream, ending now")
    ap.add_argument("--outage_seconds", "--outage-seconds", type=float, default=30,
                    help="how long a service is down")
    ap.add_argument("--earliest", type=float, default=3, help="earliest fault, seconds after the start")
    ap.add_argument("--until_idle", "--until-idle", type=float, default=8, help="the job's --until_idle")
    ap.add_argument("--trial_seconds", "--trial-seconds", type=float, default=300, help="a trial's deadline")
    ap.add_argument("--servers", choices=("private", "stack"), default="private",
                    help="private: a Redis, Postgres and Kafka of the trials' own; stack: the shared stack's "
                         "(its outages then hit everything else using it)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    return ap.parse_args(argv)


def print_row(trial: Trial) -> None:
    recover = "-" if trial.recover_s is None else f"{trial.recover_s:.1f}"
    print(f"{trial.number:>5} {trial.kind:9} {trial.at_s:6.1f} {trial.windows_exact:>6}/{trial.windows:<7} "
          f"{trial.lost:>6} {trial.twice:>6} {trial.dead_letters_twice:>9} "
          f"{'ok' if trial.archived_ok else 'WRONG':>7} {trial.restarts:>8} {recover:>9} {trial.error} "
          f"{'; '.join(trial.notes)}", flush=True)


def print_totals(trials: list[Trial]) -> None:
    exact = sum(t.exact for t in trials)
    recovered = sorted(t.recover_s for t in trials if t.recover_s is not None)
    print(f"chaos: {exact} of {len(trials)} trials exact; events lost {sum(t.lost for t in trials)}, "
          f"counted twice {sum(t.twice for t in trials)}, dead letters twice "
          f"{sum(t.dead_letters_twice for t in trials)}; recovery median "
          f"{recovered[len(recovered) // 2] if recovered else float('nan'):.1f}s, max "
          f"{max(recovered, default=float('nan')):.1f}s")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (say, from `timeout`) unwinds like Ctrl-C: the running job is
    # killed and the private servers purged by the blocks that started them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds or args.trials < 1 or args.events < 1 or args.rate <= 0:
        print(f"error: --kinds must be some of {','.join(KINDS)}; --trials, --events, --rate positive",
              file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int(time.time())
    rng = random.Random(seed)
    servers = private_servers() if args.servers == "private" else nullcontext(Servers(BROKERS, PG_BASE, REDIS_BASE))
    trials = []
    with servers as where:
        print(f"chaos: {args.trials} trials of {kinds}, {args.events} events at {args.rate:.0f}/s, seed {seed}, "
              f"Kafka {where.brokers}")
        print(f"{'trial':>5} {'fault':9} {'at s':>6} {'windows exact':>14} {'lost':>6} {'twice':>6} "
              f"{'dlq twice':>9} {'archive':>7} {'restarts':>8} {'recover s':>9}")
        for n in range(1, args.trials + 1):
            trial = Trial(n, kinds[(n - 1) % len(kinds)])
            try:
                run_trial(trial, args, rng, where)
            except Exception as e:  # a trial that breaks is reported, not hidden
                trial.error = f"{type(e).__name__}: {e}"
            trials.append(trial)
            print_row(trial)
    print_totals(trials)
    return 0 if all(t.exact for t in trials) else 1


if __name__ == "__main__":
    sys.exit(main())
