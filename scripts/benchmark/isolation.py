"""The benchmark's isolated stack: tests/integration/conftest.py's ``isolated_stack``
(own topics, Postgres schema, Redis DB) plus a consumer group per run, its
brokers and Redis DB from the command line, and extra streaming-job arguments."""
from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from scripts.benchmark.common import WINDOW_SIZES_S
from tests.integration.conftest import REDIS_BASE, TOPICS, Stack, isolated_stack

EVENT_KEYS = ("learning", "content", "engagement")


def new_suffix() -> str:
    """A fresh topic suffix of one benchmark run."""
    return f"bench{uuid.uuid4().hex[:8]}"


def planned(suffix: str, redis_db: int) -> dict:
    """What ``isolated(suffix, ...)`` sets up, for the report: suffix, topics, schema, Redis URL."""
    return {"suffix": suffix, "topics": {k: f"{name}.{suffix}" for k, (name, _) in TOPICS.items()},
            "schema": f"bench_{suffix}", "redis_url": f"{REDIS_BASE}/{redis_db}"}


@dataclass
class Bench:
    """A conftest ``Stack`` with the benchmark's brokers, consumer groups and job arguments."""
    stack: Stack
    brokers: str
    extra_job_args: tuple[str, ...] = ()
    groups: list[str] = field(default_factory=list)

    @property
    def suffix(self) -> str:
        return self.stack.suffix

    @property
    def topics(self) -> dict:
        return self.stack.topics

    @property
    def dsn(self) -> str:
        return self.stack.dsn

    @property
    def redis_url(self) -> str:
        return self.stack.redis_url

    def group(self, label: str) -> str:
        """A new consumer group named after ``label``, deleted at the end."""
        g = f"{self.suffix}-{label.replace(', ', '-').replace(' ', '-')}"
        self.groups.append(g)
        return g

    def event_topics(self) -> list[str]:
        """The three event topics."""
        return [self.topics[k] for k in EVENT_KEYS]

    def pipeline_args(self, group_id: str, **extra) -> list[str]:
        """``pipelines.streaming`` arguments for this stack and ``group_id``, then ``extra``
        and the --pipeline-arg ones."""
        return self.stack.pipeline_args(brokers=self.brokers, group_id=group_id,
                                        window_sizes=",".join(map(str, WINDOW_SIZES_S)),
                                        **extra) + list(self.extra_job_args)


def _await_metadata(bench: Bench, timeout_s: float = 20) -> None:
    """Waits until every topic shows with all its partitions (then 1 s more)."""
    deadline = time.monotonic() + timeout_s
    c = Consumer({"bootstrap.servers": bench.brokers, "group.id": f"{bench.suffix}-meta"})
    try:
        while time.monotonic() < deadline:
            meta = c.list_topics(timeout=5).topics
            if all(t in meta and meta[t].error is None and len(meta[t].partitions) == TOPICS[k][1]
                   for k, t in bench.topics.items()):
                break
            time.sleep(0.3)
    finally:
        c.close()
    time.sleep(1)


def _delete_groups(brokers: str, groups: list[str], problems: list[str]) -> None:
    """Deletes the consumer groups (a group that never committed does not exist: no problem)."""
    if not groups:
        return
    admin = AdminClient({"bootstrap.servers": brokers})  # kept until the futures are done
    try:
        futures = admin.delete_consumer_groups(groups, request_timeout=30)
        for f in futures.values():
            with contextlib.suppress(Exception):
                f.result(30)
    except Exception as e:
        problems.append(f"delete consumer groups: {e}")


@contextlib.contextmanager
def isolated(brokers: str, suffix: str, redis_db: int, extra_job_args: tuple[str, ...],
             problems: list[str]) -> Iterator[Bench]:
    """In: brokers, the suffix of ``new_suffix()``, the Redis DB, --pipeline-arg values,
    a list for cleanup problems. Yields a ``Bench``; removes its topics, schema,
    consumer groups and Redis data afterwards, appending failures to ``problems``."""
    with isolated_stack(brokers=brokers, suffix=suffix, schema=planned(suffix, redis_db)["schema"],
                        redis_db=redis_db, problems=problems) as stack:
        bench = Bench(stack, brokers, tuple(extra_job_args))
        try:
            _await_metadata(bench)
            yield bench
        finally:
            _delete_groups(brokers, bench.groups, problems)
