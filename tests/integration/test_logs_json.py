"""--log_format json on the real stack: every log line of the streaming job is a JSON object,
with its start, its stop and dead-letter summaries whose counts equal the bad records produced."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from scripts.produce import TrafficConfig

pytestmark = pytest.mark.integration

CONFIG = TrafficConfig(events=1500, users=20, concepts=6, content_items=10, span_seconds=600,
                       malformed_fraction=0.06, json_fraction=0.2, seed=909)


def json_lines(stderr: str) -> list[dict]:
    """Every stderr line that starts with '{', parsed (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_the_job_logs_json_start_stop_and_dead_letter_counts(stack):
    records = stack.produce(CONFIG)
    bad = Counter(r.error_code for r in records if r.error_code)
    assert sum(bad.values()) > 20

    proc = stack.run_streaming(until_idle=3, log_format="json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = json_lines(proc.stderr)
    assert all({"time", "level", "logger", "message", "correlation_id"} <= set(line) for line in lines)

    [start] = [line for line in lines if line.get("event") == "job_start"]
    assert start["level"] == "INFO" and start["options"]["group_id"] == stack.group_id
    assert start["options"]["log_format"] == "json"
    assert "analytics:***@" in start["options"]["postgres_dsn"]  # redacted
    assert "analytics:analytics@" not in json.dumps(start)

    [stop] = [line for line in lines if line.get("event") == "job_stop"]
    assert stop["exit_code"] == 0 and stop["reason"] == "drained (--until_idle)"
    assert lines.index(start) < lines.index(stop)

    summaries = [line for line in lines if line.get("event") == "dead_letter_summary"]
    assert summaries and all(s["level"] == "INFO" for s in summaries)
    total = Counter()
    for s in summaries:
        assert s["total"] == sum(s["counts"].values())
        total.update(s["counts"])
    assert total == bad
    assert not any(line.get("event") == "dead_letter" for line in lines)  # DEBUG lines: off at INFO
