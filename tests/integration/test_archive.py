"""The raw-event archive against the real Postgres: what it cannot store becomes a dead letter.

Validation refuses what Postgres cannot store (NUL, lone surrogates, NaN);
these tests hand the archive such events directly, as a gap in validation
would, and require the rest of the batch archived and one PROCESSING_ERROR
dead letter per refused event, with its coordinates, instead of a failed
bundle that every restart would fail again.
"""
from __future__ import annotations

from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from tests.helpers import BASE_MS, answer
from tests.integration.readback import postgres_scalar
from transforms.records import Event
from transforms.sinks.postgres_sink import ArchiveRawEventsFn
from transforms.validation import ErrorCode


def at(offset: int, fields: dict) -> Event:
    return Event("question_answered", fields["occurred_at"], fields, 1, 1, "learning.events.v1", 2, offset)


def archive(dsn: str, *batches: list) -> list:
    """Runs the DoFn over one bundle of ``batches``; returns what it output."""
    fn = ArchiveRawEventsFn(dsn)
    fn.setup()
    try:
        for i, batch in enumerate(batches):
            fn.process(batch, timestamp=Timestamp(micros=(BASE_MS + i) * 1000), window=GlobalWindow())
        return list(fn.finish_bundle())
    finally:
        fn.teardown()


def test_an_event_postgres_refuses_is_one_dead_letter_and_its_batch_is_archived(stack):
    first = [at(100 + i, answer(BASE_MS + i * 1000, user=f"u{i}")) for i in range(6)]
    first[3] = at(103, answer(BASE_MS + 3000, user="nul\x00here"))
    second = [at(200 + i, answer(BASE_MS + 86_400_000 + i, user=f"v{i}")) for i in range(4)]

    out = archive(stack.dsn, first, second)

    assert postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events WHERE source_offset < 300") == 9
    assert postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events WHERE source_offset = 103") == 0
    assert len(out) == 1
    letter = out[0].value
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == ("learning.events.v1", 2, 103)
    assert letter.error_code == ErrorCode.PROCESSING_ERROR
    assert "Postgres refused to archive it" in letter.error_message and "0x00" in letter.error_message
    assert out[0].timestamp == Timestamp(micros=BASE_MS * 1000)   # its batch's, so never behind the watermark
    assert list(out[0].windows) == [GlobalWindow()]


def test_a_re_delivered_batch_with_a_refused_event_archives_nothing_twice(stack):
    batch = [at(300 + i, answer(BASE_MS + 7_200_000 + i, user=f"w{i}")) for i in range(5)]
    batch[0] = at(300, answer(BASE_MS + 7_200_000, user="\x00"))
    before = postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events")

    first, again = archive(stack.dsn, batch), archive(stack.dsn, batch)

    assert postgres_scalar(stack.dsn, "SELECT count(*) FROM raw_events") == before + 4
    assert [w.value.source_offset for w in first] == [w.value.source_offset for w in again] == [300]
