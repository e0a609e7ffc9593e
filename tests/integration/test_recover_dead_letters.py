"""Dead-letter recovery on the real Kafka and Postgres: re-published once, attempts counted.

One small stream per module: valid events, OUT_OF_RANGE records on two topics
(with and without a correlation id) and BAD_FRAMING records. The streaming job
turns the bad ones into dead letters; ``pipelines.recover_dead_letters`` runs as a
subprocess, as an operator would run it. Nothing is fixed in between, so the
re-published records fail again, which shows the attempt counted end to end.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timezone

import psycopg2
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas import default_registry
from schemas.wire import encode_avro
from scripts.produce import Produced, TrafficConfig, generate, produce
from tests.integration.conftest import BROKERS, REPO
from tests.integration.readback import postgres_scalar, topic_records

pytestmark = pytest.mark.integration


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat()


def _json(topic: str, event_type: str, fields: dict, corr: str | None) -> Produced:
    value = json.dumps(dict(fields, event_type=event_type, correlation_id=corr)).encode()
    headers = [("correlation_id", corr.encode())] if corr else []
    return Produced(topic, fields["user_id"].encode(), value, fields["occurred_at"], headers,
                    event_type, None, "OUT_OF_RANGE")


def bad_records(stack, now_ms: int) -> list[Produced]:
    """5 OUT_OF_RANGE records on two topics (one without correlation id), 3 BAD_FRAMING."""
    def base(i: int) -> dict:
        return {"event_id": str(uuid.uuid4()), "occurred_at": now_ms - 1000 * i, "user_id": f"user-{i:05d}"}

    content, learning = stack.topic_for("content.events.v1"), stack.topic_for("learning.events.v1")
    out = [_json(content, "content_rated", dict(base(i), content_id="content-0001", rating=9),
                 f"rate-{i}" if i else None) for i in range(3)]
    out += [_json(learning, "session_ended", dict(base(10 + i), session_id=f"s-{i}", course_id="c",
                                                   duration_ms=-5000), f"end-{i}") for i in range(2)]
    out += [Produced(learning, b"user-00099", f"\x07garbage-{i}".encode(), now_ms,
                     [("correlation_id", f"frame-{i}".encode())], "question_answered", None, "BAD_FRAMING")
            for i in range(3)]
    return out


@pytest.fixture(scope="module")
def produced(stack):
    began = int(time.time() * 1000)
    valid = [r._replace(topic=stack.topic_for(r.topic))
             for r in generate(TrafficConfig(events=200, users=10, span_seconds=60, seed=11))]
    bad = bad_records(stack, began)
    produce(iter(valid + bad), BROKERS)
    return {"began_ms": began, "bad": bad}


@pytest.fixture(scope="module")
def first_run(stack, produced):
    proc = stack.run_streaming(until_idle=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"ended_ms": int(time.time() * 1000) + 1000}


@pytest.fixture(scope="module")
def letters(stack, first_run):
    """The dead letters of the first run: [(message, record)]."""
    got = topic_records(BROKERS, stack.topics["dlq"])
    assert Counter(rec["error_code"] for _, rec in got) == {"OUT_OF_RANGE": 5, "BAD_FRAMING": 3}
    return got


def recover(stack, produced, first_run, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.recover_dead_letters",
           "--since", _iso(produced["began_ms"] - 1000), "--until", _iso(first_run["ended_ms"]),
           "--dlq_topic", stack.topics["dlq"], "--postgres_dsn", stack.dsn, "--brokers", BROKERS,
           "--timeout", "30", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def summary(stdout: str) -> dict:
    found = re.findall(r"^  (selected|republished|would republish|already done|needs a look)\s+(\d+)$",
                       stdout, re.M)
    return {k: int(v) for k, v in found}


def raw_records(topic: str) -> list:
    """Every record of ``topic`` as confluent_kafka messages (values not decoded)."""
    c = Consumer({"bootstrap.servers": BROKERS, "group.id": f"raw-{uuid.uuid4()}", "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out, pending = [], {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 20
        while pending:
            assert time.monotonic() < deadline, f"{topic}: could not read to the end ({pending} pending)"
            # A short wait: consume() waits its whole timeout unless 1000 records come.
            for m in c.consume(1000, timeout=0.2):
                if m.offset() < ends[m.partition()]:
                    out.append(m)
                if m.offset() + 1 >= ends[m.partition()]:
                    pending.discard(m.partition())
        return out
    finally:
        c.close()


def republished(stack) -> list:
    """The records the recovery wrote: those with a dlq_attempt header, on every event topic."""
    return [m for t in stack.event_topics().split(",") for m in raw_records(t)
            if any(k == "dlq_attempt" for k, _ in m.headers() or ())]


def headers(m) -> dict:
    return {k: v for k, v in m.headers() or ()}


def of_code(letters, code: str) -> list:
    return [(m, rec) for m, rec in letters if rec["error_code"] == code]


@pytest.mark.parametrize("extra, says", [
    (["--since", "2026-05-04T10:00:00Z", "--until", "2026-05-04T09:00:00Z"], "is not before"),
    (["--since", "2026-05-04T09:00:00Z", "--until", "2026-05-04T10:00:00Z",
      "--dlq_topic", "analytics.dlq.v1.no-such-topic"], "does not exist"),
    (["--since", "2026-05-04T09:00:00Z", "--until", "2026-05-04T10:00:00Z",
      "--postgres_dsn", "postgresql://analytics:secret@127.0.0.1:1/analytics"], "cannot reach Postgres"),
])
def test_a_bad_request_exits_2_with_one_error_line(services, extra, says):
    proc = subprocess.run([sys.executable, "-m", "pipelines.recover_dead_letters", "--brokers", BROKERS, *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr
    assert "secret" not in proc.stderr and proc.stdout == ""


def test_a_dry_run_reports_and_writes_nothing(stack, produced, first_run, letters):
    proc = recover(stack, produced, first_run, "--error-code", "OUT_OF_RANGE", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc.stdout) == {"selected": 5, "would republish": 5, "already done": 0, "needs a look": 0}
    assert republished(stack) == []
    # The streaming job applied schemas/postgres.sql, so the ledger exists; it must be empty.
    assert postgres_scalar(stack.dsn, "SELECT count(*) FROM dead_letter_recoveries") == 0


@pytest.fixture(scope="module")
def recovered(stack, produced, first_run, letters):
    began = time.monotonic()
    proc = recover(stack, produced, first_run, "--error-code", "OUT_OF_RANGE")
    print(f"recovery took {time.monotonic() - began:.2f}s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_recovery_republishes_the_raw_bytes_with_attempt_and_correlation(stack, letters, recovered):
    assert summary(recovered.stdout) == {"selected": 5, "republished": 5, "already done": 0, "needs a look": 0}
    chosen = {(m.partition(), m.offset()): rec for m, rec in of_code(letters, "OUT_OF_RANGE")}
    sent = republished(stack)
    assert len(sent) == 5
    for m in sent:
        h = headers(m)
        dlq_topic, part, offset = h["dlq_origin"].decode().rsplit(":", 2)
        rec = chosen.pop((int(part), int(offset)))
        assert dlq_topic == stack.topics["dlq"]
        assert m.value() == rec["raw_bytes"] and m.key() is None
        assert (m.topic(), m.partition()) == (rec["source_topic"], rec["source_partition"])
        assert h["dlq_attempt"] == b"1"
        assert h.get("correlation_id") == (rec["correlation_id"].encode() if rec["correlation_id"] else None)
    assert chosen == {}  # each dead letter exactly once
    assert sum(1 for m in sent if "correlation_id" not in headers(m)) == 1
    with psycopg2.connect(stack.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT status, republished_partition, republished_offset FROM dead_letter_recoveries")
        rows = cur.fetchall()
    assert sorted(rows) == sorted(("published", m.partition(), m.offset()) for m in sent)


def test_a_second_run_publishes_nothing_more(stack, produced, first_run, recovered):
    before = len(republished(stack))
    proc = recover(stack, produced, first_run, "--error-code", "OUT_OF_RANGE")
    assert proc.returncode == 0, proc.stderr
    assert summary(proc.stdout) == {"selected": 5, "republished": 0, "already done": 5, "needs a look": 0}
    assert len(republished(stack)) == before == 5


def test_rereading_them_gives_new_dead_letters_with_attempt_1(stack, letters, recovered):
    sent = {(m.topic(), m.partition(), m.offset()): m for m in republished(stack)}
    proc = stack.run_streaming(until_idle=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    now = topic_records(BROKERS, stack.topics["dlq"])
    again = [rec for _, rec in now if rec["attempt"] == 1]
    assert len(now) == len(letters) + 5 and len(again) == 5
    for rec in again:
        m = sent.pop((rec["source_topic"], rec["source_partition"], rec["source_offset"]))
        assert rec["error_code"] == "OUT_OF_RANGE" and rec["raw_bytes"] == m.value()
        kept = headers(m).get("correlation_id")
        assert rec["correlation_id"] == (kept.decode() if kept else None)
    assert sent == {}
    assert all(rec["attempt"] == 0 for _, rec in letters)


def test_a_claim_left_by_a_crash_is_reported_not_republished(stack, produced, first_run, letters, recovered):
    framing = of_code(letters, "BAD_FRAMING")
    crashed_m, crashed = framing[0]
    # What a crash between claiming and confirming leaves behind: a 'claimed' row.
    with psycopg2.connect(stack.dsn) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO dead_letter_recoveries (dlq_topic, dlq_partition, dlq_offset, source_topic, "
                    "source_partition, source_offset, attempt, error_code, failed_at, status) "
                    "VALUES (%s, %s, %s, %s, %s, %s, 0, 'BAD_FRAMING', now(), 'claimed')",
                    (stack.topics["dlq"], crashed_m.partition(), crashed_m.offset(), crashed["source_topic"],
                     crashed["source_partition"], crashed["source_offset"]))
    proc = recover(stack, produced, first_run, "--error-code", "BAD_FRAMING")
    assert proc.returncode == 1
    assert summary(proc.stdout) == {"selected": 3, "republished": 2, "already done": 0, "needs a look": 1}
    assert f"{stack.topics['dlq']}:{crashed_m.partition()}:{crashed_m.offset()}" in proc.stdout
    assert "never confirmed published" in proc.stdout and "--retry-unconfirmed" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 1 dead letter(s) need a look")
    values = Counter(m.value() for m in republished(stack))
    assert crashed["raw_bytes"] not in values
    assert all(values[rec["raw_bytes"]] == 1 for _, rec in framing[1:])

    proc = recover(stack, produced, first_run, "--error-code", "BAD_FRAMING", "--retry-unconfirmed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(proc.stdout) == {"selected": 3, "republished": 1, "already done": 2, "needs a look": 0}
    proc = recover(stack, produced, first_run, "--error-code", "BAD_FRAMING")
    assert summary(proc.stdout) == {"selected": 3, "republished": 0, "already done": 3, "needs a look": 0}
    values = Counter(m.value() for m in republished(stack))
    assert all(values[rec["raw_bytes"]] == 1 for _, rec in framing)


def test_a_second_copy_of_a_recovered_dead_letter_counts_as_already_done(stack, letters, recovered):
    # A retried bundle of the streaming job can write one failure twice, at another
    # DLQ offset and with another failed_at: the ledger's source key catches it.
    _, rec = of_code(letters, "OUT_OF_RANGE")[0]
    copy_at = int(datetime(2020, 1, 1, 12, tzinfo=timezone.utc).timestamp() * 1000)
    p = Producer({"bootstrap.servers": BROKERS})
    entry = default_registry().latest("dead_letter")
    p.produce(stack.topics["dlq"], encode_avro(entry, dict(rec, failed_at=copy_at)))
    assert p.flush(30) == 0
    before = len(republished(stack))
    proc = recover(stack, {"began_ms": copy_at + 1000}, {"ended_ms": copy_at + 60_000},
                   "--error-code", "OUT_OF_RANGE")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(proc.stdout) == {"selected": 1, "republished": 0, "already done": 1, "needs a look": 0}
    assert len(republished(stack)) == before
