"""A debug trace of when events pass the streaming job's stages, for the latency benchmark.

Off unless a job is given a trace file (``--latency_trace``). Then each traced
step appends one JSON line per bundle or pane to that file::

    {"s": stage, "t": wall-clock seconds, "w": 1-minute window start ms, "n": events}

``n`` is how many more events of that window the stage has handed on (for
``poll``, ``fold`` and ``fired``), or the window's total so far (for ``pane``,
flagged ``"total": true``). Summed per stage and window over time they give,
like the Redis poller's counts, the moment the k-th event of a window passed
each stage (scripts/benchmark/latency_stats.stage_breakdown). Stages, in the
order an event passes them:

- ``poll``: ReadPartitionFn got the record from the consumer (record time = event time);
- ``fold``: FoldIntoWindows emitted its bundle's partials (after the ledger write),
  i.e. the reader's fused bundle is done with it;
- ``handed``: the reader's bundle was finalized, i.e. the runner has taken its
  output (so the 1-minute trigger's stage has it; finalization may come later);
- ``fired``: the 1-minute window's trigger fired a pane holding it (KeyByWindow);
- ``pane``: AccumulatePanes emitted the window's row with it (to the sinks).

One lock and one file handle serve every DoFn instance of a process; with
``--worker_processes`` several processes append to the file, each line whole
(append mode, line-buffered). Writes are per bundle, never per
event; with no path nothing is computed.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Iterable, Optional

TRACE_WINDOW_MS = 60_000  # the traced window size: the benchmark's 1-minute overall value

_lock = threading.Lock()
_files: dict = {}


def _write(path: str, line: str) -> None:
    with _lock:
        f = _files.get(path)
        if f is None:
            f = _files[path] = open(path, "a", buffering=1, encoding="utf-8")
        f.write(line)


def record(path: Optional[str], stage: str, counts: dict, total: bool = False) -> None:
    """Appends ``{window start ms: events}`` of ``stage`` at the current time to
    the trace at ``path``; nothing when ``path`` is None or ``counts`` empty."""
    if path is None or not counts:
        return
    now = time.time()
    _write(path, "".join(json.dumps({"s": stage, "t": round(now, 4), "w": w, "n": n, **({"total": True} if total else {})})
                         + "\n" for w, n in counts.items()))


def by_window(times_ms: Iterable[int]) -> dict:
    """{1-minute window start ms: how many of ``times_ms`` fall in it}."""
    return dict(Counter(t - t % TRACE_WINDOW_MS for t in times_ms))
