"""A replay request, checked and resolved before anything runs: one source of the
messages for the command line (pipelines.replay) and the HTTP API (service.replay_api).

    output = check_outputs(output, aggregates, dead_letters, overwrite)   # BadRangeRequest / OutputExists
    offsets, span = resolve_request(config, topics, start, end, offsets_text)

Both raise :class:`~transforms.kafka_range.BadRangeRequest` with a sentence a
person can act on; the command line prints it as its ``error:`` line and exits
2, the API answers 400 (409 for :class:`OutputExists`).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from schemas.settings import parse_instant
from transforms.kafka_range import (BadRangeRequest, ResolvedRange, parse_offsets, resolve_offsets,
                                    resolve_time_range)
from transforms.kafka_read import KafkaReadConfig


class OutputExists(BadRangeRequest):
    """The output folder exists and replacing it was not asked for."""


def check_outputs(output: Optional[str], aggregates: bool, dead_letters: bool,
                  overwrite: bool) -> Optional[str]:
    """In: the outputs asked for. Out: ``output`` as an absolute path (None when
    not asked). Raises when nothing is to be written, or ``output`` exists
    without ``overwrite``; touches nothing."""
    if not (output or aggregates or dead_letters):
        raise BadRangeRequest("choose an output: --output DIR, --aggregates and/or --dead_letters")
    path = os.path.abspath(output) if output else None
    if path and os.path.exists(path) and not overwrite:
        raise OutputExists(f"{path} exists; pass --overwrite to replace it")
    return path


def millis(text: str, name: str) -> int:
    """An ISO-8601 time with a zone as epoch milliseconds; ``name`` is the option, for the message."""
    try:
        return int(parse_instant(text).timestamp() * 1000)
    except ValueError as e:
        raise BadRangeRequest(f"--{name} {e}") from None


def resolve_request(config: KafkaReadConfig, topics: Iterable[str], start: Optional[str], end: Optional[str],
                    offsets: Optional[str]) -> tuple[ResolvedRange, Optional[tuple[int, int]]]:
    """In: a time range (``start``, ``end``, ISO-8601) over ``topics``, or
    ``offsets`` ('topic:partition:start-end,...'). Out: the offsets to read, and
    the time range in ms when one was asked for. Asks Kafka (offsets-for-times,
    watermarks); raises BadRangeRequest for a request that cannot be served."""
    if offsets:
        if start or end:
            raise BadRangeRequest("give either --offsets or --start/--end, not both")
        return resolve_offsets(config, parse_offsets(offsets)), None
    if not (start and end):
        raise BadRangeRequest("give --start and --end, or --offsets")
    span = (millis(start, "start"), millis(end, "end"))
    return resolve_time_range(config, topics, *span), span
