"""Replay over HTTP on the real stack: a real uvicorn server and httpx client, the
replay router mounted on a small FastAPI app of the test's own.

The dataset a replay started over HTTP writes must equal, row for row, the one
``python -m pipelines.replay`` writes for the same range; the refusals are
replay's own (400, 409) or the token's (401, 403); the replay process's lines
carry the correlation id sent; shutting the service down stops a running
replay, reaps it and leaves no partial output.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pyarrow.dataset as pads
import pytest
import uvicorn
from fastapi import FastAPI

from scripts.produce import TrafficConfig
from service.replay_api import ReplaySettings, make_replay_router
from tests.integration.conftest import BROKERS, REPO
from tests.integration.test_replay import HOUR, iso, replay

pytestmark = pytest.mark.integration

TOKEN = "replay-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
END = (int(time.time() * 1000) // HOUR - 1) * HOUR   # whole hours, in the past
START = END - 2 * HOUR
CONFIG = TrafficConfig(events=2000, users=30, concepts=8, content_items=20, span_seconds=2 * 3600 - 10,
                       end_time_ms=END - 5_000, malformed_fraction=0.04, json_fraction=0.2, seed=99)
DONE_WITHIN_S = 240


def settings_for(stack, work_dir, token=TOKEN) -> ReplaySettings:
    return ReplaySettings(brokers=BROKERS, postgres_dsn=stack.dsn, topics=stack.event_topics(),
                          dlq_topic=stack.topics["dlq"], token=token, work_dir=str(work_dir), repo=REPO)


@contextlib.contextmanager
def serving(settings: ReplaySettings):
    """(base URL, the router) of a uvicorn server on a free port; stopped (lifespan shutdown) on exit."""
    router = make_replay_router(settings)
    app = FastAPI()
    app.include_router(router)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", router
    finally:
        server.should_exit = True
        thread.join(60)


def wait_until(client: httpx.Client, url: str, done, timeout: float = DONE_WITHIN_S) -> dict:
    """Polls GET ``url`` until ``done(status)``; returns that status."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(url, headers=AUTH).raise_for_status().json()
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(1)


