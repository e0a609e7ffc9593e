"""Exact totals across restarts: back-to-back runs, SIGTERM, SIGKILL at three moments.

Each test produces a known stream to topics of its own, stops the job in its
own way, restarts it until idle, and checks every window of every size and
family, in Postgres and in Redis, against values computed here from what was
produced; every valid event archived once; every bad record one dead letter.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from pipelines.workers import worker_pids
from scripts.produce import TrafficConfig
from tests.integration.conftest import BROKERS, REPO
from tests.integration.expected import assert_metrics_match, expected_metrics
from tests.integration.readback import postgres_metrics, postgres_scalar, redis_metrics, topic_records

pytestmark = pytest.mark.integration


def produce_stream(stack, events: int, seed: int, span_seconds: int = 1800) -> list:
    cfg = TrafficConfig(events=events, users=80, concepts=12, content_items=25, span_seconds=span_seconds,
                        malformed_fraction=0.02, json_fraction=0.2, seed=seed)
    records = stack.produce(cfg)
    return records


def start_job(stack, **extra) -> subprocess.Popen:
    """The job in a process group of its own (the launcher, Prism and its workers)."""
    cmd = [sys.executable, "-m", "pipelines.streaming", *stack.pipeline_args(**extra)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def committed_total(stack) -> int:
    """Records below the group's committed offsets, over every event partition."""
    c = Consumer({"bootstrap.servers": BROKERS, "group.id": stack.group_id})
    try:
        tps = [TopicPartition(t, p) for t in stack.event_topics().split(",")
               for p in c.list_topics(t, timeout=10).topics[t].partitions]
        return sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10))
    finally:
        c.close()


def ledger_rows(stack) -> int:
    try:
        return postgres_scalar(stack.dsn, "SELECT count(*) FROM window_ledger")
    except Exception:  # the job has not created its tables yet
        return 0


