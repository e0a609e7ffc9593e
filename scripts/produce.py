"""Realistic learning-platform traffic into Kafka, with a chosen share of bad records.

    python -m scripts.produce --events 50000 --span-seconds 3600 --malformed-fraction 0.02

Students open sessions, answer questions on concepts, gain or lose mastery,
view and rate content; the platform sends notifications that some open,
achievements unlock and challenges complete. Events are spread over an
event-time span ending now (slightly out of order, as clients are), encoded as
Confluent-framed Avro or, for a share, as JSON like a web client sends. The
Kafka record timestamp is the event's own time, and the key is the user id.

A malformed record is one of a dozen realistic faults (bad framing, unknown
schema id, truncated Avro, broken JSON, missing field, bad enum, ratings off
the scale, negative durations, timestamps missing or far in the future...);
each carries the error code the pipeline must give it, so tests can count
dead letters by code. Import :func:`generate` to get the same stream in memory.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

from schemas import default_registry
from schemas.settings import setting
from schemas.wire import encode_avro, encode_json, frame, plain_parsed, produce_waiting

@dataclass
class TrafficConfig:
    events: int = 10000
    users: int = 200
    concepts: int = 40
    content_items: int = 150
    span_seconds: float = 600.0
    end_time_ms: Optional[int] = None   # default: now
    malformed_fraction: float = 0.0
    json_fraction: float = 0.1
    max_disorder_ms: int = 2000
    seed: int = 7


class Produced(NamedTuple):
    """One record to send; ``fields`` is the valid event, ``error_code`` a bad record's code."""
    topic: str
    key: bytes
    value: bytes
    timestamp_ms: int
    headers: list
    event_type: str
    fields: Optional[dict]
    error_code: Optional[str]


_WEIGHTS = [("question_answered", 48), ("content_viewed", 14), ("mastery_updated", 9),
            ("content_rated", 5), ("session_ended", 6), ("notification_sent", 6),
            ("notification_opened", 4), ("achievement_unlocked", 2), ("challenge_completed", 2),
            ("content_updated", 1)]


class _Student:
    def __init__(self, user_id: str):
        self.user_id, self.session, self.course = user_id, None, None
        self.mastery: dict[str, float] = {}
        self.notifications: list[tuple[str, str]] = []


