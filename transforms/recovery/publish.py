"""Producing the chosen dead letters' raw bytes again, and the whole recovery (``recover``)."""
from __future__ import annotations

from confluent_kafka import Producer

from schemas.postgres import apply_schema
from schemas.wire import produce_waiting
from transforms.recovery.ledger import claim, confirm, connect, triage
from transforms.recovery.read import check_sources, kafka_partitions, progress, select
from transforms.recovery.request import BadRequest, RecoveryRequest, Stored, Tally

CHUNK = 500  # dead letters claimed, produced and confirmed together: bounds what a crash leaves unconfirmed


def recover(request: RecoveryRequest) -> Tally:
    """Reads, chooses, claims, re-publishes and confirms; returns the counts.

    Raises BadRequest (unknown topic, Kafka or Postgres unreachable) or
    RecoveryFailed, KafkaException, psycopg2.Error (something broke midway).
    """
    partitions = kafka_partitions(request.brokers, request.timeout_s)
    if request.dlq_topic not in partitions:
        raise BadRequest(f"topic {request.dlq_topic} does not exist on {request.brokers}")
    conn = connect(request.postgres_dsn)
    try:
        if not request.dry_run:
            apply_schema(conn)  # before reading: a DDL problem should cost no minutes of reading
        tally = Tally()
        chosen = check_sources(select(request, partitions[request.dlq_topic], tally), partitions, tally)
        todo, reclaimed = triage(request, conn, chosen, tally)
        if request.dry_run:
            tally.republished.update(s.letter.error_code for s in todo)
        elif todo:
            publish(request, conn, todo, reclaimed, partitions, tally)
        return tally
    finally:
        conn.close()


def publish(request: RecoveryRequest, conn, todo: list[Stored], reclaimed: set[tuple[int, int]],
            partitions: dict[str, int], tally: Tally) -> None:
    """Claim, produce, flush, confirm; chunk by chunk."""
    producer = Producer({"bootstrap.servers": request.brokers, "enable.idempotence": True,
                         "linger.ms": 20, "message.timeout.ms": 45000})
    every = request.progress_every
    for i in range(0, len(todo), CHUNK):
        chunk = todo[i:i + CHUNK]
        # Rows claimed by an earlier run are ours only with retry_unconfirmed (triage decided).
        ours = claim(conn, request.dlq_topic, [s for s in chunk if s.origin not in reclaimed])
        ours |= {s.origin for s in chunk if s.origin in reclaimed}
        for s in chunk:
            if s.origin not in ours:
                tally.needs_look(s, "claimed by a concurrent run just now")
        chunk = [s for s in chunk if s.origin in ours]
        delivered, failed = produce_chunk(producer, request.dlq_topic, chunk, partitions)
        confirm(conn, request.dlq_topic, delivered)
        for s in chunk:
            if s.origin in delivered:
                tally.republished[s.letter.error_code] += 1
            else:
                tally.needs_look(s, f"delivery failed, row stays claimed: {failed[s.origin]}")
        done = min(i + CHUNK, len(todo))
        if done // every > i // every or done == len(todo):
            progress(f"  republished {sum(tally.republished.values())} of {len(todo)}")


def produce_chunk(producer: Producer, dlq_topic: str, chunk: list[Stored],
                  partitions: dict[str, int]) -> tuple[dict, dict]:
    """Produces and flushes ``chunk``.

    Returns ({origin: (partition, offset) written}, {origin: error}) by dead-letter origin.
    """
    delivered: dict = {}
    failed: dict = {}

    def report(origin: tuple[int, int]):
        def on_delivery(err, msg):
            if err is None:
                delivered[origin] = (msg.partition(), msg.offset())
            else:
                failed[origin] = err.str()
        return on_delivery

    for s in chunk:
        dl = s.letter
        headers = [("dlq_attempt", str(dl.attempt + 1).encode()),
                   ("dlq_origin", f"{dlq_topic}:{s.partition}:{s.offset}".encode())]
        if dl.correlation_id:
            headers.insert(0, ("correlation_id", dl.correlation_id.encode()))
        # Same partition as the original when it still exists, so the record keeps its
        # place among its key's records; otherwise the partitioner picks one.
        kwargs = {"partition": dl.source_partition} if dl.source_partition < partitions[dl.source_topic] else {}
        produce_waiting(producer, dl.source_topic, dl.raw_bytes, None, headers=headers,
                        on_delivery=report(s.origin), **kwargs)
        producer.poll(0)
    left = producer.flush(60)
    for s in chunk:
        if s.origin not in delivered and s.origin not in failed:
            failed[s.origin] = f"no delivery report after 60s ({left} records still queued)"
    return delivered, failed
