"""Live traffic for the latency run: valid generated events, sent with event time = send time."""
from __future__ import annotations

import time

from confluent_kafka import Producer

from schemas import default_registry
from schemas.wire import encode_avro, encode_json, plain_parsed, produce_waiting
from scripts.produce import TrafficConfig, generate
from tests.integration.conftest import TOPICS


def event_templates(count: int, seed: int) -> list[tuple]:
    """(topic key, key, headers, event type, fields, as_json) of ``count`` valid events."""
    by_topic = {name: k for k, (name, _) in TOPICS.items()}
    cfg = TrafficConfig(events=count, span_seconds=1.0, malformed_fraction=0.0, json_fraction=0.1,
                        max_disorder_ms=0, seed=seed)
    return [(by_topic[r.topic], r.key, r.headers, r.event_type, r.fields, r.value[:1] == b"{")
            for r in generate(cfg)]


class LiveSender:
    """Sends templates to the stack's topics with ``occurred_at`` = the given send time;
    delivery failures are kept in ``failures``; while ``track_acks`` is set, each
    delivered record's (ack time, record time ms) in ``acks``."""

    def __init__(self, brokers: str, topics: dict):
        reg = default_registry()
        self.topics = topics
        self.entries = {s: reg.latest(s) for s in reg.subjects("event")}
        self.parsed = {s: plain_parsed(e) for s, e in self.entries.items()}
        self.producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5, "enable.idempotence": True,
                                  "queue.buffering.max.messages": 500000})
        self.failures: list[str] = []
        self.track_acks = False
        self.acks: list[tuple[float, int]] = []

    def _on_delivery(self, err, _msg) -> None:
        if err is not None:
            self.failures.append(str(err))
        elif self.track_acks:
            self.acks.append((time.time(), _msg.timestamp()[1]))

    def send(self, template: tuple, now_ms: int) -> None:
        """Encodes ``template`` (of ``event_templates``) with event time ``now_ms`` and produces it."""
        topic_key, key, headers, etype, fields, as_json = template
        fields = dict(fields, occurred_at=now_ms)
        value = (encode_json(etype, fields) if as_json
                 else encode_avro(self.entries[etype], fields, self.parsed[etype]))
        produce_waiting(self.producer, self.topics[topic_key], value, key, timestamp=now_ms, headers=headers,
                        on_delivery=self._on_delivery)
        self.producer.poll(0)

    def flush(self, timeout: float) -> None:
        self.producer.flush(timeout)
