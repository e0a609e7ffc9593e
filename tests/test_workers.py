"""pipelines.workers and the read chains of pipelines.streaming.build: which step runs in
which environment (so in which SDK worker process) with --worker_processes 2."""
import os
import signal
import subprocess
import sys
import threading
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options import AnalyticsOptions
from pipelines.streaming import build, chain_suffix, share_partitions
from pipelines.workers import WorkerWatch, pin_chains, worker_pids
from transforms.kafka_read import PartitionSpec
from transforms.ledger import Seeds, WindowLedger
from transforms.resume import ResumePoint

PARTITIONS = [PartitionSpec(t, p, 0) for t, n in (("learning", 6), ("content", 3), ("engagement", 3))
              for p in range(n)]


def graph(chains: int, pin: bool):
    """The streaming job's graph (built, never run: build connects to nothing) as a proto."""
    opts = PipelineOptions(["--streaming"])
    point = ResumePoint(PARTITIONS, Seeds(0, None, 0, 0.0), frozenset(), WindowLedger("dbname=none", "g"))
    p = beam.Pipeline(options=opts)
    built = build(p, opts.view_as(AnalyticsOptions), point, chains=chains)
    assert built == chains
    if pin:
        pin_chains(p, {f"ValidEvents{chain_suffix(i)}": i for i in range(built)})
    return p.to_runner_api()


def environments(proto) -> dict:
    """{environment id: names of the leaf steps in it} ('' for the runner's own steps)."""
    out: dict = {}
    for t in proto.components.transforms.values():
        if not t.subtransforms:
            out.setdefault(t.environment_id, set()).add(t.unique_name)
    return out


def test_every_partition_is_in_exactly_one_share():
    shares = share_partitions(PARTITIONS, 2)
    assert sorted(s for share in shares for s in share) == sorted(PARTITIONS)
    assert [len(s) for s in shares] == [6, 6]
    assert len(share_partitions(PARTITIONS[:1], 2)) == 1  # no empty read


def test_one_chain_is_one_environment_without_chain_steps():
    envs = environments(graph(1, pin=False))
    assert len([e for e in envs if e]) == 1
    assert not any("Chain" in name for names in envs.values() for name in names)


def test_the_second_chain_runs_whole_in_an_environment_of_its_own():
    envs = environments(graph(2, pin=True))
    sdk = {e: names for e, names in envs.items() if e}
    assert len(sdk) == 2
    (other,) = [names for e, names in sdk.items() if "default" not in e]
    # Everything fused behind the second read: its read, decode, archive, profiles and their
    # alerts, lateness and fold (with the ledger), and each of its dead-letter streams' steps.
    must = {"ValidEventsChain1/ReadEvents/ReadPartitions",
            "ValidEventsChain1/DecodeAndValidate/Decode/ParDo(DecodeAndValidateFn)",
            "ArchiveRawEventsChain1/CopyToPostgres", "ProfilesChain1/FoldIntoProfiles",
            "AlertsProfilesChain1/DecideAndPublish",
            "Windows/WindowedMetrics/RejectLateEvents1/Reject/ParDo(RejectLateEventsFn)",
            "Windows/WindowedMetrics/FoldIntoWindows1/ParDo(FoldIntoWindows)"}
    must |= {f"DeadLetters/PublishDeadLetters{s}Chain1/Produce" for s in ("", "TooLate", "FoldErrors", "ArchiveErrors")}
    must |= {f"AlertRules/CountDeadLetters{s}Chain1" for s in ("", "TooLate", "FoldErrors", "ArchiveErrors")}
    assert must <= other
    # ...and nothing of the first chain, nor of the merge after the partials meet.
    assert not [n for n in other if n.startswith("ValidEvents/") or "/Merge" in n or "/Accumulate" in n
                or n.startswith("Windows/Write") or "FoldIntoWindows/" in n]
    assert "Windows/WindowedMetrics/FoldIntoWindows/ParDo(FoldIntoWindows)" in sdk[
        next(e for e in sdk if "default" in e)]


def test_the_watch_stops_the_job_when_a_worker_process_ends():
    """One of two child processes named like workers ends while the other lives on:
    the watch sends this process SIGTERM (the launcher's drain) and says which worker
    it was (the exit code 3's reason)."""
    termed = threading.Event()

    def launcher_handler(signum, frame):
        termed.set()

    previous = signal.signal(signal.SIGTERM, launcher_handler)
    child, other = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "pipelines.worker_boot"])
                    for _ in range(2))
    watch = WorkerWatch(launcher_handler, every_s=0.1, grace_s=0.2).start()
    try:
        assert {child.pid, other.pid} <= worker_pids(os.getpid())
        while not {child.pid, other.pid} <= watch.seen:
            assert child.poll() is None
            time.sleep(0.05)
        child.kill()
        child.wait()
        assert termed.wait(60)
        assert watch.fired is not None and str(child.pid) in watch.fired
    finally:
        watch.stop()
        signal.signal(signal.SIGTERM, previous)
        for proc in (child, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_watch_leaves_a_job_alone_whose_workers_all_ended():
    """Every worker ends (the job finished, or Prism failed it and ended them): no
    SIGTERM, whatever the launcher still does afterwards."""
    termed = threading.Event()

    def launcher_handler(signum, frame):
        termed.set()

    previous = signal.signal(signal.SIGTERM, launcher_handler)
    children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "pipelines.worker_boot"])
                for _ in range(2)]
    watch = WorkerWatch(launcher_handler, every_s=0.1, grace_s=0.2).start()
    try:
        while not {c.pid for c in children} <= watch.seen:
            time.sleep(0.05)
        for c in children:
            c.kill()
            c.wait()
        assert not termed.wait(2.0)  # the watch looked several times (every 0.1 s, grace 0.2 s)
        assert watch.fired is None
    finally:
        watch.stop()
        signal.signal(signal.SIGTERM, previous)
