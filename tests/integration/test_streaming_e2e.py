"""The streaming job end to end on the real Kafka, Redis and Postgres.

One generated stream (5% malformed, a fifth JSON) is produced once per module;
the job runs on it with --until_idle, and each test checks one thing that
landed against values computed here from the produced events.
"""
from collections import Counter

import pytest

from scripts.produce import TrafficConfig
from tests.integration.conftest import BROKERS
from tests.integration.expected import assert_metrics_match, expected_metrics
from tests.integration.readback import postgres_metrics, postgres_scalar, redis_metrics, topic_records

pytestmark = pytest.mark.integration

CONFIG = TrafficConfig(events=6000, users=60, concepts=12, content_items=25, span_seconds=1500,
                       malformed_fraction=0.05, json_fraction=0.2, seed=2026)


@pytest.fixture(scope="module")
def produced(stack):
    records = stack.produce(CONFIG)
    return records


@pytest.fixture(scope="module")
def first_run(stack, produced):
    proc = stack.run_streaming(until_idle=5, early_firing=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def valid_events(produced):
    return [(r.event_type, r.fields) for r in produced if r.error_code is None]


def test_postgres_aggregates_equal_an_independent_count(stack, produced, first_run):
    expected = expected_metrics(valid_events(produced))
    assert {k[0] for k in expected} == {60, 300, 3600, 86400}
    assert_metrics_match(expected, postgres_metrics(stack.dsn))


def test_redis_holds_the_same_values(stack, produced, first_run):
    assert_metrics_match(expected_metrics(valid_events(produced)), redis_metrics(stack.redis_url))


def test_every_bad_record_is_exactly_one_dead_letter(stack, produced, first_run):
    letters = topic_records(BROKERS, stack.topics["dlq"])
    want = Counter(r.error_code for r in produced if r.error_code)
    assert Counter(rec["error_code"] for _, rec in letters) == want
    by_coordinates = {(rec["source_topic"], rec["source_offset"], rec["source_partition"]) for _, rec in letters}
    assert len(by_coordinates) == len(letters)
    sent = {r.value for r in produced if r.error_code}
    for _, rec in letters:
        assert rec["raw_bytes"] in sent and rec["error_message"]


def test_every_valid_event_is_archived_once(stack, produced, first_run):
    valid = valid_events(produced)
    assert postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events") == len(valid)
    assert postgres_scalar(stack.dsn, "SELECT count(DISTINCT event_id) FROM raw_events") == len(valid)
    days = {f["occurred_at"] // 86_400_000 for _, f in valid}
    partitions = postgres_scalar(stack.dsn, "SELECT count(*) FROM pg_inherits "
                                            "WHERE inhparent = 'raw_events'::regclass")
    assert partitions == len(days)


def test_aggregates_topic_has_every_window_entity(stack, produced, first_run):
    got = {(rec["window_seconds"], rec["window_start"], rec["family"], rec["entity_id"])
           for _, rec in topic_records(BROKERS, stack.topics["aggregated"])}
    assert got == set(expected_metrics(valid_events(produced)))


def test_offsets_are_committed_so_a_restart_reads_nothing_again(stack, produced, first_run):
    before = postgres_metrics(stack.dsn)
    proc = stack.run_streaming(until_idle=3)
    assert proc.returncode == 0
    assert "ReadEvents.records_read" not in proc.stdout or " 0" in proc.stdout.split(
        "ReadEvents.records_read")[1].splitlines()[0]
    # The restart writes its seeded windows again: the same totals (summed in
    # another order, so a float may differ in its last digit).
    assert_metrics_match(before, postgres_metrics(stack.dsn))


def test_replaying_the_same_stream_from_the_start_changes_nothing(stack, produced, first_run):
    before_rows = postgres_metrics(stack.dsn)
    before_events = postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events")
    proc = stack.run_streaming(until_idle=5, group_id=f"{stack.group_id}-again", start_from="earliest")
    assert proc.returncode == 0
    assert postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events") == before_events
    assert_metrics_match(expected_metrics(valid_events(produced)), postgres_metrics(stack.dsn))
    assert set(postgres_metrics(stack.dsn)) == set(before_rows)
