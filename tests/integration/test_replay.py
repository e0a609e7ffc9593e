"""The replay job on the real stack: dataset counts, replay equals streaming,
the archive filling in what retention deleted, and bad requests."""
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone

import psycopg2
import pyarrow.dataset as pads
import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from scripts.produce import TrafficConfig
from tests.integration.conftest import BROKERS, REPO
from tests.integration.expected import assert_metrics_match

pytestmark = pytest.mark.integration

HOUR = 3_600_000
END = (int(time.time() * 1000) // HOUR - 1) * HOUR   # a closed range: whole hours, in the past
CONFIG = TrafficConfig(events=4000, users=40, concepts=8, content_items=20, span_seconds=2 * 3600 - 10,
                       end_time_ms=END - 5_000, malformed_fraction=0.04, json_fraction=0.2, seed=77)


def iso(ms):
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def replay(stack, *args, timeout=300):
    cmd = [sys.executable, "-m", "pipelines.replay", f"--brokers={BROKERS}", f"--topics={stack.event_topics()}",
           f"--postgres_dsn={stack.dsn}", f"--dlq_topic={stack.topics['dlq']}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def produced(stack):
    records = stack.produce(CONFIG)
    assert stack.run_streaming(until_idle=4).returncode == 0
    return records


def rows(dsn, table):
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT window_seconds, window_start, family, entity_id, metrics FROM {table} "
                    "WHERE window_seconds < 86400")
        return {r[:4]: r[4] for r in cur.fetchall()}


def test_dataset_matches_what_was_produced_and_replay_equals_streaming(stack, produced, tmp_path):
    out = tmp_path / "ds"
    proc = replay(stack, f"--start={iso(END - 2 * HOUR)}", f"--end={iso(END)}", f"--output={out}", "--aggregates",
                  "--progress_every=0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [tuple(int(n.replace(",", "")) for n in re.findall(r"read ([\d,]+) of ([\d,]+) records", line)[0])
                for line in proc.stderr.splitlines() if line.startswith("replay: read ")]
    assert [read for read, _ in progress] == sorted(read for read, _ in progress)  # never goes back
    assert progress[-1] == (len(produced), len(produced))  # the last line: everything read
    valid = Counter(r.event_type for r in produced if r.error_code is None)
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert Counter(table.column("event_type").to_pylist()) == valid
    ids = table.column("event_id").to_pylist()
    assert len(ids) == len(set(ids)) == sum(valid.values())
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["dead_letters_by_code"] == dict(Counter(r.error_code for r in produced if r.error_code))
    assert manifest["records_read"] == len(produced) and manifest["archive"]["used"] is False
    assert sum(manifest["events_by_type_and_schema_version"].values()) == sum(valid.values())
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # staging removed
    streamed, replayed = rows(stack.dsn, "window_metrics"), rows(stack.dsn, "window_metrics_replay")
    assert replayed
    assert_metrics_match(streamed, replayed)  # equal up to float summation order

    again = replay(stack, f"--start={iso(END - 2 * HOUR)}", f"--end={iso(END)}", "--aggregates")
    assert again.returncode == 0 and rows(stack.dsn, "window_metrics_replay") == replayed  # idempotent

    refused = replay(stack, f"--start={iso(END - 2 * HOUR)}", f"--end={iso(END)}", f"--output={out}")
    assert refused.returncode == 2 and "exists" in refused.stderr


def test_retention_gap_is_read_from_the_archive(stack, produced, tmp_path):
    topic = stack.topic_for("learning.events.v1")
    admin = AdminClient({"bootstrap.servers": BROKERS})
    for f in admin.delete_records([TopicPartition(topic, 0, 200)]).values():
        f.result(30)
    out = tmp_path / "ds"
    proc = replay(stack, f"--start={iso(END - 2 * HOUR)}", f"--end={iso(END)}", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["archive"]["used"] is True and manifest["archive"]["events_read"] > 0
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert Counter(table.column("event_type").to_pylist()) == Counter(
        r.event_type for r in produced if r.error_code is None)


@pytest.mark.parametrize("args,words", [
    (["--start=2026-01-02T00:00:00Z", "--end=2026-01-01T00:00:00Z"], "not after its start"),
    (["--start=2999-01-01T00:00:00Z", "--end=2999-01-02T00:00:00Z"], "future"),
    (["--offsets=no.such.topic:0:0-10"], "does not exist"),
    (["--start=yesterday", "--end=2026-01-01T00:00:00Z"], "ISO-8601"),
])
def test_bad_requests_exit_2_and_write_nothing(stack, tmp_path, args, words):
    out = tmp_path / "ds"
    proc = replay(stack, *args, f"--output={out}")
    assert proc.returncode == 2 and words in proc.stderr, proc.stderr[-2000:]
    assert not os.listdir(tmp_path)


def test_offsets_outside_the_partition_are_refused(stack, produced, tmp_path):
    topic = stack.topic_for("content.events.v1")
    proc = replay(stack, f"--offsets={topic}:0:0-999999", f"--output={tmp_path / 'ds'}")
    assert proc.returncode == 2 and "outside what the partition holds" in proc.stderr
