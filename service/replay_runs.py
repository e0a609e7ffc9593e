"""Replay processes started by the service: one at a time, each watched by a thread.

    runs = ReplayRuns(work_dir="/var/lib/analytics/replays", repo="/srv/analytics")
    run = runs.start(args, request={...}, correlation_id="...", records_in_range=4000)  # Busy if one runs
    runs.get(run.replay_id).snapshot()     # state, progress, summary, exit code
    runs.shutdown(grace_s=10)              # SIGTERM to a running replay, SIGKILL after grace_s

Each replay is ``python -m pipelines.replay ARGS`` with the repository as its
working directory, its stdout and stderr in ``<work_dir>/<replay id>/``, the
correlation id in the environment variable CORRELATION_ID, and a process group
of its own, so that a signal reaches the batch runner's worker processes too.
Its state is read from what it prints (see transforms/replay_progress.py): the
line naming the range's records, the progress lines, an ``error:`` line, the
JSON summary on stdout, and its exit code. The watching thread waits on the
process, so a finished replay is always reaped (no zombies).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

LOG = logging.getLogger("service.replay")

WATCH_EVERY_S = 0.5
HEADER = re.compile(r"^replay: ([\d,]+) records in \d+ partition ranges")
PROGRESS = re.compile(r"^replay: read ([\d,]+) of ([\d,]+) records")


class Busy(Exception):
    """A replay is running; its id is the argument."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _count(text: str) -> int:
    return int(text.replace(",", ""))


