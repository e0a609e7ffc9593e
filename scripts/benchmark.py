"""Throughput and latency of the streaming job against a plain-Python baseline.

    python -m scripts.benchmark [--events 200000] [--latency-seconds 20] [--rate 2000] [--json PATH]
    python -m scripts.benchmark --skip-sinks-off --skip-replay --skip-latency --drains 10 --load 2

Everything runs on the local stack of scripts/stack.sh, isolated from demos and
tests: its own topics (the real names plus a unique suffix, same partition
counts), its own Postgres schema (through search_path in the DSN) and its own
Redis database (flushed), all removed again at the end, also on failure.

1. Throughput: N generated events (2 h of event time) are produced once, then
   a. a plain loop (confluent_kafka + fastavro, no Beam, nothing from
      transforms/) decodes them and folds them into the 1m/5m/1h/1d windows;
   b. ``pipelines.streaming --until_idle 3 --start_from earliest`` runs on them
      with every sink on, then again with ``--sinks none --archive false``.
2. Latency: the streaming job runs on live traffic at ``--rate`` events/s whose
   event time is the send time; a poller reads the 1-minute overall count in
   Redis every 50 ms, and each event's latency is the time from its send to the
   first poll at which its window's count covers it.

``--drains N`` repeats 1b (all sinks) N times on the same produced events, each
with a fresh consumer group and with window_metrics, window_ledger, raw_events
and the Redis DB emptied first, and checks each against the baseline's fold
(every overall window of every size in Postgres and in Redis); ``--load K``
runs K busy-loop processes beside the drains (a loaded machine) and reports
the load average during them.

Figures and ratios are printed, never asserted: the numbers depend on the
machine and on whatever else runs on it (the load average is reported).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Optional

import fastavro
import psycopg2
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from schemas import default_registry
from schemas.wire import encode_avro, encode_json, plain_parsed
from scripts.produce import TrafficConfig, generate, produce

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKERS = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
PG_BASE = os.environ.get("POSTGRES_DSN", "postgresql://analytics:analytics@127.0.0.1:5432/analytics")
REDIS_BASE = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0").rsplit("/", 1)[0]

TOPICS = {"learning": ("learning.events.v1", 6), "content": ("content.events.v1", 3),
          "engagement": ("engagement.events.v1", 3), "dlq": ("analytics.dlq.v1", 1),
          "aggregated": ("analytics.aggregated.v1", 3)}
EVENT_KEYS = ("learning", "content", "engagement")
WINDOW_SIZES_S = (60, 300, 3600, 86400)
IDLE_S = 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- isolation

class Isolated:
    """Suffixed topics, a Postgres schema and a Redis DB of this run; ``close`` removes them."""

    def __init__(self, brokers: str, redis_db: int):
        self.brokers = brokers
        self.suffix = f"bench{uuid.uuid4().hex[:8]}"
        self.topics = {k: f"{name}.{self.suffix}" for k, (name, _) in TOPICS.items()}
        self.schema = f"bench_{self.suffix}"
        sep = "&" if "?" in PG_BASE else "?"
        self.dsn = f"{PG_BASE}{sep}options=-csearch_path%3D{self.schema}"
        self.redis_url = f"{REDIS_BASE}/{redis_db}"
        self.groups: list[str] = []
        self.admin = AdminClient({"bootstrap.servers": brokers})
        self._created_topics: list[str] = []
        self._schema_created = False

    def open(self) -> None:
        futures = self.admin.create_topics(
            [NewTopic(self.topics[k], n, 1) for k, (_, n) in TOPICS.items()], request_timeout=30)
        for name, f in futures.items():
            f.result(30)
            self._created_topics.append(name)
        with psycopg2.connect(PG_BASE) as conn, conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {self.schema}")
        conn.close()
        self._schema_created = True
        redis.Redis.from_url(self.redis_url).flushdb()
        # Topic metadata must reach every client before producers and consumers use it.
        deadline = time.monotonic() + 20
        c = Consumer({"bootstrap.servers": self.brokers, "group.id": f"{self.suffix}-meta"})
        try:
            while time.monotonic() < deadline:
                meta = c.list_topics(timeout=5).topics
                if all(t in meta and meta[t].error is None and len(meta[t].partitions) == TOPICS[k][1]
                       for k, t in self.topics.items()):
                    break
                time.sleep(0.3)
        finally:
            c.close()
        time.sleep(1)

    def group(self, label: str) -> str:
        g = f"{self.suffix}-{label.replace(', ', '-').replace(' ', '-')}"
        self.groups.append(g)
        return g

    def event_topics(self) -> list[str]:
        return [self.topics[k] for k in EVENT_KEYS]

    def pipeline_args(self, group_id: str, **extra) -> list[str]:
        args = {"brokers": self.brokers, "topics": ",".join(self.event_topics()),
                "dlq_topic": self.topics["dlq"], "aggregates_topic": self.topics["aggregated"],
                "group_id": group_id, "redis_url": self.redis_url, "postgres_dsn": self.dsn,
                "window_sizes": ",".join(map(str, WINDOW_SIZES_S))}
        args.update(extra)
        return [f"--{k}={v}" for k, v in args.items()] + list(self.extra_job_args)

    extra_job_args: tuple = ()  # --pipeline-arg: appended to every streaming job's arguments

    def close(self) -> list[str]:
        """Removes everything; returns the problems (cleanup never raises)."""
        problems = []
        if self._created_topics:
            try:
                for name, f in self.admin.delete_topics(self._created_topics, request_timeout=30).items():
                    try:
                        f.result(30)
                    except Exception as e:
                        problems.append(f"delete topic {name}: {e}")
            except Exception as e:
                problems.append(f"delete topics: {e}")
        if self.groups:
            try:
                for name, f in self.admin.delete_consumer_groups(self.groups, request_timeout=30).items():
                    try:
                        f.result(30)
                    except Exception:
                        pass  # a group that never committed does not exist
            except Exception as e:
                problems.append(f"delete consumer groups: {e}")
        if self._schema_created:
            try:
                conn = psycopg2.connect(PG_BASE, connect_timeout=10)
                try:
                    with conn, conn.cursor() as cur:
                        cur.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
                finally:
                    conn.close()
            except Exception as e:
                problems.append(f"drop schema {self.schema}: {e}")
        try:
            redis.Redis.from_url(self.redis_url, socket_connect_timeout=5).flushdb()
        except Exception as e:
            problems.append(f"flush {self.redis_url}: {e}")
        return problems


# --------------------------------------------------------------------------- child jobs

class Job:
    """The streaming job as a subprocess in its own process group, output to temp files
    (or to ``<log_dir>/<label>.out|.err`` when ``Job.log_dir`` is set)."""
    running: list["Job"] = []
    log_dir: Optional[str] = None

    def __init__(self, args: list[str], label: str):
        self.label = label
        self.cmd = [sys.executable, "-m", "pipelines.streaming", *args]
        if Job.log_dir:
            base = os.path.join(Job.log_dir, label.replace(", ", "-").replace(" ", "-"))
            self.out, self.err = open(base + ".out", "w+"), open(base + ".err", "w+")
        else:
            self.out = tempfile.TemporaryFile(mode="w+")
            self.err = tempfile.TemporaryFile(mode="w+")
        self.started = time.time()
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=self.out, stderr=self.err,
                                     start_new_session=True)
        self.ended: Optional[float] = None
        Job.running.append(self)

    def poll(self) -> Optional[int]:
        rc = self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.time()
        return rc

    def wait(self, timeout: float) -> Optional[int]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        if self.ended is None:
            self.ended = time.time()
        return rc

    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def group_members(self) -> list[int]:
        """Processes still in the job's process group (e.g. a Prism it left behind)."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                    pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def reap_group(self) -> list[int]:
        """Ends what is left of the job's process group; returns the pids found."""
        left = self.group_members()
        if left:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return left
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.group_members():
                time.sleep(0.2)
            if self.group_members():
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return left

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.reap_group()

    @classmethod
    def kill_all(cls) -> None:
        for job in cls.running:
            try:
                job.kill()
            except Exception as e:
                log(f"could not stop {job.label} (pid {job.proc.pid}): {e}")


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def summary_counters(stdout: str) -> dict:
    """The counters that pipelines.streaming prints when it finishes."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and "." in parts[0]:
            try:
                out[parts[0]] = int(parts[1].replace(",", ""))
            except ValueError:
                pass
    return out


class OffsetWatcher(threading.Thread):
    """Polls a consumer group's committed offsets: when the job first commits, when it has committed all."""

    def __init__(self, brokers: str, group_id: str, topics: list[str], total: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.brokers, self.group_id, self.topics, self.total = brokers, group_id, topics, total
        self.interval = interval
        self.first_commit: Optional[float] = None
        self.all_committed: Optional[float] = None
        self.committed = 0
        self.stop = threading.Event()
        self.error: Optional[str] = None

    def run(self):
        c = Consumer({"bootstrap.servers": self.brokers, "group.id": self.group_id,
                      "enable.auto.commit": False})
        try:
            meta = c.list_topics(timeout=10).topics
            tps = [TopicPartition(t, p) for t in self.topics for p in sorted(meta[t].partitions)]
            while not self.stop.is_set():
                try:
                    offsets = c.committed(tps, timeout=5)
                except KafkaException as e:
                    self.error = str(e)
                    time.sleep(self.interval)
                    continue
                now = time.time()
                self.committed = sum(max(0, tp.offset) for tp in offsets)
                if self.committed > 0 and self.first_commit is None:
                    self.first_commit = now
                if self.committed >= self.total and self.all_committed is None:
                    self.all_committed = now
                self.stop.wait(self.interval)
        except Exception as e:  # a watcher must never fail the benchmark
            self.error = f"{type(e).__name__}: {e}"
        finally:
            c.close()


# --------------------------------------------------------------------------- baseline

def _new_window() -> tuple:
    # counts per event type, per user [answers, correct, rt sum], per concept the same,
    # per content [views, ratings, rating sum]
    return ({}, {}, {}, {})


def run_baseline(brokers: str, topics: list[str], group_id: str, expected: int,
                 stall_s: float = 30.0) -> dict:
    """Decodes every record of ``topics`` and folds it into the four window sizes, in plain Python."""
    reg = default_registry()
    writers: dict[int, tuple] = {}
    sizes_ms = tuple(s * 1000 for s in WINDOW_SIZES_S)
    windows: dict[tuple[int, int], tuple] = {}
    c = Consumer({"bootstrap.servers": brokers, "group.id": group_id, "enable.auto.commit": False,
                  "enable.partition.eof": False, "fetch.wait.max.ms": 100,
                  "queued.min.messages": 100000, "auto.offset.reset": "earliest"})
    try:
        meta = c.list_topics(timeout=10).topics
        tps = [TopicPartition(t, p, 0) for t in topics for p in sorted(meta[t].partitions)]
        ends = {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        pending = {k for k, end in ends.items() if end > 0}
        c.assign(tps)
        first: Optional[float] = None
        last_data = time.monotonic()
        folded = json_records = 0
        loads, reader, BytesIO = json.loads, fastavro.schemaless_reader, io.BytesIO
        while pending:
            msgs = c.consume(10000, timeout=1.0)
            if not msgs:
                if time.monotonic() - last_data > stall_s:
                    raise RuntimeError(f"baseline: no records for {stall_s:.0f}s with {len(pending)} "
                                       f"partitions unfinished ({folded} folded)")
                continue
            if first is None:
                first = time.perf_counter()
            last_data = time.monotonic()
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(err)
                v = m.value()
                if v[0] == 0:
                    sid = int.from_bytes(v[1:5], "big")
                    w = writers.get(sid)
                    if w is None:
                        entry = reg.by_id(sid)
                        w = writers[sid] = (plain_parsed(entry), entry.subject)
                    f = reader(BytesIO(v[5:]), w[0])
                    etype = w[1]
                else:
                    f = loads(v)
                    etype = f["event_type"]
                    json_records += 1
                ts = f["occurred_at"]
                for size in sizes_ms:
                    key = (size, ts - ts % size)
                    win = windows.get(key)
                    if win is None:
                        win = windows[key] = _new_window()
                    counts = win[0]
                    counts[etype] = counts.get(etype, 0) + 1
                    if etype == "question_answered":
                        correct = 1 if f["correct"] else 0
                        rt = f["response_time_ms"]
                        for table, ent in ((win[1], f["user_id"]), (win[2], f["concept_id"])):
                            acc = table.get(ent)
                            if acc is None:
                                table[ent] = [1, correct, rt]
                            else:
                                acc[0] += 1
                                acc[1] += correct
                                acc[2] += rt
                    elif etype == "content_viewed":
                        acc = win[3].get(f["content_id"])
                        if acc is None:
                            win[3][f["content_id"]] = [1, 0, 0]
                        else:
                            acc[0] += 1
                    elif etype == "content_rated":
                        acc = win[3].get(f["content_id"])
                        if acc is None:
                            win[3][f["content_id"]] = [0, 1, f["rating"]]
                        else:
                            acc[1] += 1
                            acc[2] += f["rating"]
                folded += 1
                if m.offset() + 1 >= ends[(m.topic(), m.partition())]:
                    pending.discard((m.topic(), m.partition()))
        last = time.perf_counter()
    finally:
        c.close()
    seconds = last - first if first is not None else 0.0
    return {"events": folded, "expected": expected, "json_records": json_records,
            "windows": len(windows), "seconds": round(seconds, 3),
            "events_per_s": round(folded / seconds, 1) if seconds > 0 else None,
            "_windows": windows}


def baseline_overall(windows: dict) -> dict:
    """{(size_s, start_ms): (events, answers, correct, views, ratings, rating_sum)} of the baseline."""
    out = {}
    for (size, start), (counts, users, _concepts, content) in windows.items():
        answers = sum(a[0] for a in users.values())
        correct = sum(a[1] for a in users.values())
        out[(size // 1000, start)] = (sum(counts.values()), answers, correct,
                                      counts.get("content_viewed", 0), counts.get("content_rated", 0),
                                      sum(c[2] for c in content.values()))
    return out


# --------------------------------------------------------------------------- pipeline throughput

def _warmups_read(dsn: str, first_measured_send: float) -> dict[int, int]:
    """Warm-up events the job read (archived, older than the first measured
    send), by 1-minute window start in ms."""
    rows = pg_query(dsn, "SELECT (extract(epoch FROM occurred_at) * 1000)::bigint / 60000 * 60000, count(*) "
                         f"FROM raw_events WHERE occurred_at < to_timestamp({math.floor(first_measured_send * 1000) / 1000:.3f}) "
                         "GROUP BY 1")
    return {int(w): n for w, n in rows}


def pg_query(dsn: str, sql: str) -> list:
    conn = psycopg2.connect(dsn, connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def compare_with_baseline(dsn: str, redis_url: str, base: dict) -> dict:
    """Window by window, the pipeline's overall rows (Postgres, and Redis where they differ)
    against the baseline's fold. Redis is also checked for every window
    (``redis_mismatched``)."""
    rows = pg_query(dsn, "SELECT window_seconds, (extract(epoch FROM window_start) * 1000)::bigint, metrics, "
                         "pane_timing, pane_index FROM window_metrics WHERE family = 'overall' AND entity_id = 'all'")
    got, panes = {}, {}
    for size, start, m, timing, index in rows:
        got[(size, start)] = tuple(m.get(k, 0) for k in _OVERALL_FIELDS)
        panes[(size, start)] = f"{timing}#{index}"
    mismatched = [k for k in base if k not in got or any(abs(a - b) > 1e-6 for a, b in zip(base[k], got[k]))]
    extra = [k for k in got if k not in base]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    labels = {60: "1m", 300: "5m", 3600: "1h", 86400: "1d"}
    keys = sorted(base)
    pipe = r.pipeline(transaction=False)
    for k in keys:
        pipe.hgetall(f"analytics:{labels[k[0]]}:{k[1]}:overall:all")
    in_redis = {}
    for k, h in zip(keys, pipe.execute()):
        in_redis[k] = (tuple(float(h.get(f, 0)) for f in _OVERALL_FIELDS) if h else None,
                       f"{h.get('pane_timing')}#{h.get('pane_index')}")
    redis_mismatched = [k for k in keys if in_redis[k][0] is None
                        or any(abs(a - b) > 1e-6 for a, b in zip(base[k], in_redis[k][0]))]

    def describe(k) -> str:
        return (f"window {k[0]}s @ {k[1]} ({time.strftime('%H:%M:%S', time.localtime(k[1] / 1000))}): "
                f"baseline {base[k]}, postgres {got.get(k)} [{panes.get(k)}], redis {in_redis[k][0]} "
                f"[{in_redis[k][1]}]")

    examples = [describe(k) for k in mismatched[:5]]
    by_size = {labels.get(size, f"{size}s"): 0 for size in WINDOW_SIZES_S}
    redis_by_size = dict(by_size)
    for size, _ in mismatched:
        by_size[labels.get(size, f"{size}s")] += 1
    for size, _ in redis_mismatched:
        redis_by_size[labels.get(size, f"{size}s")] += 1
    return {"fields": list(_OVERALL_FIELDS), "windows_baseline": len(base), "windows_pipeline": len(got),
            "mismatched": len(mismatched), "only_in_pipeline": len(extra), "examples": examples,
            "mismatched_by_size": by_size, "redis_mismatched": len(redis_mismatched),
            "redis_mismatched_by_size": redis_by_size,
            "mismatched_windows": [describe(k) for k in sorted(set(mismatched) | set(redis_mismatched))]}


_OVERALL_FIELDS = ("events", "answers", "correct", "content_views", "ratings", "rating_sum")


def run_pipeline_throughput(iso: Isolated, n: int, label: str, timeout: float, sinks_on: bool,
                            reference_startup: Optional[float] = None) -> dict:
    group = iso.group(label)
    extra = {"until_idle": IDLE_S, "start_from": "earliest", "early_firing": 5}
    if sinks_on:
        extra.update(sinks="redis,postgres,kafka", archive="true")
    else:
        extra.update(sinks="none", archive="false")
    watcher = OffsetWatcher(iso.brokers, group, iso.event_topics(), n)
    job = Job(iso.pipeline_args(group, **extra), label)
    watcher.start()
    log(f"{label}: pid {job.proc.pid}: {' '.join(job.cmd[1:4])} ... "
        f"--until_idle {IDLE_S} --start_from earliest --early_firing 5 --sinks {extra['sinks']} "
        f"--archive {extra['archive']}")
    rc = job.wait(timeout)
    hung = rc is None
    if hung:
        log(f"{label}: still running after {timeout:.0f}s: stopping it")
        job.kill()
        rc = job.poll()
    watcher.stop.set()
    watcher.join(10)
    leftovers = job.reap_group()
    wall = (job.ended or time.time()) - job.started
    res = {"label": label, "group_id": group, "exit_code": rc, "hung": hung,
           "wall_s": round(wall, 2), "counters": summary_counters(job.stdout()),
           "leftover_processes": leftovers}
    if rc != 0 or hung:
        res["stderr_tail"] = tail(job.stderr(), 40)
    res.update(prism_log_lines(job.stderr()))
    res["outage_signs"] = outage_signs(job.stderr())
    if watcher.first_commit:
        res["first_commit_after_s"] = round(watcher.first_commit - job.started, 2)
    if watcher.all_committed:
        res["all_committed_after_s"] = round(watcher.all_committed - job.started, 2)
    res["committed_offsets"] = watcher.committed
    if watcher.error:
        res["offset_watch_error"] = watcher.error
    if sinks_on:
        (first_read, last_ingest, archived), = pg_query(
            iso.dsn, "SELECT extract(epoch FROM min(ingested_at))::float8, "
                     "extract(epoch FROM max(ingested_at))::float8, count(*) FROM raw_events")
        (last_agg, rows), = pg_query(
            iso.dsn, "SELECT extract(epoch FROM max(updated_at))::float8, count(*) FROM window_metrics")
        per_size = dict(pg_query(iso.dsn, "SELECT window_seconds, sum((metrics->>'events')::float8)::bigint "
                                          "FROM window_metrics WHERE family = 'overall' GROUP BY 1"))
        res.update(archived=archived, window_metric_rows=rows,
                   events_counted_per_window_size={str(k): v for k, v in sorted(per_size.items())})
        if first_read is not None and last_agg is not None:
            span = last_agg - first_read - IDLE_S
            res.update(startup_s=round(first_read - job.started, 2),
                       first_read_to_last_aggregate_s=round(last_agg - first_read, 2),
                       ingest_span_s=round(last_ingest - first_read, 2),
                       last_aggregate_to_exit_s=round((job.ended or time.time()) - last_agg, 2),
                       end_to_end_events_per_s=round(n / span, 1) if span > 0 else None,
                       ingest_events_per_s=round(n / (last_ingest - first_read), 1)
                       if last_ingest > first_read else None)
    else:
        # No archive to date the first read: the first offset commit (bundle finalization)
        # bounds it from above; the all-sinks run's first read, from the same start-up path,
        # is the other estimate.
        commit = res.get("first_commit_after_s")
        if commit is not None:
            span = wall - commit - IDLE_S
            res["startup_first_commit_s"] = commit
            res["wall_events_per_s_startup_first_commit"] = round(n / span, 1) if span > 0 else None
        if reference_startup is not None:
            span = wall - reference_startup - IDLE_S
            res["startup_reference_s"] = reference_startup
            res["wall_events_per_s_startup_reference"] = round(n / span, 1) if span > 0 else None
        if watcher.first_commit and watcher.all_committed and watcher.all_committed > watcher.first_commit:
            res["first_to_last_commit_s"] = round(watcher.all_committed - watcher.first_commit, 2)
    res["wall_only_events_per_s"] = round(n / wall, 1)
    log(f"{label}: exit {rc} after {wall:.1f}s")
    return res


def prism_log_lines(stderr: str, keep: int = 20) -> dict:
    """Lines of the job's log (Prism's, relayed by the launcher) that mention 'split',
    and the runner's own other warnings and errors (e.g. a failed bundle)."""
    splits = [l for l in stderr.splitlines() if "split" in l.lower()]
    problems = [l for l in stderr.splitlines()
                if "PrismRunner" in l and (" WARNING " in l or " ERROR " in l) and "split" not in l.lower()
                and "empty transform" not in l]  # graph notes at start-up, every run
    kinds: dict[str, int] = {}
    for l in splits:
        msg = l.split("PrismRunner: ", 1)[-1].split(" (", 1)[0].split(". ", 1)[0][:80]
        kinds[msg] = kinds.get(msg, 0) + 1
    return {"prism_split_count": len(splits), "prism_split_kinds": kinds, "prism_split_lines": splits[:keep],
            "prism_problem_count": len(problems), "prism_problem_lines": problems[:keep]}


# --------------------------------------------------------------------------- drains under load

class BusyLoad:
    """``k`` processes that each spin a pure-Python ``while True`` loop, to load the
    cores beside the drains. Each stops by itself after ``bound_s`` seconds (and
    when this process dies: PR_SET_PDEATHSIG); ``stop`` ends each by its PID."""

    CODE = ("import time\n"
            "end = time.monotonic() + {bound}\n"
            "n = 0\n"
            "while True:\n"
            "    n += 1\n"
            "    if n % 100000 == 0 and time.monotonic() > end:\n"
            "        break\n")

    def __init__(self, k: int, bound_s: float):
        self.k, self.bound_s = k, bound_s
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def _die_with_parent() -> None:
        try:
            import ctypes
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass  # the time bound still ends it

    def start(self) -> list[int]:
        code = self.CODE.format(bound=float(self.bound_s))
        for _ in range(self.k):
            self.procs.append(subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               preexec_fn=self._die_with_parent))
        return [p.pid for p in self.procs]

    def stop(self) -> list[int]:
        """Ends every busy loop by its PID; returns the PIDs that were still running."""
        running = [p for p in self.procs if p.poll() is None]
        for p in running:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in running:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        return [p.pid for p in running]


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``interval`` seconds, with the time."""

    def __init__(self, interval: float = 2.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self.stop.wait(self.interval)

    def between(self, t0: float, t1: float) -> dict:
        xs = [v for t, v in self.samples if t0 <= t <= t1]
        if not xs:
            return {}
        return {"mean": round(statistics.fmean(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2),
                "samples": len(xs)}


_EMPTIED = ("window_metrics", "window_ledger", "raw_events")


def empty_outputs(iso: Isolated) -> list[str]:
    """Empties what a drain writes (the tables that exist yet, and the Redis DB), so
    that no drain's check can be passed by an earlier drain's rows."""
    conn = psycopg2.connect(iso.dsn, connect_timeout=10)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT t FROM unnest(%s::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
                        (list(_EMPTIED),))
            tables = [t for t, in cur.fetchall()]
            if tables:
                cur.execute(f"TRUNCATE {', '.join(tables)}")
    finally:
        conn.close()
    redis.Redis.from_url(iso.redis_url).flushdb()
    return tables


def outage_signs(stderr: str) -> int:
    """Lines of the job's log that show a shared service going away while it ran (a sink's
    circuit breaker, the Kafka client losing the broker): such a drain is not a clean sample."""
    return sum(1 for l in stderr.splitlines() if "circuit breaker" in l or "|FAIL|rdkafka" in l)


def with_services(fn, what: str, wait_s: float = 180.0):
    """``fn()``, retried while Postgres or Redis refuse connections (other work on a shared
    machine may stop and start them), for at most ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return fn()
        except (psycopg2.OperationalError, redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() > deadline:
                raise
            log(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0][:120]}; retrying in 3s")
            time.sleep(3)


def drain_exact(run: dict, check: Optional[dict]) -> bool:
    return (run.get("exit_code") == 0 and not run.get("hung") and check is not None
            and check["mismatched"] == 0 and check["only_in_pipeline"] == 0
            and check.get("redis_mismatched", 0) == 0)


def drain_line(d: dict) -> str:
    c = d.get("check") or {}
    by_size = " ".join(f"{k} {v}" for k, v in (c.get("mismatched_by_size") or {}).items())
    redis_by_size = " ".join(f"{k} {v}" for k, v in (c.get("redis_mismatched_by_size") or {}).items())
    load = d.get("loadavg_1m") or {}
    verdict = "INTERRUPTED" if d.get("interrupted") else ("EXACT" if d.get("exact") else "NOT EXACT")
    line = (f"drain {d['drain']:>2}/{d['of']}: {verdict}, "
            f"{d.get('seconds', 0.0):.1f}s (job {fmt(d.get('wall_s'), 's')}), exit {d.get('exit_code')}{' (HUNG)' if d.get('hung') else ''}, "
            f"{c.get('windows_baseline', 'n/a')} windows checked, {c.get('mismatched', 'n/a')} mismatched "
            f"in Postgres ({by_size or 'n/a'}), {c.get('redis_mismatched', 'n/a')} in Redis "
            f"({redis_by_size or 'n/a'}), {c.get('only_in_pipeline', 'n/a')} only in the pipeline; "
            f"load 1m mean {load.get('mean', 'n/a')} max {load.get('max', 'n/a')}; "
            f"Prism lines mentioning 'split': {d.get('prism_split_count', 0)}"
            + (f" {d['prism_split_kinds']}" if d.get("prism_split_kinds") else ""))
    if d.get("outage_signs"):
        line += f"; a service went away during it ({d['outage_signs']} breaker/broker lines in the job's log)"
    if d.get("prism_problem_count"):
        line += f", other Prism warnings/errors: {d['prism_problem_count']}"
    if d.get("error"):
        line += f"; error: {d['error']}"
    return line


def run_drains(iso: Isolated, n_events: int, drains: int, load: int, timeout: float,
               base: dict, t: dict) -> None:
    """``drains`` all-sinks drains of the produced events beside ``load`` busy loops;
    fills t["drains"] and, from the first drain, t["pipeline_all_sinks"] and t["check"]."""
    busy = BusyLoad(load, timeout * drains)
    sampler = LoadSampler()
    out: dict = {"drains": drains, "load_processes": load, "runs": []}
    t["drains"] = out
    sampler.start()
    began = time.time()
    out["loadavg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        if load:
            out["load_pids"] = busy.start()
            log(f"load: {load} busy-loop processes, pids {out['load_pids']} (each stops by itself "
                f"after {timeout * drains:.0f}s)")
        for i in range(1, drains + 1):
            label = "pipeline, all sinks" if i == 1 else f"pipeline, all sinks, drain {i}"
            d: dict = {"drain": i, "of": drains, "label": label}
            out["runs"].append(d)
            t0 = time.time()
            d.update(seconds=0.0, exact=False, interrupted=True)  # until the drain has run
            d["emptied"] = with_services(lambda: empty_outputs(iso), f"drain {i}: emptying the outputs")
            try:
                run = run_pipeline_throughput(iso, n_events, label, timeout, sinks_on=True)
                if i == 1:
                    t["pipeline_all_sinks"] = run
                d.update(exit_code=run["exit_code"], hung=run["hung"], wall_s=run["wall_s"],
                         prism_split_count=run.get("prism_split_count", 0),
                         prism_split_kinds=run.get("prism_split_kinds", {}),
                         prism_split_lines=run.get("prism_split_lines", []),
                         prism_problem_count=run.get("prism_problem_count", 0),
                         prism_problem_lines=run.get("prism_problem_lines", []),
                         events_counted_per_window_size=run.get("events_counted_per_window_size"),
                         archived=run.get("archived"))
                if run.get("stderr_tail"):
                    d["stderr_tail"] = run["stderr_tail"]
                d["outage_signs"] = run.get("outage_signs", 0)
                if run["exit_code"] == 0:
                    d["check"] = with_services(lambda: compare_with_baseline(iso.dsn, iso.redis_url, base),
                                               f"drain {i}: checking")
                    if i == 1:
                        t["check"] = d["check"]
            except Exception as e:
                d["error"] = f"{type(e).__name__}: {e}"
                if isinstance(e, (psycopg2.OperationalError, redis.ConnectionError, redis.TimeoutError)):
                    d["outage_signs"] = d.get("outage_signs", 0) + 1
            finally:
                t1 = time.time()
                d["seconds"] = round(t1 - t0, 1)
                d["loadavg_1m"] = sampler.between(t0, t1)
            d["interrupted"] = False
            d["exact"] = drain_exact(d, d.get("check"))
            log(drain_line(d))
            for line in d.get("prism_split_lines", [])[:3]:
                log(f"  {line[:400]}")
    finally:
        stopped = busy.stop()
        if load:
            log(f"load: ended busy loops {stopped}")
        sampler.stop.set()
        out["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        out["loadavg_1m_during"] = sampler.between(began, time.time())
        out["exact"] = sum(1 for d in out["runs"] if d.get("exact"))
        out["completed"] = sum(1 for d in out["runs"] if not d.get("interrupted"))
        out["with_outage"] = sum(1 for d in out["runs"] if d.get("outage_signs"))


# --------------------------------------------------------------------------- latency

def run_replay(iso: "Isolated", n: int, timeout: float) -> dict:
    """``python -m pipelines.replay`` of every offset produced, to Parquet, on both cores."""
    import shutil
    log("replay to Parquet (batch runner, one worker per core)")
    out = os.path.join(tempfile.mkdtemp(prefix="bench-replay-"), "ds")
    cmd = [sys.executable, "-m", "pipelines.replay", f"--brokers={iso.brokers}",
           f"--topics={','.join(iso.event_topics())}", f"--postgres_dsn={iso.dsn}",
           "--start=2000-01-01T00:00:00Z", f"--end={datetime.now(timezone.utc).isoformat()}",
           f"--output={out}"]
    began = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - began
    result = {"exit_code": proc.returncode, "wall_s": round(wall, 2)}
    try:
        with open(os.path.join(out, "_manifest.json")) as f:
            manifest = json.load(f)
        result.update(events=manifest["valid_events"], job_s=manifest["seconds"],
                      events_per_s_job=round(manifest["valid_events"] / manifest["seconds"]),
                      events_per_s_wall=round(manifest["valid_events"] / wall))
    except (OSError, KeyError, ValueError) as e:
        result["error"] = f"{e}: {tail(proc.stderr)}"
    finally:
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    log(f"replay: {result}")
    return result


class RedisPoller(threading.Thread):
    """Every ``interval`` s: the 1-minute overall event count of every window with sent events."""

    def __init__(self, url: str, interval: float = 0.05):
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.interval = interval
        self.windows: set[int] = set()
        self.polls: dict[int, list[tuple[float, float]]] = {}   # window -> [(time, count)] on change
        self.latest: dict[int, float] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors = 0
        self.n_polls = 0

    def run(self):
        while not self.stop.is_set():
            began = time.monotonic()
            with self.lock:
                windows = sorted(self.windows)
            if windows:
                try:
                    pipe = self.client.pipeline(transaction=False)
                    for w in windows:
                        pipe.hget(f"analytics:1m:{w}:overall:all", "events")
                    values = pipe.execute()
                    now = time.time()
                    self.n_polls += 1
                    for w, v in zip(windows, values):
                        count = float(v) if v is not None else 0.0
                        if count != self.latest.get(w):
                            self.latest[w] = count
                            self.polls.setdefault(w, []).append((now, count))
                except redis.RedisError:
                    self.errors += 1
            self.stop.wait(max(0.0, self.interval - (time.monotonic() - began)))


def percentile(sorted_values: list[float], p: float) -> Optional[float]:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))  # nearest rank
    return sorted_values[k]


def _event_templates(count: int, seed: int) -> list[tuple]:
    """(topic key, key, headers, event type, fields, as_json) of ``count`` valid events."""
    reg = default_registry()
    by_topic = {name: k for k, (name, _) in TOPICS.items()}
    cfg = TrafficConfig(events=count, span_seconds=1.0, malformed_fraction=0.0, json_fraction=0.1,
                        max_disorder_ms=0, seed=seed)
    out = []
    for r in generate(cfg):
        out.append((by_topic[r.topic], r.key, r.headers, r.event_type, r.fields, r.value[:1] == b"{"))
    entries = {s: reg.latest(s) for s in reg.subjects("event")}
    parsed = {s: plain_parsed(e) for s, e in entries.items()}
    return out, entries, parsed


def run_latency(iso: Isolated, seconds: float, rate: float, ready_timeout: float = 90.0,
                drain_s: float = 30.0, stop_timeout: float = 60.0, warmup_rate: float = 20.0,
                ready_sleep: float = 0.0) -> dict:
    """Live traffic at ``rate``/s for ``seconds`` into a running job; see the module docstring."""
    n = max(1, int(seconds * rate))
    res: dict = {"rate": rate, "seconds": seconds, "events": n, "early_firing_s": 1}
    templates, entries, parsed = _event_templates(n + int(ready_timeout * warmup_rate) + 10, seed=4242)
    warmups, templates = templates[n:], templates[:n]
    r = redis.Redis.from_url(iso.redis_url)
    r.flushdb()
    group = iso.group("latency")
    res["group_id"] = group
    producer = Producer({"bootstrap.servers": iso.brokers, "linger.ms": 5, "enable.idempotence": True,
                         "queue.buffering.max.messages": 500000})
    failures: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            failures.append(str(err))

    def send(t, now_ms):
        topic_key, key, headers, etype, fields, as_json = t
        fields = dict(fields, occurred_at=now_ms)
        value = encode_json(etype, fields) if as_json else encode_avro(entries[etype], fields, parsed[etype])
        while True:
            try:
                producer.produce(iso.topics[topic_key], value, key, timestamp=now_ms, headers=headers,
                                 on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)

    job = Job(iso.pipeline_args(group, start_from="latest", early_firing=1), "latency")
    log(f"latency: pid {job.proc.pid}: streaming job, --start_from latest --early_firing 1, all sinks")
    poller = RedisPoller(iso.redis_url)
    watcher = OffsetWatcher(iso.brokers, group, iso.event_topics(), 1)
    watcher.start()
    warm: dict[int, int] = {}    # window -> warm-up events sent into it
    sent: dict[int, list[float]] = {}
    t_first_send = None
    try:
        # Ready = the job has written a pane to Redis. Warm-up events (event time = now,
        # like the measured ones) trickle in at warmup_rate/s until a 1-minute overall
        # count appears; they stay counted in their windows, so the k-th measured event
        # of window W is covered once W's count reaches warm[W] + k. They are sent
        # continuously because the job starts at the end of each partition as it is when
        # the job builds its graph, which may be after a given warm-up was sent.
        began = time.monotonic()
        ready_at = None
        i = 0
        if ready_sleep > 0:  # no warm-up traffic: just give the job time to start
            time.sleep(ready_sleep)
            began -= ready_timeout
            res["ready"] = f"slept {ready_sleep:.0f}s instead of warming up"
        while time.monotonic() - began < ready_timeout:
            if job.poll() is not None:
                raise RuntimeError(f"streaming job exited with {job.proc.returncode} before it was ready:\n"
                                   f"{tail(job.stderr(), 40)}")
            now_ms = int(time.time() * 1000)
            w = now_ms - now_ms % 60_000
            send(warmups[i % len(warmups)], now_ms)
            warm[w] = warm.get(w, 0) + 1
            i += 1
            if i % 5 == 0:
                producer.flush(2)
                if any(r.hget(f"analytics:1m:{w}:overall:all", "events") is not None for w in warm):
                    ready_at = time.time()
                    break
            time.sleep(1.0 / warmup_rate)
        producer.flush(5)
        res["warmup_events"] = i
        res["first_commit_after_s"] = _r(watcher.first_commit - job.started) if watcher.first_commit else None
        if ready_at is None and ready_sleep > 0:
            log(f"latency: {res['ready']}")
        elif ready_at is None:
            res["ready"] = f"no pane in Redis within {ready_timeout:.0f}s of warm-up traffic; measuring anyway"
            log(f"latency: {res['ready']} (offsets committed: {watcher.committed})")
        else:
            res["ready_after_s"] = round(ready_at - job.started, 2)
            log(f"latency: job ready (a pane in Redis) after {res['ready_after_s']}s")
        log(f"latency: sending {n:,} events at {rate:.0f}/s")
        poller.start()
        began = time.perf_counter()
        t_first_send = time.time()
        for k, t in enumerate(templates):
            ahead = k / rate - (time.perf_counter() - began)
            if ahead > 0.001:
                time.sleep(ahead)
            now = time.time()
            now_ms = int(now * 1000)
            window = now_ms - now_ms % 60_000
            lst = sent.get(window)
            if lst is None:
                lst = sent[window] = []
                with poller.lock:
                    poller.windows.add(window)
            lst.append(now)
            send(t, now_ms)
        send_seconds = time.perf_counter() - began
        last_send = time.time()
        producer.flush(30)
        res.update(send_seconds=round(send_seconds, 2), achieved_rate=round(n / send_seconds, 1),
                   delivery_failures=len(failures))
        log(f"latency: sent in {send_seconds:.1f}s; waiting up to {drain_s:.0f}s for the counts")
        # Only the warm-ups sent after the job looked up the partitions' ends are
        # read; the archive says which (they are older than the first measured send).
        warm_read = warm
        while time.time() < last_send + drain_s and job.poll() is None:
            warm_read = _warmups_read(iso.dsn, t_first_send)
            if all(poller.latest.get(w, 0) >= len(s) + warm_read.get(w, 0) for w, s in sent.items()):
                break
            time.sleep(0.5)
        time.sleep(0.1)
        poller.stop.set()
        poller.join(5)
        warm_read = _warmups_read(iso.dsn, t_first_send)
        res["warmup_events_read"] = sum(warm_read.values())

        latencies: list[float] = []
        invisible = 0
        for w, sends in sent.items():
            polls = poller.polls.get(w, [])
            offset = warm_read.get(w, 0)
            j = 0
            for k, s in enumerate(sends, start=1):
                while j < len(polls) and polls[j][1] < offset + k:
                    j += 1
                if j < len(polls) and polls[j][0] <= last_send + drain_s:
                    latencies.append(polls[j][0] - s)
                else:
                    invisible += 1
        latencies.sort()
        everything = latencies + [math.inf] * invisible
        res["p50_all_s"] = _r(percentile(everything, 50))
        res["p99_all_s"] = _r(percentile(everything, 99))
        res.update(
            windows={str(w): {"warmup": warm.get(w, 0), "warmup_read": warm_read.get(w, 0), "sent": len(s), "final_count": poller.latest.get(w, 0.0),
                              "count_changes": len(poller.polls.get(w, []))}
                     for w, s in sorted(sent.items())},
            visible=len(latencies), never_visible_within_s=drain_s, never_visible=invisible,
            p50_s=_r(percentile(latencies, 50)), p90_s=_r(percentile(latencies, 90)),
            p99_s=_r(percentile(latencies, 99)), max_s=_r(latencies[-1] if latencies else None),
            min_s=_r(latencies[0] if latencies else None),
            mean_s=_r(statistics.fmean(latencies) if latencies else None),
            redis_polls=poller.n_polls, redis_errors=poller.errors)
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        poller.stop.set()
        try:
            producer.flush(10)
        except Exception:
            pass
        # Did the read path keep up even where the aggregates did not?
        try:
            if t_first_send is not None:
                (archived,), = pg_query(iso.dsn, "SELECT count(*) FROM raw_events WHERE occurred_at >= "
                                                 f"to_timestamp({math.floor(t_first_send * 1000) / 1000:.3f})")
                res["measured_events_archived"] = archived
            res["committed_offsets"] = watcher.committed
            res["panes_in_redis_1m"] = sorted(
                (k.decode().split(":")[2], float(r.hget(k, "events") or 0), (r.hget(k, "pane_timing") or b"").decode())
                for k in r.scan_iter("analytics:1m:*:overall:all"))
        except Exception as e:
            res["diagnostics_error"] = f"{type(e).__name__}: {e}"
        watcher.stop.set()
        if job.poll() is None:
            log("latency: SIGTERM to the streaming job")
            t0 = time.time()
            os.kill(job.proc.pid, signal.SIGTERM)
            rc = job.wait(stop_timeout)
            if rc is None:
                res["stop"] = f"did not exit within {stop_timeout:.0f}s of SIGTERM; killed"
                job.kill()
            else:
                res["stop_seconds"] = round(time.time() - t0, 2)
        else:
            res["stop"] = f"the job had already exited with {job.proc.returncode}"
        res["exit_code"] = job.poll()
        left = job.reap_group()
        if left:
            res["leftover_processes_after_exit"] = left
        res["stderr_tail"] = tail("\n".join(l for l in job.stderr().splitlines() if "Key coder" not in l), 12)
    log(f"latency: job exit code {res['exit_code']}")
    return res


def _r(v: Optional[float]):
    if v is not None and math.isinf(v):
        return "never"
    return None if v is None else round(v, 3)


# --------------------------------------------------------------------------- report

def fmt(v, unit="") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.1f}{unit}" if abs(v) >= 100 else f"{v:,.3f}{unit}"
    return f"{v:,}{unit}" if isinstance(v, int) else f"{v}{unit}"


def ratio(a, b) -> str:
    return f"{a / b:.3f}" if a and b else "n/a"


def print_report(rep: dict) -> None:
    p = print
    p("\n================ streaming job benchmark ================")
    env = rep["environment"]
    p(f"machine: {env['cpus']} CPUs; load average at start {env['loadavg_start']}, at end {env.get('loadavg_end')}")
    p(f"isolation: suffix {rep['isolation']['suffix']}, schema {rep['isolation']['schema']}, "
      f"redis {rep['isolation']['redis_url']}")
    t = rep.get("throughput")
    if t:
        p(f"\n-- throughput: {t['events']:,} events over {t['span_seconds']:.0f}s of event time "
          f"(json {t['json_fraction']:.0%}, no malformed)")
        p(f"produced in {t['produce']['seconds']}s ({t['produce']['sent']:,} records)")
        b = t.get("baseline", {})
        p(f"baseline: {fmt(b.get('events'))} events folded into {fmt(b.get('windows'))} windows "
          f"in {fmt(b.get('seconds'))}s")
        a, s = t.get("pipeline_all_sinks", {}), t.get("pipeline_sinks_off", {})
        for r in (a, s):
            if not r:
                continue
            p(f"{r['label']}: exit {r['exit_code']}{' (HUNG, killed)' if r['hung'] else ''}, wall {r['wall_s']}s, "
              + (f"first read (min ingested_at) at {r['startup_s']}s, " if r.get("startup_s") is not None else "")
              + f"first offset commit at {fmt(r.get('first_commit_after_s'))}s, "
              f"all offsets committed at {fmt(r.get('all_committed_after_s'))}s")
            if r.get("stderr_tail"):
                p("  stderr (tail):\n    " + r["stderr_tail"].replace("\n", "\n    "))
            if r.get("leftover_processes"):
                p(f"  processes left in its process group after exit: {r['leftover_processes']}")
        if a.get("first_read_to_last_aggregate_s") is not None:
            p(f"all sinks: first read -> last aggregate {a['first_read_to_last_aggregate_s']}s "
              f"(incl. {IDLE_S}s idle wait), ingest span {a['ingest_span_s']}s, "
              f"last aggregate -> exit {a['last_aggregate_to_exit_s']}s; "
              f"archived {a.get('archived'):,}, window_metrics rows {a.get('window_metric_rows'):,}; "
              f"events per window size {a.get('events_counted_per_window_size')}")
        if t.get("check"):
            c = t["check"]
            p(f"check, overall rows in Postgres vs the baseline's fold {tuple(c['fields'])}: "
              f"{c['windows_baseline']} windows, {c['mismatched']} mismatched, "
              f"{c['only_in_pipeline']} only in the pipeline")
            for e in c["examples"]:
                p(f"  MISMATCH {e}")
        dr = t.get("drains")
        if dr:
            p(f"\n-- drains: {dr['drains']} x 'pipeline, all sinks' on the same {t['events']:,} events, "
              f"beside {dr['load_processes']} busy-loop processes")
            p(f"load average (1, 5, 15 min) at the first drain {dr.get('loadavg_at_start')}, after the last "
              f"{dr.get('loadavg_at_end')}; 1-minute load average during the drains: "
              f"mean {dr.get('loadavg_1m_during', {}).get('mean', 'n/a')}, "
              f"min {dr.get('loadavg_1m_during', {}).get('min', 'n/a')}, "
              f"max {dr.get('loadavg_1m_during', {}).get('max', 'n/a')}")
            for d in dr["runs"]:
                p(drain_line(d))
                for line in d.get("prism_split_lines", [])[:5]:
                    p(f"    {line[:400]}")
                for w in (d.get("check") or {}).get("mismatched_windows", [])[:10]:
                    p(f"    MISMATCH {w}")
            p(f"{dr['exact']} of {dr['drains']} drains exact"
              + (f" ({dr['completed']} completed)" if dr["completed"] != dr["drains"] else "")
              + (f"; a shared service went away during {dr['with_outage']} of them" if dr.get("with_outage") else ""))
        base = b.get("events_per_s")
        rows = [("baseline: plain loop (confluent_kafka + fastavro + dicts)", base),
                ("pipeline, all sinks: end to end  N/(last agg - first read - idle)", a.get("end_to_end_events_per_s")),
                ("pipeline, all sinks: ingest      N/(max - min ingested_at)", a.get("ingest_events_per_s")),
                ("pipeline, all sinks: wall only   N/wall", a.get("wall_only_events_per_s")),
                ("pipeline, sinks off: N/(wall - startup - idle), startup = all-sinks first read",
                 s.get("wall_events_per_s_startup_reference")),
                ("pipeline, sinks off: N/(wall - startup - idle), startup = first commit",
                 s.get("wall_events_per_s_startup_first_commit")),
                ("pipeline, sinks off: wall only   N/wall", s.get("wall_only_events_per_s")),
                ("replay to Parquet, 2 workers: N/job time (pipeline.run to done)",
                 t.get("replay_to_parquet", {}).get("events_per_s_job")),
                ("replay to Parquet, 2 workers: N/wall (incl. range lookup, start-up)",
                 t.get("replay_to_parquet", {}).get("events_per_s_wall"))]
        p(f"\n{'':82s} {'events/s':>10s} {'/ baseline':>10s}")
        for name, v in rows:
            p(f"{name:82s} {fmt(v):>10s} {ratio(v, base) if name[:8] != 'baseline' else '1.000':>10s}")
    lat = rep.get("latency")
    if lat:
        p(f"\n-- latency: {lat.get('events', 0):,} events at {lat.get('rate')}/s for {lat.get('seconds')}s "
          f"(achieved {fmt(lat.get('achieved_rate'))}/s), event time = send time, --early_firing 1, all sinks")
        if lat.get("ready_after_s") is not None:
            p(f"job ready (first pane of warm-up traffic in Redis) {lat['ready_after_s']}s after start, "
              f"after {lat.get('warmup_events')} warm-up events")
        elif lat.get("ready", "").startswith("slept"):
            p(f"job start-up: {lat['ready']}")
        elif lat.get("ready"):
            p(f"NOT READY: {lat['ready']}")
        if lat.get("error"):
            p(f"FAILED: {lat['error']}")
        if "p50_s" in lat:
            p(f"send -> visible in Redis (1m overall events): p50 {fmt(lat.get('p50_s'))}s  "
              f"p90 {fmt(lat.get('p90_s'))}s  p99 {fmt(lat.get('p99_s'))}s  max {fmt(lat.get('max_s'))}s  "
              f"(min {fmt(lat.get('min_s'))}s, mean {fmt(lat.get('mean_s'))}s; {lat.get('redis_polls')} polls)")
            p(f"never visible within {lat.get('never_visible_within_s'):.0f}s after the last send: "
              f"{lat.get('never_visible'):,} of {lat.get('events'):,}; over all events, counting those as "
              f"never: p50 {fmt(lat.get('p50_all_s'))}, p99 {fmt(lat.get('p99_all_s'))}"
              + ("  (p50/p90/p99 above are of the visible events only)" if lat.get("never_visible") else ""))
            for w, v in (lat.get("windows") or {}).items():
                p(f"  window {time.strftime('%H:%M', time.localtime(int(w) / 1000))} ({w}): "
                  f"warm-up {v['warmup']} ({v.get('warmup_read', 0)} read by the job), "
                  f"measured sent {v['sent']:,}, final count {v['final_count']:,.0f}, "
                  f"count changed {v['count_changes']} times")
        if "measured_events_archived" in lat:
            p(f"read path: {lat['measured_events_archived']:,} measured events archived in raw_events by the end; "
              f"committed offsets {lat.get('committed_offsets'):,}")
        if lat.get("panes_in_redis_1m") is not None:
            p(f"1m overall rows in Redis at the end (window, events, pane): {lat['panes_in_redis_1m']}")
        p(f"SIGTERM: exit code {lat.get('exit_code')}"
          + (f" after {lat['stop_seconds']}s" if "stop_seconds" in lat else "")
          + (f"; {lat['stop']}" if "stop" in lat else ""))
        if lat.get("leftover_processes_after_exit"):
            p(f"processes left in its process group after exit: {lat['leftover_processes_after_exit']}")
        if lat.get("error") or lat.get("exit_code") not in (0, None):
            p("  job stderr (tail):\n    " + lat.get("stderr_tail", "").replace("\n", "\n    "))
    if rep.get("errors"):
        p("\n-- errors")
        for e in rep["errors"]:
            p(f"  {e}")
    if rep.get("cleanup_problems"):
        p(f"cleanup problems: {rep['cleanup_problems']}")
    p(f"\nbenchmark runtime: {rep.get('runtime_s')}s")


# --------------------------------------------------------------------------- main

def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200000, help="events for the throughput runs")
    ap.add_argument("--latency-seconds", type=float, default=20.0, help="how long to send live traffic")
    ap.add_argument("--rate", type=float, default=2000.0, help="events/s of the live traffic")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    ap.add_argument("--brokers", default=BROKERS)
    ap.add_argument("--redis-db", type=int, default=14, help="Redis database to use (flushed)")
    ap.add_argument("--pipeline-timeout", type=float, default=600.0,
                    help="seconds before a throughput run counts as hung and is stopped")
    ap.add_argument("--keep-logs", metavar="DIR", default=None,
                    help="keep each streaming job's stdout/stderr in DIR")
    ap.add_argument("--latency-ready-sleep", type=float, default=0.0, metavar="S",
                    help="instead of warm-up traffic until a first pane shows in Redis, sleep S seconds "
                         "after starting the latency job")
    ap.add_argument("--drains", type=int, default=1, metavar="N",
                    help="run the 'pipeline, all sinks' drain N times on the same produced events, each "
                         "with a fresh consumer group and with window_metrics, window_ledger, raw_events and "
                         "the Redis DB emptied first, each checked against the baseline (default: %(default)s)")
    ap.add_argument("--load", type=int, default=0, metavar="K",
                    help="K busy-loop processes beside the drains, ended when they end (each stops by "
                         "itself after --pipeline-timeout x --drains seconds); the load average during "
                         "the drains is reported (default: %(default)s)")
    ap.add_argument("--pipeline-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for every streaming job, repeatable, e.g. "
                         "--pipeline-arg=--prism_log_level=debug (default: none)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-sinks-off", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--skip-replay", action="store_true")
    a = ap.parse_args(argv)
    if a.drains < 1 or a.load < 0:
        ap.error("--drains must be at least 1 and --load at least 0")

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    if a.keep_logs:
        os.makedirs(a.keep_logs, exist_ok=True)
        Job.log_dir = a.keep_logs
    began = time.time()
    iso = Isolated(a.brokers, a.redis_db)
    iso.extra_job_args = tuple(a.pipeline_arg)
    rep: dict = {"command": " ".join(["python -m scripts.benchmark", *(argv or sys.argv[1:])]),
                 "environment": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                                 "python": sys.version.split()[0]},
                 "isolation": {"suffix": iso.suffix, "topics": iso.topics, "schema": iso.schema,
                               "redis_url": iso.redis_url},
                 "errors": []}
    rc = 0
    try:
        iso.open()
        log(f"isolated topics *.{iso.suffix}, schema {iso.schema}, {iso.redis_url}")
        if not a.skip_throughput:
            t: dict = {"events": a.events, "span_seconds": 7200.0, "json_fraction": 0.1}
            rep["throughput"] = t
            cfg = TrafficConfig(events=a.events, span_seconds=7200, malformed_fraction=0.0, json_fraction=0.1)
            log(f"producing {a.events:,} events")
            records = (r._replace(topic=f"{r.topic}.{iso.suffix}") for r in generate(cfg))
            t["produce"] = produce(records, a.brokers)
            log(f"produced in {t['produce']['seconds']}s")
            log("baseline: plain consumer loop")
            base = run_baseline(a.brokers, iso.event_topics(), iso.group("baseline"), a.events)
            windows = base.pop("_windows")
            t["baseline"] = base
            log(f"baseline: {base['events']:,} events in {base['seconds']}s = {base['events_per_s']:,}/s")
            if a.drains > 1 or a.load > 0:
                run_drains(iso, a.events, a.drains, a.load, a.pipeline_timeout, baseline_overall(windows), t)
            else:
                try:
                    t["pipeline_all_sinks"] = run_pipeline_throughput(
                        iso, a.events, "pipeline, all sinks", a.pipeline_timeout, sinks_on=True)
                    if t["pipeline_all_sinks"]["exit_code"] == 0:
                        t["check"] = compare_with_baseline(iso.dsn, iso.redis_url, baseline_overall(windows))
                except Exception as e:
                    rep["errors"].append(f"pipeline, all sinks: {type(e).__name__}: {e}")
            del windows
            if not a.skip_sinks_off:
                try:
                    t["pipeline_sinks_off"] = run_pipeline_throughput(
                        iso, a.events, "pipeline, sinks off", a.pipeline_timeout, sinks_on=False,
                        reference_startup=(t.get("pipeline_all_sinks") or {}).get("startup_s"))
                except Exception as e:
                    rep["errors"].append(f"pipeline, sinks off: {type(e).__name__}: {e}")
            if not a.skip_replay:
                try:
                    t["replay_to_parquet"] = run_replay(iso, a.events, a.pipeline_timeout)
                except Exception as e:
                    rep["errors"].append(f"replay: {type(e).__name__}: {e}")
        if not a.skip_latency:
            rep["latency"] = run_latency(iso, a.latency_seconds, a.rate, ready_sleep=a.latency_ready_sleep)
            if rep["latency"].get("error"):
                rep["errors"].append(f"latency: {rep['latency']['error']}")
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        rep["errors"].append(f"aborted: {type(e).__name__}: {e}")
        rc = 1
    finally:
        Job.kill_all()
        log("cleaning up topics, schema, Redis DB, consumer groups")
        rep["cleanup_problems"] = iso.close()
        rep["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        rep["runtime_s"] = round(time.time() - began, 1)
    print_report(rep)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=2, default=str)
            f.write("\n")
        log(f"report written to {a.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
