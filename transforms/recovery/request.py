"""What a recovery is asked for, what it finds, and what it counts."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from schemas.error_codes import ErrorCode
from schemas.settings import setting
from schemas.topics import DLQ_TOPIC
from transforms.records import DeadLetter

KNOWN_CODES = sorted(v for k, v in vars(ErrorCode).items() if k.isupper())


class BadRequest(Exception):
    """The request cannot be served as asked: exit 2 with one line."""


class RecoveryFailed(Exception):
    """Something broke while serving a valid request: exit 1."""


@dataclass(frozen=True)
class RecoveryRequest:
    """Which dead letters to re-publish: failed_at in [since_ms, until_ms), one of
    ``codes`` (all codes when empty), read from ``dlq_topic``."""
    since_ms: int
    until_ms: int
    codes: tuple[str, ...] = ()
    dlq_topic: str = DLQ_TOPIC
    brokers: str = field(default_factory=lambda: setting("KAFKA_BROKERS"))
    postgres_dsn: str = field(default_factory=lambda: setting("POSTGRES_DSN"))
    dry_run: bool = False              # read and report; write nothing, not even the ledger table
    retry_unconfirmed: bool = False    # send again rows an earlier run left 'claimed'
    timeout_s: float = 120.0           # to read the dead-letter topic to its end
    progress_every: int = 10000        # a progress line every this many records


class Stored(NamedTuple):
    """A dead letter and where it sits on the dead-letter topic."""
    partition: int
    offset: int
    letter: DeadLetter

    @property
    def origin(self) -> tuple[int, int]:
        return self.partition, self.offset

    @property
    def source_key(self) -> tuple[str, int, int, int]:
        # Two dead letters with the same source record and attempt are one failure
        # written twice (a retried bundle of the streaming job): publish it once.
        dl = self.letter
        return dl.source_topic, dl.source_partition, dl.source_offset, dl.attempt


@dataclass
class Tally:
    """Counts for the summary, per error code."""
    scanned: int = 0
    unreadable: int = 0
    selected: Counter = field(default_factory=Counter)
    republished: Counter = field(default_factory=Counter)
    done: Counter = field(default_factory=Counter)
    look: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)  # (Stored, reason) of those that need a look

    def needs_look(self, s: Stored, reason: str) -> None:
        self.look[s.letter.error_code] += 1
        self.notes.append((s, reason))
