"""The replay's ``_manifest.json``: what a dataset holds, from the job's own counters.

    summary = replay_manifest(result, offsets, requested={"start": ..., "end": ..., "offsets": ...},
                              seconds=9.6)

Counts come from the Beam metrics the transforms keep (``ReadEvents``,
``DecodeAndValidate``, ``ReadArchivedEvents``, ``WriteTrainingDataset``
namespaces), so the manifest says what the job did, not what was asked.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from apache_beam.runners.runner import PipelineResult

from transforms.kafka_range import ResolvedRange


def replay_manifest(result: PipelineResult, offsets: ResolvedRange, requested: dict,
                    seconds: float) -> dict[str, Any]:
    """In: a finished job, the offsets it was to read, the request as given
    (start, end, offsets) and its duration. Out: the manifest as a dict."""
    counters, read = _counters_and_offsets(result)
    per_type = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("WriteTrainingDataset.")}
    return {
        "requested": requested,
        "partitions": [{"topic": s.topic, "partition": s.partition, "start": s.start, "stop": s.stop,
                        "read": read.get(f"{s.topic}:{s.partition}")} for s in offsets.partitions],
        "records_in_range": offsets.total_records,
        "records_read": counters.get("ReadEvents.records_read", 0),
        "archive": {"used": bool(offsets.archive_gaps),
                    "gaps": [g._asdict() for g in offsets.archive_gaps],
                    "events_read": counters.get("ReadArchivedEvents.events_read", 0)},
        "events_by_type_and_schema_version": dict(sorted(per_type.items())),
        "valid_events": counters.get("DecodeAndValidate.valid_events", 0)
        + counters.get("ReadArchivedEvents.events_read", 0),
        "dead_letters_by_code": {k.split("dead_letters_", 1)[1]: v for k, v in sorted(counters.items())
                                 if k.startswith("DecodeAndValidate.dead_letters_")},
        "seconds": round(seconds, 1),
        "written_at": datetime.now(timezone.utc).isoformat(),
    }


def _counters_and_offsets(result: PipelineResult) -> tuple[dict[str, int], dict[str, dict]]:
    """({"namespace.name": total}, {"topic:partition": {"first", "last"} offset read})."""
    counters: dict[str, int] = {}
    offsets: dict[str, dict] = {}
    metrics = result.metrics().query()
    for c in metrics["counters"]:
        key = f"{c.key.metric.namespace}.{c.key.metric.name}"
        counters[key] = counters.get(key, 0) + (c.committed or 0)
    for d in metrics["distributions"]:
        if d.key.metric.name.startswith("offsets:"):  # ReadEvents: one per partition read
            _, topic, partition = d.key.metric.name.rsplit(":", 2)
            offsets[f"{topic}:{partition}"] = {"first": d.committed.min, "last": d.committed.max}
    return counters, offsets
