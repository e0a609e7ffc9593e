"""The project's Kafka topics: one owner for their names and partition counts.

Each subject in schemas/registry.json names the topic its records travel on,
so the names come from there; the partition counts, which only the topic
creator and the tests' isolated copies need, live here. Importable without
Beam (scripts use it).
"""
from __future__ import annotations

from schemas.registry import default_registry

# Partitions per topic, as scripts/create_topics.py creates them.
PARTITIONS: dict[str, int] = {
    "learning.events.v1": 6,
    "content.events.v1": 3,
    "engagement.events.v1": 3,
    "analytics.dlq.v1": 1,
    "analytics.aggregated.v1": 3,
    "analytics.alerts.v1": 1,
}


def _topic_of(subject: str) -> str:
    return default_registry().latest(subject).topic


def event_topics() -> tuple[str, ...]:
    """The topics events arrive on, in the registry's order."""
    registry = default_registry()
    return tuple(dict.fromkeys(registry.latest(s).topic for s in registry.subjects("event")))


EVENT_TOPICS: tuple[str, ...] = event_topics()
DLQ_TOPIC: str = _topic_of("dead_letter")
AGGREGATES_TOPIC: str = _topic_of("aggregated_metric")
ALERTS_TOPIC: str = _topic_of("alert")
