"""``python -m pipelines.replay`` of every offset produced, to Parquet, with 2 worker processes
and with 1 (how the batch runner scales from one core to two)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

from scripts.benchmark.common import log, tail
from scripts.benchmark.isolation import Bench


def _figures(out: str, wall: float) -> dict:
    """Events and rates from the dataset's manifest."""
    with open(os.path.join(out, "_manifest.json")) as f:
        manifest = json.load(f)
    return {"events": manifest["valid_events"], "job_s": manifest["seconds"],
            "events_per_s_job": round(manifest["valid_events"] / manifest["seconds"]),
            "events_per_s_wall": round(manifest["valid_events"] / wall)}


def run_replay(bench: Bench, n: int, timeout: float, workers: int = 2) -> dict:
    """In: the stack with ``n`` produced events, a timeout (s) and the worker processes.
    Out: exit code, workers, wall time, events, job time and events/s (per job time and per
    wall time), or an error."""
    log(f"replay to Parquet (batch runner, {workers} worker{'s' if workers > 1 else ''})")
    out = os.path.join(tempfile.mkdtemp(prefix="bench-replay-"), "ds")
    cmd = [sys.executable, "-m", "pipelines.replay", f"--brokers={bench.brokers}",
           f"--topics={','.join(bench.event_topics())}", f"--postgres_dsn={bench.dsn}",
           "--start=2000-01-01T00:00:00Z", f"--end={datetime.now(timezone.utc).isoformat()}",
           f"--output={out}", f"--workers={workers}"]
    began = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - began
    result = {"exit_code": proc.returncode, "workers": workers, "wall_s": round(wall, 2)}
    try:
        result.update(_figures(out, wall))
    except (OSError, KeyError, ValueError) as e:
        result["error"] = f"{e}: {tail(proc.stderr)}"
    finally:
        shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    log(f"replay: {result}")
    return result