def wait_until(job: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None, f"the job ended early: {job.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the moment to stop the job never came"
        time.sleep(0.1)


def assert_exact(stack, produced: list) -> None:
    valid = [(r.event_type, r.fields) for r in produced if r.error_code is None]
    expected = expected_metrics(valid)
    assert_metrics_match(expected, postgres_metrics(stack.dsn))
    assert_metrics_match(expected, redis_metrics(stack.redis_url))
    assert postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events") == len(valid)
    letters = topic_records(BROKERS, stack.topics["dlq"])
    coordinates = Counter((rec["source_topic"], rec["source_partition"], rec["source_offset"])
                          for _, rec in letters)
    assert max(coordinates.values(), default=1) == 1, "a record was dead-lettered twice"
    assert Counter(rec["error_code"] for _, rec in letters) == Counter(
        r.error_code for r in produced if r.error_code)


def restart_until_idle(stack) -> None:
    proc = stack.run_streaming(until_idle=5, early_firing=1)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_runs_back_to_back_add_up(fresh_stack):
    """The demo twice: the second stream falls in the first one's windows."""
    first = produce_stream(fresh_stack, 6000, seed=11)
    restart_until_idle(fresh_stack)
    second = produce_stream(fresh_stack, 6000, seed=12)
    restart_until_idle(fresh_stack)
    assert_exact(fresh_stack, first + second)


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_mid_stream_then_restart(fresh_stack, processes):
    """With --worker_processes 2 too: the workers Prism ends on the cancel are no reason
    for pipelines.workers.WorkerWatch to make the exit code 3."""
    produced = produce_stream(fresh_stack, 30000, seed=21)
    job = start_job(fresh_stack, until_idle=30, early_firing=1, worker_processes=processes)
    wait_until(job, lambda: committed_total(fresh_stack) > 5000, timeout=120 * processes)
    job.send_signal(signal.SIGTERM)
    assert job.wait(60) == 0, job.stderr.read()[-3000:]
    restart_until_idle(fresh_stack)
    assert_exact(fresh_stack, produced)


@pytest.mark.parametrize("moment", ["first_ledger_rows", "half_committed", "all_committed"])
def test_sigkill_then_restart(fresh_stack, moment):
    """SIGKILL of the job's process group: when the first bundles were folded,
    when half the records were committed, and when all were (their windows
    mostly not yet written)."""
    produced = produce_stream(fresh_stack, 30000, seed=31)
    job = start_job(fresh_stack, until_idle=30, early_firing=1)
    conditions = {"first_ledger_rows": lambda: ledger_rows(fresh_stack) > 0,
                  "half_committed": lambda: committed_total(fresh_stack) >= len(produced) // 2,
                  "all_committed": lambda: committed_total(fresh_stack) >= len(produced)}
    try:
        wait_until(job, conditions[moment])
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
    restart_until_idle(fresh_stack)
    assert_exact(fresh_stack, produced)


def test_a_killed_job_with_two_worker_processes_resumes_exactly(fresh_stack):
    """--worker_processes 2: two reads, each with its archive, fold and profiles, in two
    SDK worker processes (pipelines.workers); SIGKILL of the process group (launcher,
    Prism, both workers) once half the records were committed, then a restart, again
    in two processes: every total, archived event and dead letter exactly once."""
    produced = produce_stream(fresh_stack, 30000, seed=41)
    job = start_job(fresh_stack, until_idle=30, early_firing=1, worker_processes=2)
    try:
        wait_until(job, lambda: committed_total(fresh_stack) >= len(produced) // 2, timeout=240)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(30)
    proc = fresh_stack.run_streaming(until_idle=5, early_firing=1, worker_processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_exact(fresh_stack, produced)


def test_a_job_whose_worker_process_died_exits_and_resumes_exactly(fresh_stack):
    """--worker_processes 2: SIGKILL of the second chain's worker alone (a crash, the OOM
    killer). Prism 2.77 fails the job when the worker had bundles in progress (exit 1),
    and leaves it hanging when it had none; then pipelines.workers.WorkerWatch stops it
    with exit code 3. Either way the job ends, non-zero, with no worker left behind, and
    the restart is exact."""
    produced = produce_stream(fresh_stack, 30000, seed=51)
    job = start_job(fresh_stack, until_idle=30, early_firing=1, worker_processes=2)
    try:
        wait_until(job, lambda: committed_total(fresh_stack) >= 2000, timeout=600)  # mid-stream
        (victim,) = [pid for pid in worker_pids(job.pid) if "resource_hints" in cmdline(pid)]
        os.kill(victim, signal.SIGKILL)
        code = job.wait(180)  # hangs without the watch
        err = job.stderr.read()
        assert code in (1, 3), err[-3000:]
        assert "SDK worker" in err  # Prism's "SDK worker disconnected", or the watch's line
        deadline = time.monotonic() + 60  # Prism ends its workers as it stops
        while group_workers(job.pid) and time.monotonic() < deadline:
            time.sleep(1)
        assert not group_workers(job.pid), "a worker process was left running"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(30)
    proc = fresh_stack.run_streaming(until_idle=5, early_firing=1, worker_processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_exact(fresh_stack, produced)


def group_workers(pgid: int) -> list[int]:
    """The live pipelines.worker_boot processes of process group ``pgid``."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                state, _ppid, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == pgid and state != "Z" and "pipelines.worker_boot" in cmdline(int(name)):
                found.append(int(name))
        except OSError:
            continue
    return found


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_a_second_run_of_the_group_waits_for_the_first_to_stop(fresh_stack):
    """A deploy that starts the new job before the old one stopped: the new
    run waits on the group's lease, reads nothing meanwhile, and goes on from
    where the old one stopped; every total exact."""
    first = produce_stream(fresh_stack, 20000, seed=41)
    old = start_job(fresh_stack, early_firing=1)          # runs until stopped
    wait_until(old, lambda: committed_total(fresh_stack) > 3000)
    new = start_job(fresh_stack, until_idle=5, early_firing=1)
    try:
        time.sleep(8)
        assert new.poll() is None, new.stderr.read()[-3000:]
        rows_while_waiting = ledger_rows(fresh_stack)
        old.send_signal(signal.SIGTERM)
        assert old.wait(60) == 0, old.stderr.read()[-3000:]
        second = produce_stream(fresh_stack, 4000, seed=42)
        _, err = new.communicate(timeout=300)
    finally:
        for job in (old, new):
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert new.returncode == 0, err[-3000:]
    assert f"waiting for the run that holds consumer group '{fresh_stack.group_id}' to stop" in err
    assert rows_while_waiting > 0       # the old run was folding while the new one waited
    assert_exact(fresh_stack, first + second)
