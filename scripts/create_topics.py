#!/usr/bin/env python3
"""Create the project's Kafka topics, idempotently.

Usage: create_topics.py [name:partitions ...]

Bootstrap servers come from $KAFKA_BROKERS (default 127.0.0.1:9092). The topics
and their partition counts are schemas/topics.py's. Topics that
already exist are left alone (their partition count is reported, not changed).
Extra name:partitions arguments are created in addition to the defaults.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file by stack.sh

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.settings import setting  # noqa: E402  (after the path line)
from schemas.topics import PARTITIONS  # noqa: E402
REPLICATION_FACTOR = 1  # single-node local broker


def parse_extra(args):
    topics = {}
    for arg in args:
        name, sep, parts = arg.rpartition(":")
        if not sep or not name or not parts.isdigit() or int(parts) < 1:
            raise SystemExit(f"bad topic spec {arg!r}: expected name:partitions, e.g. my.topic.v1:3")
        topics[name] = int(parts)
    return topics


def main(argv):
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    brokers = setting("KAFKA_BROKERS")
    wanted = dict(PARTITIONS)
    wanted.update(parse_extra(argv))

    # librdkafka logs every failed reconnect to stderr; our own error message is enough.
    quiet = logging.getLogger("create_topics.librdkafka")
    quiet.setLevel(logging.CRITICAL)
    admin = AdminClient({"bootstrap.servers": brokers, "socket.timeout.ms": 10000}, logger=quiet)
    try:
        existing = admin.list_topics(timeout=15).topics
    except KafkaException as exc:
        print(f"cannot reach Kafka at {brokers}: {exc}", file=sys.stderr)
        return 2

    new = [
        NewTopic(name, num_partitions=parts, replication_factor=REPLICATION_FACTOR)
        for name, parts in wanted.items()
        if name not in existing
    ]
    for name, parts in wanted.items():
        if name in existing:
            have = len(existing[name].partitions)
            note = "" if have == parts else f" (wanted {parts}; not changed)"
            print(f"exists   {name} partitions={have}{note}")

    failed = 0
    for name, future in (admin.create_topics(new, request_timeout=30).items() if new else []):
        try:
            future.result()
            print(f"created  {name} partitions={wanted[name]}")
        except KafkaException as exc:
            err = exc.args[0]
            # Lost a race with another creator: still fine.
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                print(f"exists   {name}")
            else:
                print(f"FAILED   {name}: {err}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