class _Traffic:
    def __init__(self, cfg: TrafficConfig):
        self.cfg, self.rng = cfg, random.Random(cfg.seed)
        self.students = [_Student(f"user-{i:05d}") for i in range(cfg.users)]
        self.concepts = [f"concept-{i:03d}" for i in range(cfg.concepts)]
        self.content = [f"content-{i:04d}" for i in range(cfg.content_items)]
        self.versions: dict[str, int] = {}
        self.seq = 0

    def _base(self, s: _Student, ts: int) -> dict:
        self.seq += 1
        corr = f"req-{self.cfg.seed}-{self.seq}" if self.rng.random() < 0.5 else None
        return {"event_id": str(uuid.UUID(int=self.rng.getrandbits(128))), "occurred_at": ts,
                "user_id": s.user_id, "correlation_id": corr}

    def event(self, ts: int) -> tuple[str, dict]:
        rng, s = self.rng, self.rng.choice(self.students)
        if s.session is None:
            s.session, s.course = f"sess-{self.seq}-{rng.randrange(10**6)}", f"course-{rng.randrange(8)}"
            return "session_started", dict(self._base(s, ts), session_id=s.session, course_id=s.course,
                                           platform=rng.choice(["WEB", "IOS", "ANDROID"]))
        kind = rng.choices([k for k, _ in _WEIGHTS], [w for _, w in _WEIGHTS])[0]
        e = self._base(s, ts)
        if kind == "question_answered":
            concept = rng.choice(self.concepts)
            p = 0.35 + 0.6 * s.mastery.get(concept, 0.3)
            return kind, dict(e, session_id=s.session, question_id=f"q-{rng.randrange(2000)}",
                              concept_id=concept, correct=rng.random() < p,
                              response_time_ms=int(rng.lognormvariate(9, 0.5)),
                              attempt=rng.choice([1, 1, 1, 2, 3]),
                              difficulty=rng.choice(["EASY", "MEDIUM", "HARD"]))
        if kind == "session_ended":
            sid, s.session = s.session, None
            return kind, dict(e, session_id=sid, course_id=s.course,
                              duration_ms=rng.randrange(60_000, 3_600_000))
        if kind == "mastery_updated":
            concept = rng.choice(self.concepts)
            before = s.mastery.get(concept, 0.3)
            after = min(1.0, max(0.0, before + rng.uniform(-0.05, 0.15)))
            s.mastery[concept] = after
            return kind, dict(e, concept_id=concept, mastery_before=before, mastery_after=after)
        if kind == "content_viewed":
            return kind, dict(e, content_id=rng.choice(self.content),
                              content_type=rng.choice(["VIDEO", "ARTICLE", "EXERCISE", "QUIZ"]),
                              view_duration_ms=rng.randrange(1000, 900_000))
        if kind == "content_rated":
            return kind, dict(e, content_id=rng.choice(self.content), rating=rng.randint(1, 5))
        if kind == "content_updated":
            c = rng.choice(self.content)
            self.versions[c] = self.versions.get(c, 1) + 1
            return kind, dict(e, content_id=c, version=self.versions[c])
        if kind == "notification_sent":
            n = (f"notif-{self.seq}", rng.choice(["EMAIL", "PUSH", "IN_APP", "SMS"]))
            s.notifications.append(n)
            return kind, dict(e, notification_id=n[0], channel=n[1])
        if kind == "notification_opened" and s.notifications:
            n = s.notifications.pop(0)
            return kind, dict(e, notification_id=n[0], channel=n[1])
        if kind == "achievement_unlocked":
            return kind, dict(e, achievement_id=f"ach-{rng.randrange(50)}", points=rng.choice([10, 25, 50]))
        if kind == "challenge_completed":
            return kind, dict(e, challenge_id=f"ch-{rng.randrange(30)}", score=round(rng.uniform(0, 100), 1),
                              duration_ms=rng.randrange(30_000, 1_800_000))
        return self.event(ts)  # e.g. an open with nothing sent: draw again