class ReplayRun:
    """One replay process and what is known of it; ``snapshot`` is safe from any thread."""

    def __init__(self, work_dir: str, request: dict, output: Optional[str], correlation_id: str,
                 records_in_range: Optional[int]):
        self.replay_id = uuid.uuid4().hex
        self.dir = os.path.join(work_dir, self.replay_id)
        self.request, self.output, self.correlation_id = request, output, correlation_id
        self.state, self.exit_code, self.summary, self.error = "starting", None, None, None
        self.records_read, self.records_in_range = 0, records_in_range
        self.started_at, self.finished_at = _now(), None
        self.proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._pending = b""  # an incomplete last line of stderr
        self._watcher = threading.Thread(target=self._watch, daemon=True, name=f"replay-{self.replay_id[:8]}")

    def launch(self, args: list[str], repo: str, env: dict[str, str]) -> None:
        """Starts ``python -m pipelines.replay ARGS`` and the thread that watches it."""
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "request.json"), "w") as f:
            json.dump({"request": self.request, "correlation_id": self.correlation_id, "args": args}, f, indent=2)
        with open(self._path("stdout.log"), "wb") as out, open(self._path("stderr.log"), "wb") as err:
            # start_new_session: a group of its own, for shutdown's signal to reach its workers,
            # and so a Ctrl-C in the service's terminal does not hit the replay directly.
            self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.replay", *args], cwd=repo,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         env={**os.environ, **env}, start_new_session=True)
        self._stderr = open(self._path("stderr.log"), "rb")
        self._watcher.start()

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def active(self) -> bool:
        return self.state in ("starting", "running")

    def _watch(self) -> None:
        """Follows stderr until the process exits, then reaps it and records the outcome."""
        assert self.proc is not None
        while True:
            try:
                code = self.proc.wait(timeout=WATCH_EVERY_S)
                break
            except subprocess.TimeoutExpired:
                self._read_stderr()
        self._read_stderr(final=True)
        self._stderr.close()
        self._finish(code)

    def _read_stderr(self, final: bool = False) -> None:
        data = self._pending + self._stderr.read()
        lines = data.split(b"\n")
        self._pending = b"" if final else lines.pop()
        for line in lines:
            self._parse(line.decode("utf-8", "replace").rstrip())

    def _parse(self, line: str) -> None:
        """One stderr line: the range's total, a progress line or an error."""
        header, progress = HEADER.match(line), PROGRESS.match(line)
        with self._lock:
            if header:
                self.state, self.records_in_range = "running", _count(header.group(1))
            elif progress:
                self.state = "running"
                self.records_read, self.records_in_range = _count(progress.group(1)), _count(progress.group(2))
            elif line.startswith("error:"):
                self.error = line.removesuffix(f" [{self.correlation_id}]")

    def _finish(self, code: int) -> None:
        summary = _last_json_object(self._path("stdout.log"))
        with self._lock:
            self.exit_code, self.finished_at, self.summary = code, _now(), summary
            self.state = "succeeded" if code == 0 else "failed"
            if summary:
                self.records_read, self.records_in_range = summary["records_read"], summary["records_in_range"]
        LOG.info("replay %s %s: exit code %s (correlation id %s)", self.replay_id, self.state, code,
                 self.correlation_id, extra={"correlation_id": self.correlation_id})

    def terminate(self, grace_s: float) -> None:
        """SIGTERM to the replay's process group (the replay discards its staging folder
        and exits 1), SIGKILL to what is left of it after ``grace_s``; returns once reaped."""
        if self.proc is None or self.proc.poll() is not None:
            return
        LOG.warning("replay %s: terminating it (service shutting down; correlation id %s)", self.replay_id,
                    self.correlation_id, extra={"correlation_id": self.correlation_id})
        # The whole group: the replay's main thread waits inside the runner's gRPC calls,
        # where a signal is seen only once its workers went away.
        _signal_group(self.proc.pid, signal.SIGTERM)
        self._watcher.join(grace_s)
        _signal_group(self.proc.pid, signal.SIGKILL)  # whatever is left, workers included
        self._watcher.join()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once the process ended and its outcome is recorded."""
        self._watcher.join(timeout)
        return not self._watcher.is_alive()

    def snapshot(self) -> dict[str, Any]:
        """What GET /events/replay/{id} answers."""
        with self._lock:
            total = self.records_in_range
            out = {
                "replay_id": self.replay_id, "state": self.state, "correlation_id": self.correlation_id,
                "request": self.request, "output": self.output,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "progress": {"records_read": self.records_read, "records_in_range": total,
                             "percent": round(100 * self.records_read / total, 1) if total else None},
                "exit_code": self.exit_code, "summary": self.summary, "error": self.error,
                "logs": {"stdout": self._path("stdout.log"), "stderr": self._path("stderr.log")},
            }
        if self.state == "succeeded" and self.output:
            out["manifest"] = _read_json(os.path.join(self.output, "_manifest.json"))
        return out


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the group's id is the replay's pid (start_new_session)
    except ProcessLookupError:
        pass  # already gone


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _last_json_object(path: str) -> Optional[dict]:
    """The last line of ``path`` that is a JSON object (replay's summary), or None."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


class ReplayRuns:
    """The service's replays by id (in memory: a restarted service forgets them, not their files)."""

    def __init__(self, work_dir: str, repo: str):
        self.work_dir, self.repo = os.path.abspath(work_dir), repo
        self._runs: dict[str, ReplayRun] = {}
        self._lock = threading.Lock()

    def start(self, args: list[str], request: dict, output: Optional[str], correlation_id: str,
              records_in_range: Optional[int] = None, env: Optional[dict[str, str]] = None) -> ReplayRun:
        """Launches a replay; raises Busy while another one is starting or running."""
        with self._lock:  # held while launching: two requests cannot both pass the check
            running = [r for r in self._runs.values() if r.active()]
            if running:
                raise Busy(running[0].replay_id)
            run = ReplayRun(self.work_dir, request, output, correlation_id, records_in_range)
            run.launch(args, self.repo, {"CORRELATION_ID": correlation_id, **(env or {})})
            self._runs[run.replay_id] = run
        LOG.info("replay %s started: %s (correlation id %s)", run.replay_id, json.dumps(request),
                 correlation_id, extra={"correlation_id": correlation_id})
        return run

    def get(self, replay_id: str) -> Optional[ReplayRun]:
        return self._runs.get(replay_id)

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Terminates a running replay (see ReplayRun.terminate) and waits until it is reaped."""
        for run in list(self._runs.values()):
            run.terminate(grace_s)