def group_gone(pgid: int, within_s: float) -> bool:
    """True once no process of group ``pgid`` is left."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def stderr_lines(status: dict) -> list[str]:
    with open(status["logs"]["stderr"]) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def rows(path) -> list[dict]:
    table = pads.dataset(str(path), format="parquet", partitioning="hive").to_table()
    return sorted(table.to_pylist(), key=lambda r: r["event_id"])


@pytest.fixture(scope="module")
def produced(stack):
    records = stack.produce(CONFIG)
    return records


@pytest.fixture(scope="module")
def service(stack, tmp_path_factory):
    with serving(settings_for(stack, tmp_path_factory.mktemp("replays"))) as (url, router):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, router


def test_replay_over_http_writes_the_dataset_the_command_line_writes(stack, produced, service, tmp_path,
                                                                     caplog):
    client, router = service
    caplog.set_level(logging.INFO, logger="service.replay")
    cid = "it-replay-0123456789"
    body = {"start": iso(START), "end": iso(END), "output": str(tmp_path / "http")}
    answer = client.post("/events/replay", json=body, headers={**AUTH, "X-Correlation-ID": cid})
    assert answer.status_code == 202, answer.text
    started = answer.json()
    assert started["correlation_id"] == cid and started["records_in_range"] == len(produced)
    busy = client.post("/events/replay", json={**body, "output": str(tmp_path / "other")}, headers=AUTH)
    assert busy.status_code == 409 and started["replay_id"] in busy.json()["detail"]
    # The command line for the same range, meanwhile (the service's one-at-a-time rule is its own).
    cli = subprocess.Popen([sys.executable, "-m", "pipelines.replay", f"--brokers={BROKERS}",
                            f"--topics={stack.event_topics()}", f"--postgres_dsn={stack.dsn}",
                            f"--dlq_topic={stack.topics['dlq']}", f"--start={iso(START)}", f"--end={iso(END)}",
                            f"--output={tmp_path / 'cli'}"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)

    seen = []
    status = wait_until(client, started["status_url"],
                        lambda s: seen.append((s["state"], s["progress"]["records_read"])) or not (
                            s["state"] in ("starting", "running")))
    cli_out, cli_err = cli.communicate(timeout=DONE_WITHIN_S)
    assert status["state"] == "succeeded" and status["exit_code"] == 0, status
    assert cli.returncode == 0, cli_err[-3000:]
    assert {state for state, _ in seen} <= {"starting", "running", "succeeded"}
    assert [read for _, read in seen] == sorted(read for _, read in seen)   # progress never goes back
    assert status["progress"] == {"records_read": len(produced), "records_in_range": len(produced),
                                  "percent": 100.0}
    assert status["summary"] == {**json.loads(cli_out), "seconds": status["summary"]["seconds"]}
    assert status["manifest"]["records_read"] == len(produced)
    assert rows(tmp_path / "http") == rows(tmp_path / "cli") and len(rows(tmp_path / "cli")) > 0

    # Every line of the replay process carries the id (progress, log lines from it and its workers).
    lines = stderr_lines(status)
    assert len(lines) >= 3 and all(f"[{cid}]" in line for line in lines), [l for l in lines if f"[{cid}]" not in l]
    service_lines = [r.getMessage() for r in caplog.records if r.name == "service.replay"]
    assert len([line for line in service_lines if started["replay_id"] in line and cid in line
                and (" started: " in line or " succeeded: " in line)]) == 2, service_lines

    again = client.post("/events/replay", json=body, headers=AUTH)
    assert again.status_code == 409 and "exists; pass --overwrite" in again.json()["detail"]


def test_bad_range_is_400_with_replays_own_message(stack, service, tmp_path):
    client, _ = service
    start, end = "2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"
    answer = client.post("/events/replay", json={"start": start, "end": end, "output": str(tmp_path / "x")},
                         headers=AUTH)
    cli = replay(stack, f"--start={start}", f"--end={end}", f"--output={tmp_path / 'x'}")
    assert cli.returncode == 2
    assert answer.status_code == 400 and f"error: {answer.json()['detail']}" in cli.stderr.splitlines()
    unparseable = client.post("/events/replay", json={"start": "yesterday", "end": end, "aggregates": True},
                              headers=AUTH)
    assert unparseable.status_code == 400 and "ISO-8601" in unparseable.json()["detail"]
    missing = client.post("/events/replay", json={"end": end}, headers=AUTH)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "start"]
    assert not os.listdir(tmp_path)


def test_tokens_unknown_ids(stack, service, tmp_path):
    client, _ = service
    body = {"start": iso(START), "end": iso(END), "aggregates": True}
    assert client.post("/events/replay", json=body).status_code == 401
    wrong = client.post("/events/replay", json=body, headers={"Authorization": f"Bearer {TOKEN}x"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/events/replay/0123abcd").status_code == 401
    unknown = client.get("/events/replay/0123abcd", headers=AUTH)
    assert unknown.status_code == 404 and "0123abcd" in unknown.json()["detail"]
    with serving(settings_for(stack, tmp_path, token=None)) as (url, _):
        off = httpx.post(f"{url}/events/replay", json=body, headers=AUTH)
    assert off.status_code == 403 and "REPLAY_API_TOKEN" in off.json()["detail"]


def test_shutdown_stops_a_running_replay_and_leaves_the_old_output(stack, produced, tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "kept").write_text("the dataset a replay would replace")
    with serving(settings_for(stack, tmp_path / "replays")) as (url, router):
        with httpx.Client(base_url=url, timeout=60) as client:
            body = {"start": iso(START), "end": iso(END), "output": str(out), "overwrite": True}
            answer = client.post("/events/replay", json=body, headers={**AUTH, "X-Correlation-ID": "it-stop"})
            assert answer.status_code == 202, answer.text
            run = router.replay_runs.get(answer.json()["replay_id"])
            wait_until(client, answer.json()["status_url"], lambda s: s["state"] != "starting", timeout=120)
    # The server has stopped: the replay was terminated, reaped, and published nothing.
    assert run.wait(0)
    with pytest.raises(ChildProcessError):
        os.waitpid(run.proc.pid, os.WNOHANG)     # reaped: no zombie left
    assert group_gone(run.proc.pid, within_s=10)  # nor any of its workers (orphans: init reaps them)
    status = run.snapshot()
    assert status["state"] == "failed" and all("[it-stop]" in line for line in stderr_lines(status))
    assert (out / "kept").exists()               # nothing was published over the old output
    # Either it stopped on SIGTERM and discarded its staging folder, or (on a loaded
    # machine, seen in CI) it had not within SHUTDOWN_GRACE_S and was killed.
    assert status["exit_code"] in (1, -signal.SIGKILL), status
    if status["exit_code"] == 1:
        assert "stopped by SIGTERM" in status["error"] and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
