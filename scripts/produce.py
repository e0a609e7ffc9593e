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

Anomalies can be injected at a chosen event time and entity, for the alert
rules (transforms/alerts) and their tests; each ``--inject`` is
``KIND:ENTITY@START_S[+DURATION_S]``, START_S counted from the stream's first
event time:

    python -m scripts.produce --events 24000 --span_seconds 7200 \
        --inject accuracy_drop:concept-003@1800 --inject rate_spike:question_answered@3000+120 \
        --inject dead_letters:learning.events.v1@4200 --inject fast_answers:user-00042@5400

The injected records are drawn from a random generator of their own, so the
rest of the stream is the same as without them (and the same for a seed).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional

from schemas import default_registry
from schemas.settings import setting
from schemas.wire import encode_avro, encode_json, frame, plain_parsed, produce_waiting

# Injectable anomalies: kind -> (what ENTITY names, default duration in seconds, what happens).
INJECTIONS: dict[str, tuple[str, float, str]] = {
    "accuracy_drop": ("a concept id", 300.0, "every answer on the concept is wrong"),
    "rate_drop": ("an event type", 120.0, "the event type sends nothing"),
    "rate_spike": ("an event type", 120.0, "the event type sends 5 times as many events"),
    "dead_letters": ("a topic (its registry name)", 120.0, "half the topic's records are malformed"),
    "fast_answers": ("a user id", 0.0, "10 answers in a row, each under 1 s, from START_S on"),
}
SPIKE_FACTOR = 5
INJECTED_DEAD_LETTER_SHARE = 0.5
FAST_ANSWERS_IN_A_ROW = 10
FAST_ANSWER_SPACING_MS = 300      # between two injected fast answers (event time)
FAST_ANSWER_MAX_MS = 900          # response times drawn from [200, this)


class Injection(NamedTuple):
    """One injected anomaly: ``kind`` (a key of INJECTIONS) on ``entity`` from ``start_s`` seconds
    after the stream's first event time, for ``duration_s`` seconds."""
    kind: str
    entity: str
    start_s: float
    duration_s: float

    def active(self, kind: str, entity: str, ts: int, stream_start_ms: int) -> bool:
        begin = stream_start_ms + self.start_s * 1000
        return self.kind == kind and self.entity == entity and begin <= ts < begin + self.duration_s * 1000


def parse_injection(text: str) -> Injection:
    """``KIND:ENTITY@START_S[+DURATION_S]`` -> Injection; ValueError naming what is wrong."""
    try:
        kind, rest = text.split(":", 1)
        entity, when = rest.rsplit("@", 1)
        start, _, duration = when.partition("+")
        inj = Injection(kind, entity, float(start),
                        float(duration) if duration else INJECTIONS[kind][1] if kind in INJECTIONS else 0.0)
    except ValueError:
        raise ValueError(f"--inject {text!r}: expected KIND:ENTITY@START_S[+DURATION_S]") from None
    if inj.kind not in INJECTIONS:
        raise ValueError(f"--inject {text!r}: unknown kind {inj.kind!r} (one of {', '.join(INJECTIONS)})")
    if not inj.entity or inj.start_s < 0 or inj.duration_s < 0:
        raise ValueError(f"--inject {text!r}: needs an entity, START_S >= 0 and DURATION_S >= 0")
    return inj


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
    injections: tuple = field(default_factory=tuple)   # of Injection (parse_injection)


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
    injected = _Injector(cfg, traffic, entries, parsed)
    end = cfg.end_time_ms if cfg.end_time_ms is not None else int(time.time() * 1000)
    start = end - int(cfg.span_seconds * 1000)
    injected.stream_start_ms = start
    step = (end - start) / max(1, cfg.events)
    for i in range(cfg.events):
        ts = int(start + i * step) - rng.randrange(0, cfg.max_disorder_ms + 1)
        yield from injected.fast_answers(ts)
        event_type, fields = traffic.event(ts)
        fields = injected.accuracy(event_type, fields, ts)
        entry = entries[event_type]
        avro = encode_avro(entry, fields, parsed[event_type])
        headers = [("correlation_id", fields["correlation_id"].encode())] if fields["correlation_id"] else []
        key = fields["user_id"].encode()
        if rng.random() < cfg.malformed_fraction:
            value, code = _corrupt(rng, event_type, fields, avro, ts)
            record = Produced(entry.topic, key, value, ts, headers, event_type, None, code)
        elif rng.random() < cfg.json_fraction:
            record = Produced(entry.topic, key, encode_json(event_type, fields), ts, headers, event_type, fields, None)
        else:
            record = Produced(entry.topic, key, avro, ts, headers, event_type, fields, None)
        yield from injected.apply(record, avro)


