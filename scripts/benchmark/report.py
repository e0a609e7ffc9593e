"""The report as data: every figure of a run, printed by ``printer.print_report`` and
written as JSON by ``--json``."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

from scripts.benchmark.common import loadavg


@dataclass
class Report:
    """command; environment (cpus, load averages, python); isolation (suffix, topics, schema,
    redis_url); errors; throughput (events, produce, baseline, pipeline_all_sinks,
    pipeline_sinks_off, check, drains, replay_to_parquet (2 workers),
    replay_to_parquet_1_worker), latency (see ``latency.run_latency``), memory (see
    ``memory.run_memory``), cleanup problems and runtime. A section not run is None."""
    command: str
    environment: dict
    isolation: dict
    errors: list[str] = field(default_factory=list)
    throughput: Optional[dict] = None
    latency: Optional[dict] = None
    memory: Optional[dict] = None
    cleanup_problems: list[str] = field(default_factory=list)
    runtime_s: Optional[float] = None

    @classmethod
    def start(cls, argv: list[str], isolation: dict) -> "Report":
        """A report of ``python -m scripts.benchmark <argv>`` about to run on ``isolation``."""
        return cls(command=" ".join(["python -m scripts.benchmark", *argv]),
                   environment={"cpus": os.cpu_count(), "loadavg_start": loadavg(),
                                "python": sys.version.split()[0]},
                   isolation=isolation)

    def as_dict(self) -> dict:
        """The report as plain data, sections not run left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.as_dict(), f, indent=2, default=str)
            f.write("\n")