def _corrupt(rng: random.Random, event_type: str, fields: dict, avro: bytes, ts: int) -> tuple[bytes, str]:
    """A realistic fault of one record, and the dead-letter code it must get."""
    kind = rng.randrange(11)
    if kind == 0:
        return b"\x07garbage-from-a-misconfigured-serializer", "BAD_FRAMING"
    if kind == 1:
        return frame(9999, avro[5:]), "UNKNOWN_SCHEMA_ID"
    if kind == 2:
        return avro[: max(6, len(avro) // 3)], "AVRO_DECODE_ERROR"
    if kind == 3:
        return encode_json(event_type, fields)[:-7], "JSON_DECODE_ERROR"
    bad = dict(fields)
    if kind == 4:
        bad.pop("user_id")
        return encode_json(event_type, bad), "MISSING_FIELD"
    if kind == 5:
        return encode_json("question_answered", dict(bad, difficulty="IMPOSSIBLE", concept_id="c",
                                                     session_id="s", question_id="q", correct=True,
                                                     response_time_ms=10)), "BAD_ENUM"
    if kind == 6:
        return encode_json("content_rated", dict(bad, content_id="content-0000", rating=9)), "OUT_OF_RANGE"
    if kind == 7:
        return encode_json("session_ended", dict(bad, session_id="s", course_id="c",
                                                 duration_ms=-5000)), "OUT_OF_RANGE"
    if kind == 8:
        return encode_json(event_type, dict(bad, occurred_at=ts + 7 * 86_400_000)), "FUTURE_TIMESTAMP"
    if kind == 9:
        bad.pop("occurred_at")
        return encode_json(event_type, bad), "MISSING_TIMESTAMP"
    return encode_json(event_type, dict(bad, user_id=12345)), "WRONG_TYPE"


def generate(cfg: TrafficConfig) -> Iterator[Produced]:
    """The stream as records to send; deterministic for a given config."""
    reg = default_registry()
    entries = {s: reg.latest(s) for s in reg.subjects("event")}
    parsed = {s: plain_parsed(e) for s, e in entries.items()}
    traffic = _Traffic(cfg)
    rng = traffic.rng
    end = cfg.end_time_ms if cfg.end_time_ms is not None else int(time.time() * 1000)
    start = end - int(cfg.span_seconds * 1000)
    step = (end - start) / max(1, cfg.events)
    for i in range(cfg.events):
        ts = int(start + i * step) - rng.randrange(0, cfg.max_disorder_ms + 1)
        event_type, fields = traffic.event(ts)
        entry = entries[event_type]
        avro = encode_avro(entry, fields, parsed[event_type])
        headers = [("correlation_id", fields["correlation_id"].encode())] if fields["correlation_id"] else []
        key = fields["user_id"].encode()
        if rng.random() < cfg.malformed_fraction:
            value, code = _corrupt(rng, event_type, fields, avro, ts)
            yield Produced(entry.topic, key, value, ts, headers, event_type, None, code)
        elif rng.random() < cfg.json_fraction:
            yield Produced(entry.topic, key, encode_json(event_type, fields), ts, headers, event_type, fields, None)
        else:
            yield Produced(entry.topic, key, avro, ts, headers, event_type, fields, None)


def produce(records: Iterator[Produced], brokers: str, rate: float = 0.0,
            progress_every: int = 0, deliver_within_s: float = 60.0) -> dict:
    """Sends ``records`` (paced to ``rate`` per second when > 0); returns counts.
    Raises if a record is not delivered within ``deliver_within_s`` (a broker
    outage drill wants more than the default)."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 20, "batch.num.messages": 10000,
                         "queue.buffering.max.messages": 500000, "enable.idempotence": True,
                         "message.timeout.ms": int(deliver_within_s * 1000)})
    failures: list[str] = []

    def on_delivery(err, _msg):
        if err is not None:
            failures.append(str(err))

    counts = {"sent": 0, "valid": 0, "malformed": 0}
    began = time.monotonic()
    for r in records:
        produce_waiting(producer, r.topic, r.value, r.key, timestamp=r.timestamp_ms, headers=r.headers,
                        on_delivery=on_delivery)
        producer.poll(0)
        counts["sent"] += 1
        counts["malformed" if r.error_code else "valid"] += 1
        if rate > 0:
            ahead = counts["sent"] / rate - (time.monotonic() - began)
            if ahead > 0:
                time.sleep(ahead)
        if progress_every and counts["sent"] % progress_every == 0:
            print(f"  produced {counts['sent']:,} records", file=sys.stderr)
    remaining = producer.flush(deliver_within_s)
    if remaining or failures:
        raise RuntimeError(f"{remaining} records undelivered, {len(failures)} failed: {failures[:3]}")
    counts["seconds"] = round(time.monotonic() - began, 2)
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.produce", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Beam's spelling (underscores), as every command; the hyphenated forms of
    # earlier releases are still accepted.
    ap.add_argument("--brokers", default=setting("KAFKA_BROKERS"), help="Kafka bootstrap servers [KAFKA_BROKERS]")
    ap.add_argument("--events", type=int, default=10000, help="how many records to send")
    ap.add_argument("--rate", type=float, default=0.0, help="events per second; 0 = as fast as possible")
    ap.add_argument("--span_seconds", "--span-seconds", type=float, default=600.0,
                    help="event-time span, ending now")
    ap.add_argument("--users", type=int, default=200, help="distinct students")
    ap.add_argument("--concepts", type=int, default=40, help="distinct concepts questions are about")
    ap.add_argument("--content_items", "--content-items", type=int, default=150, help="distinct content items")
    ap.add_argument("--malformed_fraction", "--malformed-fraction", type=float, default=0.02,
                    help="share of records that are bad in one of a dozen ways")
    ap.add_argument("--json_fraction", "--json-fraction", type=float, default=0.1,
                    help="share of valid events sent as JSON rather than Avro")
    ap.add_argument("--seed", type=int, default=7, help="random seed: the same seed sends the same stream")
    a = ap.parse_args(argv)
    cfg = TrafficConfig(events=a.events, users=a.users, concepts=a.concepts, content_items=a.content_items,
                        span_seconds=a.span_seconds, malformed_fraction=a.malformed_fraction,
                        json_fraction=a.json_fraction, seed=a.seed)
    try:
        counts = produce(generate(cfg), a.brokers, a.rate, progress_every=max(10000, a.events // 10))
    except Exception as e:  # one line for a person, not a trace
        print(f"produce: failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
