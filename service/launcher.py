"""Runs a built streaming pipeline until it ends or is stopped: the launcher's side of the job.

In: a built ``beam.Pipeline``, the analytics service (or None) and the ledger
compactor. Out: the exit code, and in ``Stop`` the reason for the job's stop
line. On SIGTERM or Ctrl-C: /health answers 503 "draining", the job is
cancelled (bounded by CANCEL_S: a runner that does not answer is left
behind), and the caller stops the server last (bounded by its STOP_S). The
exactness needs nothing more: a bundle the cancel cuts short was not
committed, so the next run reads it again.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Optional

import apache_beam as beam
from apache_beam.runners.runner import PipelineResult, PipelineState

from service.server import STOP_S, Service
from transforms.resume import LedgerCompactor

LOG = logging.getLogger("pipelines.streaming")  # the job's own lines, as before the move
# After SIGTERM, /health answers "draining" for at least this long before the server closes.
DRAIN_VISIBLE_S = 1.0
# After SIGTERM, the runner's cancel gets this long; a runner that does not answer is left behind.
CANCEL_S = 10.0


class Stop:
    """How the job ended: the exit code and why, for the stop line."""

    def __init__(self):
        self.code: object = None
        self.reason = ""


def print_summary(result: PipelineResult, seconds: float) -> None:
    """Counters of the run, for a person at the terminal."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception as e:  # a runner without metrics must not fail a finished job
        print(f"(no metrics from the runner: {e})", file=sys.stderr)
        return
    totals: dict[str, int] = {}
    for c in counters:
        if c.key.metric.namespace.startswith("beam"):
            continue  # the runner's own bookkeeping
        name = f"{c.key.metric.namespace}.{c.key.metric.name}"
        totals[name] = totals.get(name, 0) + (c.committed or c.attempted or 0)
    print(f"streaming job finished in {seconds:.1f}s")
    for name in sorted(totals):
        print(f"  {name:55s} {totals[name]:>12,}")


class Stopping(BaseException):
    """SIGTERM or Ctrl-C arrived: raised where the launcher waits for the job (like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, _frame) -> None:
    # The first signal stops the wait; later ones must not interrupt the shutdown half-way.
    signal.signal(signal.SIGTERM, _already_stopping)
    signal.signal(signal.SIGINT, _already_stopping)
    raise Stopping(signum)


def _already_stopping(signum: int, _frame) -> None:
    LOG.warning("%s: already stopping (bounded: about %.0f s at most)", signal.Signals(signum).name,
                CANCEL_S + DRAIN_VISIBLE_S + STOP_S)


def run_job(p: beam.Pipeline, service: Optional[Service], compactor: LedgerCompactor, stop: Stop) -> int:
    """Runs the built pipeline until it ends or a signal stops it; the exit code (``stop`` says why).

    ``compactor`` is started once the job runs and stopped when it ends."""
    began = time.monotonic()
    # Before the job starts: a signal while it starts (/health may already say 200) stops it too.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    result: Optional[PipelineResult] = None
    try:
        result = p.run()
        if service is not None:
            service.ctx.attach(result)
        compactor.start()
        state = result.wait_until_finish()
    except Stopping as e:
        stop.reason = f"{e}: cancelled"
        drain(result, compactor, service)
        return 0
    compactor.stop()
    print_summary(result, time.monotonic() - began)
    if state != PipelineState.DONE:
        stop.reason = f"job ended in state {state}"
        print(f"error: job ended in state {state}", file=sys.stderr)
        return 1
    stop.reason = "drained (--until_idle)"
    return 0


def drain(result: Optional[PipelineResult], compactor: Optional[LedgerCompactor],
          service: Optional[Service]) -> None:
    """After a signal: /health says "draining", the job is cancelled (at most CANCEL_S), and
    /health stays "draining" at least DRAIN_VISIBLE_S. The exactness needs nothing more: a
    bundle the cancel cuts short was not committed, so the next run reads it again."""
    stopping_at = time.monotonic()
    if service is not None:
        service.ctx.health.draining.set()  # monitors see 503 "draining" from now until the port closes
    if compactor is not None:
        compactor.stop()
    print("stopping: cancelling the job (offsets of finished bundles are committed)", file=sys.stderr)
    if result is not None:  # None: the signal came while the runner was starting the job
        cancel_bounded(result, CANCEL_S)
    if service is not None:
        # A monitor polling /health once a second sees "draining" before the port closes.
        time.sleep(max(0.0, DRAIN_VISIBLE_S - (time.monotonic() - stopping_at)))


def cancel_bounded(result: PipelineResult, timeout_s: float) -> bool:
    """``result.cancel()`` on a thread, waited for ``timeout_s`` at most; True when it returned."""
    def cancel() -> None:
        try:
            result.cancel()
        except Exception as e:  # already gone is fine when stopping
            LOG.info("cancel: %s", e)

    thread = threading.Thread(target=cancel, name="cancel-job", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        LOG.error("the runner did not confirm the cancel within %.0f s; stopping without it (offsets of "
                  "unfinished bundles are not committed: the next run reads them again)", timeout_s)
        return False
    return True
