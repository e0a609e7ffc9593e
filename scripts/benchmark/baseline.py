"""The baseline: a plain consumer loop (confluent_kafka + fastavro + dicts, no Beam,
nothing from transforms/) that decodes every record and folds it into the four
window sizes. Its per-record path is kept flat: it is what the job is measured against."""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import fastavro
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from schemas import default_registry
from schemas.wire import plain_parsed
from scripts.benchmark.common import WINDOW_SIZES_S


def _fold_answer(wins: list[tuple], f: dict) -> None:
    correct = 1 if f["correct"] else 0
    rt = f["response_time_ms"]
    for win in wins:
        for table, ent in ((win[1], f["user_id"]), (win[2], f["concept_id"])):
            acc = table.get(ent)
            if acc is None:
                table[ent] = [1, correct, rt]
            else:
                acc[0] += 1
                acc[1] += correct
                acc[2] += rt


def _fold_view(wins: list[tuple], f: dict) -> None:
    for win in wins:
        acc = win[3].get(f["content_id"])
        if acc is None:
            win[3][f["content_id"]] = [1, 0, 0]
        else:
            acc[0] += 1


def _fold_rating(wins: list[tuple], f: dict) -> None:
    for win in wins:
        acc = win[3].get(f["content_id"])
        if acc is None:
            win[3][f["content_id"]] = [0, 1, f["rating"]]
        else:
            acc[1] += 1
            acc[2] += f["rating"]


_FOLDS: dict[str, Callable[[list[tuple], dict], None]] = {
    "question_answered": _fold_answer, "content_viewed": _fold_view, "content_rated": _fold_rating}


@dataclass
class Fold:
    """The windows folded so far: {(size_ms, start_ms): (counts per event type,
    per user [answers, correct, rt sum], per concept the same, per content
    [views, ratings, rating sum])}."""
    windows: dict = field(default_factory=dict)
    writers: dict = field(default_factory=dict)  # schema id -> (parsed schema, subject)
    folded: int = 0
    json_records: int = 0

    def __post_init__(self) -> None:
        self.registry = default_registry()
        self.sizes_ms = tuple(s * 1000 for s in WINDOW_SIZES_S)

    def _writer(self, sid: int) -> tuple:
        entry = self.registry.by_id(sid)
        w = self.writers[sid] = (plain_parsed(entry), entry.subject)
        return w

    def add(self, v: bytes) -> None:
        """Decodes a record value (Confluent-framed Avro or JSON) and folds the event
        into its window of every size."""
        if v[0] == 0:
            sid = int.from_bytes(v[1:5], "big")
            w = self.writers.get(sid) or self._writer(sid)
            etype, f = w[1], fastavro.schemaless_reader(io.BytesIO(v[5:]), w[0])
        else:
            f = json.loads(v)
            etype = f["event_type"]
            self.json_records += 1
        ts, windows, wins = f["occurred_at"], self.windows, []
        for size in self.sizes_ms:
            key = (size, ts - ts % size)
            win = windows.get(key)
            if win is None:
                win = windows[key] = ({}, {}, {}, {})
            win[0][etype] = win[0].get(etype, 0) + 1
            wins.append(win)
        fold = _FOLDS.get(etype)
        if fold is not None:
            fold(wins, f)
        self.folded += 1


def _open(brokers: str, topics: list[str], group_id: str) -> tuple[Consumer, dict]:
    """A consumer assigned to every partition of ``topics`` from offset 0, and their end offsets."""
    c = Consumer({"bootstrap.servers": brokers, "group.id": group_id, "enable.auto.commit": False,
                  "enable.partition.eof": False, "fetch.wait.max.ms": 100,
                  "queued.min.messages": 100000, "auto.offset.reset": "earliest"})
    meta = c.list_topics(timeout=10).topics
    tps = [TopicPartition(t, p, 0) for t in topics for p in sorted(meta[t].partitions)]
    ends = {(tp.topic, tp.partition): c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
    c.assign(tps)
    return c, ends


def _fold_batch(msgs: list, fold: Fold, ends: dict, pending: set) -> None:
    add = fold.add
    for m in msgs:
        err = m.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                continue
            raise KafkaException(err)
        add(m.value())
        if m.offset() + 1 >= ends[(m.topic(), m.partition())]:
            pending.discard((m.topic(), m.partition()))


def _consume_all(c: Consumer, ends: dict, fold: Fold, stall_s: float) -> float:
    """Folds every record up to ``ends``; returns the seconds from the first batch to the last."""
    pending = {k for k, end in ends.items() if end > 0}
    first: Optional[float] = None
    last_data = time.monotonic()
    while pending:
        msgs = c.consume(10000, timeout=1.0)
        if not msgs:
            if time.monotonic() - last_data > stall_s:
                raise RuntimeError(f"baseline: no records for {stall_s:.0f}s with {len(pending)} "
                                   f"partitions unfinished ({fold.folded} folded)")
            continue
        if first is None:
            first = time.perf_counter()
        last_data = time.monotonic()
        _fold_batch(msgs, fold, ends, pending)
    return time.perf_counter() - first if first is not None else 0.0


def run_baseline(brokers: str, topics: list[str], group_id: str, expected: int,
                 stall_s: float = 30.0) -> tuple[dict, dict]:
    """Decodes every record of ``topics`` and folds it into the four window sizes, in plain Python.
    Returns (figures: events, expected, json_records, windows, seconds, events_per_s;
    the folded windows, see ``Fold``)."""
    fold = Fold()
    c, ends = _open(brokers, topics, group_id)
    try:
        seconds = _consume_all(c, ends, fold, stall_s)
    finally:
        c.close()
    return ({"events": fold.folded, "expected": expected, "json_records": fold.json_records,
             "windows": len(fold.windows), "seconds": round(seconds, 3),
             "events_per_s": round(fold.folded / seconds, 1) if seconds > 0 else None},
            fold.windows)


def baseline_overall(windows: dict) -> dict:
    """{(size_s, start_ms): (events, answers, correct, views, ratings, rating_sum)} of the baseline."""
    out = {}
    for (size, start), (counts, users, _concepts, content) in windows.items():
        answers = sum(a[0] for a in users.values())
        correct = sum(a[1] for a in users.values())
        out[(size // 1000, start)] = (sum(counts.values()), answers, correct,
                                      counts.get("content_viewed", 0), counts.get("content_rated", 0),
                                      sum(c[2] for c in content.values()))
    return out
