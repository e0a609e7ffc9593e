"""The streaming job as a child process, and what is read off it while and after it runs:
committed offsets, the counters it prints, the runner's log lines."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional

from confluent_kafka import Consumer, KafkaException, TopicPartition

from scripts.benchmark.common import log
from tests.integration.conftest import REPO


class Job:
    """``pipelines.streaming <args>`` in its own process group, output to temp files
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
        """The exit code, or None while it runs."""
        rc = self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.time()
        return rc

    def wait(self, timeout: float) -> Optional[int]:
        """The exit code, or None if it still runs after ``timeout`` seconds."""
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
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                fields = stat[stat.rindex(")") + 2:].split()
                if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                    pids.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def _killpg(self, sig: int) -> bool:
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def reap_group(self) -> list[int]:
        """Ends what is left of the job's process group; returns the pids found."""
        left = self.group_members()
        if left and self._killpg(signal.SIGTERM):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.group_members():
                time.sleep(0.2)
            if self.group_members():
                self._killpg(signal.SIGKILL)
        return left

    def kill(self) -> None:
        """SIGTERM to the group (SIGKILL after 10 s), then whatever is left of it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self._killpg(signal.SIGKILL)
        self.reap_group()

    @classmethod
    def kill_all(cls) -> None:
        """Ends every job started by this process."""
        for job in cls.running:
            try:
                job.kill()
            except Exception as e:
                log(f"could not stop {job.label} (pid {job.proc.pid}): {e}")


def summary_counters(stdout: str) -> dict:
    """The counters that pipelines.streaming prints when it finishes: {name: int}."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and "." in parts[0]:
            try:
                out[parts[0]] = int(parts[1].replace(",", ""))
            except ValueError:
                pass
    return out


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


def outage_signs(stderr: str) -> int:
    """Lines of the job's log that show a shared service going away while it ran (a sink's
    circuit breaker, the Kafka client losing the broker): such a drain is not a clean sample."""
    return sum(1 for l in stderr.splitlines() if "circuit breaker" in l or "|FAIL|rdkafka" in l)


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

    def run(self) -> None:
        c = Consumer({"bootstrap.servers": self.brokers, "group.id": self.group_id,
                      "enable.auto.commit": False})
        try:
            meta = c.list_topics(timeout=10).topics
            tps = [TopicPartition(t, p) for t in self.topics for p in sorted(meta[t].partitions)]
            while not self.stop.is_set():
                self._poll(c, tps)
                self.stop.wait(self.interval)
        except Exception as e:  # a watcher must never fail the benchmark
            self.error = f"{type(e).__name__}: {e}"
        finally:
            c.close()

    def _poll(self, c: Consumer, tps: list[TopicPartition]) -> None:
        try:
            offsets = c.committed(tps, timeout=5)
        except KafkaException as e:
            self.error = str(e)
            return
        now = time.time()
        self.committed = sum(max(0, tp.offset) for tp in offsets)
        if self.committed > 0 and self.first_commit is None:
            self.first_commit = now
        if self.committed >= self.total and self.all_committed is None:
            self.all_committed = now
