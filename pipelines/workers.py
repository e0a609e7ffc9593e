"""Several SDK worker processes for the streaming job (``--worker_processes N``).

Prism 2.77 starts exactly one SDK worker per environment of a pipeline (its
--sdk_worker_parallelism and the DirectRunner's direct_num_workers do not
apply), so N processes need N environments. The Python SDK gives transforms
with different resource hints environments of their own; so:

- ``pin_chains``: every step of read chain i > 0 (pipelines.streaming.build:
  the read of a share of the partitions and all that is fused behind it, up
  to the first shuffle or a Flatten with another chain) gets the hint
  ``min_ram=<i>MB``, which nothing reads (Prism ignores hints) but which
  puts the chain in environment i. Chain 0, the windows' merge, the sinks
  and the alerts stay in the default environment. The whole chain must be
  in one environment: a step in another would not fuse with the reader, and
  the reader would commit offsets of a bundle whose archive, ledger,
  profiles or dead letters were not durable yet
  (tests/test_workers.py::test_the_second_chain_runs_whole_in_an_environment_of_its_own;
  the benchmark's 2-process drain shows the two worker processes' figures).
- ``use_worker_processes``: every environment is a PROCESS environment
  whose command is an executable written here that runs
  ``python -m pipelines.worker_boot`` (see there) with this interpreter and
  this checkout on its path.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.transforms.resources import parse_resource_hints

LOG = logging.getLogger("pipelines.streaming")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GROUP_BY_KEY = "beam:transform:group_by_key:v1"


def environment_hints(chain: int) -> dict[str, bytes]:
    """The resource hints that put chain ``chain`` (> 0) in an environment of its own."""
    return parse_resource_hints({"min_ram": f"{chain}MB"})


class _ChainOwner(PipelineVisitor):
    """Finds each leaf step's chain: a step under ``<root><suffix(i)>/`` is chain i's; a
    step all of whose inputs are one chain's, and which does not shuffle, is that chain's."""

    def __init__(self, roots: dict[str, int]):
        self.roots = roots        # step-name prefix -> chain
        self.owner: dict = {}     # PCollection -> chain
        self.steps: dict = {}     # AppliedPTransform -> chain

    def enter_composite_transform(self, node) -> None:
        if not node.parts:  # a composite that returned its input (say, SkipPublished with nothing to skip)
            self.visit_transform(node)

    def visit_transform(self, node) -> None:
        chain = next((c for prefix, c in self.roots.items() if node.full_label.startswith(prefix + "/")), None)
        if chain is None and not _shuffles(node):
            chains = {self.owner.get(pc) for pc in list(node.main_inputs.values()) + [s.pvalue for s in node.side_inputs]}
            chain = chains.pop() if len(chains) == 1 else None
        if chain is not None:
            self.steps[node] = chain
        for pc in node.outputs.values():
            self.owner[pc] = chain


def _shuffles(node) -> bool:
    return isinstance(node.transform, beam.GroupByKey) or (
        getattr(node.transform, "_urn", None) == _GROUP_BY_KEY)


def pin_chains(pipeline: beam.Pipeline, roots: dict[str, int]) -> dict[int, int]:
    """Gives every step of chain i > 0 (``roots``: the step name of each chain's
    read -> i) the hints of environment i; returns {chain: steps pinned}."""
    owner = _ChainOwner(roots)
    pipeline.visit(owner)
    pinned: dict[int, int] = {}
    for node, chain in owner.steps.items():
        if chain > 0:
            node.resource_hints = environment_hints(chain)
            pinned[chain] = pinned.get(chain, 0) + 1
    return pinned


def boot_command() -> str:
    """An executable (in a temporary directory, removed at exit) that runs
    ``python -m pipelines.worker_boot`` with this interpreter and checkout."""
    folder = tempfile.mkdtemp(prefix="analytics-worker-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = os.path.join(folder, "boot")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f"export PYTHONPATH={shlex.quote(ROOT)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
                f"exec {shlex.quote(sys.executable)} -m pipelines.worker_boot \"$@\"\n")
    os.chmod(path, 0o755)
    return path


def use_worker_processes(options: PipelineOptions) -> None:
    """Makes every environment of the job a PROCESS environment booted by ``boot_command``."""
    portable = options.view_as(PortableOptions)
    portable.environment_type = "PROCESS"
    portable.environment_config = json.dumps({"command": boot_command()})


def _children() -> dict[int, list[int]]:
    """{parent pid: child pids} of every process, from /proc."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z":
            out.setdefault(int(fields[1]), []).append(int(name))
    return out


def worker_pids(root: int) -> set[int]:
    """The live ``pipelines.worker_boot`` processes below ``root`` (Prism's children)."""
    children, found, todo = _children(), set(), [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"pipelines.worker_boot" in f.read():
                        found.add(pid)
            except OSError:
                pass
    return found


class WorkerWatch:
    """Stops the job (as SIGTERM would, then exit code 3) when one of its worker processes ends.

    When a PROCESS worker dies (a crash, the OOM killer, or the read
    watchdog's exit in that worker), Prism 2.77 sometimes fails the job ("SDK
    worker disconnected", when it notices in a bundle in progress) and
    sometimes leaves it hanging, the other workers idle, and no supervisor
    learns of it (one SIGKILL of a worker in two, over 150 s;
    tests/integration/test_restarts.py::
    test_a_job_whose_worker_process_died_exits_and_resumes_exactly).
    So this thread follows the job's workers, and when one that ran is gone
    while the job still runs (``grace_s`` later, another worker still alive), it sends this process SIGTERM:
    the launcher's usual drain cancels the job, and ``fired`` makes the
    exit code 3 (restart me), as the read watchdog's in a one-process job. A
    SIGTERM that came first (a deliberate stop, which ends the workers
    itself) is left alone: the launcher's handler has then changed.
    """

    def __init__(self, signal_handler, every_s: float = 1.0, grace_s: float = 10.0):
        self.signal_handler, self.every_s, self.grace_s = signal_handler, every_s, grace_s
        self.stopped = threading.Event()
        self.fired: Optional[str] = None
        self.seen: set[int] = set()  # the workers that ran
        self._thread = threading.Thread(target=self._watch, name="worker-watch", daemon=True)

    def start(self) -> "WorkerWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        while not self.stopped.wait(self.every_s):
            alive = worker_pids(os.getpid())
            gone = self.seen - alive
            self.seen |= alive
            # Only while another worker of the job lives on: when the job ends
            # (say, drained), Prism ends every worker, and the launcher may still
            # be finishing up (compaction, summary) after the grace.
            if (gone and not self.stopped.wait(self.grace_s) and not self._signalled()
                    and worker_pids(os.getpid())):
                self.fired = f"SDK worker process {sorted(gone)} exited while the job ran"
                LOG.error("error: %s; stopping the job so that it is restarted (exit code 3)", self.fired)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    def _signalled(self) -> bool:
        """Whether a signal reached the launcher already (its first handler was replaced)."""
        return signal.getsignal(signal.SIGTERM) is not self.signal_handler