class _Injector:
    """Applies TrafficConfig.injections to the stream, drawing from a generator of its own."""

    def __init__(self, cfg: TrafficConfig, traffic: _Traffic, entries: dict, parsed: dict):
        self.injections = [i if isinstance(i, Injection) else parse_injection(i) for i in cfg.injections]
        self.traffic, self.entries, self.parsed = traffic, entries, parsed
        self.rng = random.Random(f"inject-{cfg.seed}")
        self.stream_start_ms = 0
        self.fast_done: set = set()

    def _active(self, kind: str, entity: str, ts: int) -> bool:
        return any(i.active(kind, entity, ts, self.stream_start_ms) for i in self.injections)

    def accuracy(self, event_type: str, fields: dict, ts: int) -> dict:
        if event_type == "question_answered" and self._active("accuracy_drop", fields["concept_id"], ts):
            return dict(fields, correct=False)
        return fields

    def apply(self, r: Produced, avro: bytes) -> Iterator[Produced]:
        if self._active("rate_drop", r.event_type, r.timestamp_ms):
            return
        if (r.error_code is None and self._active("dead_letters", r.topic, r.timestamp_ms)
                and self.rng.random() < INJECTED_DEAD_LETTER_SHARE):
            value, code = _corrupt(self.rng, r.event_type, r.fields, avro, r.timestamp_ms)
            yield r._replace(value=value, fields=None, error_code=code)
            return
        yield r
        if r.error_code is None and self._active("rate_spike", r.event_type, r.timestamp_ms):
            for k in range(1, SPIKE_FACTOR):
                fields = dict(r.fields, event_id=str(uuid.UUID(int=self.rng.getrandbits(128))))
                yield self._record(r.event_type, fields, r.timestamp_ms)

    def fast_answers(self, ts: int) -> Iterator[Produced]:
        """At the first event time past a fast_answers injection's start: its answers, in a row."""
        for inj in self.injections:
            begin = self.stream_start_ms + int(inj.start_s * 1000)
            if inj.kind != "fast_answers" or inj in self.fast_done or ts < begin:
                continue
            self.fast_done.add(inj)
            session = f"sess-injected-{inj.entity}"
            for k in range(FAST_ANSWERS_IN_A_ROW):
                at = begin + k * FAST_ANSWER_SPACING_MS
                fields = {"event_id": str(uuid.UUID(int=self.rng.getrandbits(128))), "occurred_at": at,
                          "user_id": inj.entity, "correlation_id": None, "session_id": session,
                          "question_id": f"q-{self.rng.randrange(2000)}",
                          "concept_id": self.rng.choice(self.traffic.concepts), "correct": self.rng.random() < 0.5,
                          "response_time_ms": self.rng.randrange(200, FAST_ANSWER_MAX_MS),
                          "attempt": 1, "difficulty": "EASY"}
                yield self._record("question_answered", fields, at)

    def _record(self, event_type: str, fields: dict, ts: int) -> Produced:
        entry = self.entries[event_type]
        headers = [("correlation_id", fields["correlation_id"].encode())] if fields["correlation_id"] else []
        return Produced(entry.topic, fields["user_id"].encode(), encode_avro(entry, fields, self.parsed[event_type]),
                        ts, headers, event_type, fields, None)


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
    ap.add_argument("--align_end", type=int, default=0, metavar="SECONDS",
                    help="end the span at the last multiple of SECONDS before now (e.g. 300: whole "
                         "1- and 5-minute windows, so that a drained job's last window is not partial, "
                         "which the rate rules would call a drop); 0 = end now")
    ap.add_argument("--users", type=int, default=200, help="distinct students")
    ap.add_argument("--concepts", type=int, default=40, help="distinct concepts questions are about")
    ap.add_argument("--content_items", "--content-items", type=int, default=150, help="distinct content items")
    ap.add_argument("--malformed_fraction", "--malformed-fraction", type=float, default=0.02,
                    help="share of records that are bad in one of a dozen ways")
    ap.add_argument("--json_fraction", "--json-fraction", type=float, default=0.1,
                    help="share of valid events sent as JSON rather than Avro")
    ap.add_argument("--seed", type=int, default=7, help="random seed: the same seed sends the same stream")
    kinds = "; ".join(f"{k}:<{what}> ({effect}; default duration {int(d)} s)"
                      for k, (what, d, effect) in INJECTIONS.items())
    ap.add_argument("--inject", action="append", default=[], metavar="KIND:ENTITY@START_S[+DURATION_S]",
                    help=f"inject an anomaly START_S seconds after the stream's first event time; repeatable. "
                         f"Kinds: {kinds}")
    a = ap.parse_args(argv)
    try:
        injections = tuple(parse_injection(text) for text in a.inject)
    except ValueError as e:
        ap.error(str(e))
    if a.align_end < 0:
        ap.error("--align_end must be 0 or a number of seconds")
    now_ms = int(time.time() * 1000)
    end_ms = now_ms - now_ms % (a.align_end * 1000) if a.align_end else None
    cfg = TrafficConfig(events=a.events, users=a.users, concepts=a.concepts, content_items=a.content_items,
                        span_seconds=a.span_seconds, end_time_ms=end_ms, malformed_fraction=a.malformed_fraction,
                        json_fraction=a.json_fraction, seed=a.seed, injections=injections)
    try:
        counts = produce(generate(cfg), a.brokers, a.rate, progress_every=max(10000, a.events // 10))
    except Exception as e:  # one line for a person, not a trace
        print(f"produce: failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
