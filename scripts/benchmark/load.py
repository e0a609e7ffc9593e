"""A loaded machine: busy-loop processes beside the drains, and the load average while they run."""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass  # the time bound still ends it


def _end(p: subprocess.Popen, sig: int) -> None:
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass


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

    def start(self) -> list[int]:
        """Starts the ``k`` loops; returns their PIDs."""
        code = self.CODE.format(bound=float(self.bound_s))
        for _ in range(self.k):
            self.procs.append(subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               preexec_fn=_die_with_parent))
        return [p.pid for p in self.procs]

    def stop(self) -> list[int]:
        """Ends every busy loop by its PID; returns the PIDs that were still running."""
        running = [p for p in self.procs if p.poll() is None]
        for p in running:
            _end(p, signal.SIGTERM)
        for p in running:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                _end(p, signal.SIGKILL)
                p.wait(5)
        return [p.pid for p in running]


class LoadSampler(threading.Thread):
    """The 1-minute load average every ``interval`` seconds, with the time."""

    def __init__(self, interval: float = 2.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), os.getloadavg()[0]))
            self.stop.wait(self.interval)

    def between(self, t0: float, t1: float) -> dict:
        """Mean, min, max and count of the samples taken from ``t0`` to ``t1`` ({} if none)."""
        xs = [v for t, v in self.samples if t0 <= t <= t1]
        if not xs:
            return {}
        return {"mean": round(statistics.fmean(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2),
                "samples": len(xs)}
