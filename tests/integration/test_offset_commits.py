"""Offset commits against the real broker: a group never moves back."""
from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from transforms.kafka_read import KafkaReadConfig, _GroupCommits

pytestmark = pytest.mark.integration


def committed(stack, topic: str, partition: int) -> TopicPartition:
    c = Consumer({"bootstrap.servers": stack.brokers, "group.id": stack.group_id})
    try:
        return c.committed([TopicPartition(topic, partition)], timeout=10)[0]
    finally:
        c.close()


def test_a_bundle_finalized_late_with_a_lower_offset_never_moves_the_group_back(stack):
    commits = _GroupCommits.of(KafkaReadConfig(brokers=stack.brokers, group_id=stack.group_id))
    topic = stack.topics["learning"]
    assert commits.commit(TopicPartition(topic, 1, 200, metadata="1000"))
    assert not commits.commit(TopicPartition(topic, 1, 100, metadata="900"))    # an older bundle, finalized last
    assert commits.commit(TopicPartition(topic, 1, 200, metadata="2000"))       # an idle partition's re-commit
    assert commits.commit(TopicPartition(topic, 2, 50, metadata="1500"))        # partitions are apart
    deadline = time.monotonic() + 20
    while (committed(stack, topic, 1).metadata, committed(stack, topic, 2).offset) != ("2000", 50):
        assert time.monotonic() < deadline, committed(stack, topic, 1)
        time.sleep(0.2)
    time.sleep(1)  # anything still in flight would land by now
    assert (committed(stack, topic, 1).offset, committed(stack, topic, 1).metadata) == (200, "2000")
