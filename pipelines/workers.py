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
  profiles or dead letters were not durable yet.
- ``use_worker_processes``: every environment is a PROCESS environment
  whose command is an executable written here that runs
  ``python -m pipelines.worker_boot`` (see there) with this interpreter and
  this checkout on its path.
"""
from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import sys
import tempfile

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions
from apache_beam.pipeline import PipelineVisitor
from apache_beam.transforms.resources import parse_resource_hints

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
