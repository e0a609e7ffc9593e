"""Re-publish chosen dead letters to their source topics, once each, after their cause is fixed.

    python -m pipelines.recover_dead_letters --since 2026-05-04T08:00Z --until 2026-05-04T09:30Z \\
        --error_code UNKNOWN_SCHEMA_ID [--error_code ...] [--dry_run]

(also installed as ``learning-analytics-recover-dead-letters``; the options are
accepted with hyphens too, ``--error-code``, ``--dry-run``.)

Typical use: records failed with UNKNOWN_SCHEMA_ID because a producer shipped
before its schema was registered; once the schema is registered (and the
streaming job runs with it), this sends those records through the job again.

What it does (transforms/recovery/):

1. reads the dead-letter topic (``--dlq_topic``, default analytics.dlq.v1) from
   its beginning up to the end offsets it had at start, with a throwaway
   consumer group that commits nothing (bounded by ``--timeout``);
2. selects the dead letters whose ``failed_at`` lies in [since, until) and
   whose error code is one of ``--error_code`` (all codes when none is given);
3. for each, claims a row in the Postgres ledger ``dead_letter_recoveries``
   (schemas/postgres.sql), keyed by the dead letter's own DLQ coordinates;
4. produces the original raw bytes to the dead letter's ``source_topic`` (same
   partition when it still exists; key None, as the original key was not
   kept) with headers ``correlation_id`` (when known), ``dlq_attempt`` =
   attempt + 1 and ``dlq_origin`` = ``<dlq topic>:<partition>:<offset>``;
5. once the producer confirmed delivery, marks the ledger row ``published``.

Running it twice never publishes a dead letter twice: published rows are
skipped ("already done"). A row left ``claimed`` (a crash or a failed delivery
between steps 3 and 5) may or may not be on the source topic, so it is
reported as *needs a look* and not re-sent. Look for a record with header
``dlq_origin`` equal to its coordinates on the source topic; if there is none,
run again with ``--retry_unconfirmed`` to send those rows again.

Times are ISO 8601 with a zone (``Z`` for UTC), as for the replay. Brokers and
DSN default to KAFKA_BROKERS and POSTGRES_DSN, like the pipelines.
``--dry_run`` reads and reports, and writes nothing (not even the ledger table).

Progress goes to stderr, the summary to stdout. Exit codes: 0 everything
selected is published (now or before); 1 some dead letters need a look, or
reading/producing failed; 2 a bad request (since >= until, unknown topic or
error code, Kafka or Postgres unreachable) with one ``error:`` line.
"""
from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from typing import NoReturn, Optional

import psycopg2
from confluent_kafka import KafkaException

from pipelines import logs
from pipelines.options import redact
from schemas.settings import parse_instant, setting
from schemas.topics import DLQ_TOPIC
from transforms.recovery import BadRequest, RecoveryFailed, RecoveryRequest, Tally, recover
from transforms.recovery.request import KNOWN_CODES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise BadRequest(message)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option with its default, except the required ones (which have none)."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        return action.help if action.required else super()._get_help_string(action)


def parse_time(text: str) -> int:
    """ISO 8601 with a zone to epoch millis (schemas.settings.parse_instant's rule)."""
    try:
        return int(parse_instant(text).timestamp() * 1000)
    except ValueError as e:
        raise BadRequest(str(e)) from None


def parse_args(argv: Optional[list[str]]) -> RecoveryRequest:
    """The request on the command line; BadRequest for one that cannot be served."""
    ap = _Parser(prog="python -m pipelines.recover_dead_letters", description=__doc__.split("\n\n")[0],
                 formatter_class=_Help, epilog="Details: the module docstring of pipelines/recover_dead_letters.py.")
    ap.add_argument("--since", required=True, help="first failed_at to recover (ISO 8601 with a zone, inclusive)")
    ap.add_argument("--until", required=True, help="failed_at bound (ISO 8601 with a zone, exclusive)")
    ap.add_argument("--error_code", "--error-code", dest="codes", action="extend", nargs="+", default=[],
                    metavar="CODE", help="recover only these codes (repeatable); none: every code")
    ap.add_argument("--dlq_topic", "--dlq-topic", default=DLQ_TOPIC, help="the dead-letter topic to read")
    ap.add_argument("--brokers", default=setting("KAFKA_BROKERS"), help="Kafka bootstrap servers [KAFKA_BROKERS]")
    ap.add_argument("--postgres_dsn", "--postgres-dsn", default=setting("POSTGRES_DSN"),
                    help="holds the ledger table dead_letter_recoveries [POSTGRES_DSN]")
    ap.add_argument("--dry_run", "--dry-run", action="store_true", help="report only, write nothing")
    ap.add_argument("--retry_unconfirmed", "--retry-unconfirmed", action="store_true",
                    help="send again rows left 'claimed' by an earlier run (check first that they are "
                         "not on the source topic: this may duplicate them)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to read the dead-letter topic to its end before giving up")
    ap.add_argument("--progress_every", "--progress-every", type=int, default=10000,
                    help="progress line every N records")
    logs.add_arguments(ap)  # read by main() before this parse; listed in --help
    args = ap.parse_args(argv)
    since_ms, until_ms = parse_time(args.since), parse_time(args.until)
    if since_ms >= until_ms:
        raise BadRequest(f"--since {args.since} is not before --until {args.until}")
    unknown = sorted(set(args.codes) - set(KNOWN_CODES))
    if unknown:
        raise BadRequest(f"unknown error code(s) {', '.join(unknown)}; known: {', '.join(KNOWN_CODES)}")
    if args.progress_every < 1 or args.timeout <= 0:
        raise BadRequest("--progress-every and --timeout must be positive")
    return RecoveryRequest(since_ms=since_ms, until_ms=until_ms, codes=tuple(args.codes),
                           dlq_topic=args.dlq_topic, brokers=args.brokers, postgres_dsn=args.postgres_dsn,
                           dry_run=args.dry_run, retry_unconfirmed=args.retry_unconfirmed,
                           timeout_s=args.timeout, progress_every=args.progress_every)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def print_summary(request: RecoveryRequest, tally: Tally) -> None:
    """The counts, per error code, and the dead letters that need a look; on stdout."""
    n = lambda c: sum(c.values())  # noqa: E731
    verb = "would republish" if request.dry_run else "republished"
    print(f"dead-letter recovery from {request.dlq_topic}"
          f"{' (dry run: nothing written)' if request.dry_run else ''}")
    print(f"  failed_at       [{iso(request.since_ms)}, {iso(request.until_ms)})")
    print(f"  error codes     {', '.join(request.codes) if request.codes else 'all'}")
    unreadable = f" ({tally.unreadable} unreadable, skipped)" if tally.unreadable else ""
    print(f"  scanned         {tally.scanned}{unreadable}")
    print(f"  selected        {n(tally.selected)}")
    print(f"  {verb:<15} {n(tally.republished)}")
    print(f"  already done    {n(tally.done)}")
    print(f"  needs a look    {n(tally.look)}")
    if tally.selected:
        print(f"  {'by error code':<24} {'selected':>8} {'republished':>12} "
              f"{'already done':>13} {'needs a look':>13}")
        for code in sorted(tally.selected):
            print(f"    {code:<22} {tally.selected[code]:>8} {tally.republished[code]:>12} "
                  f"{tally.done[code]:>13} {tally.look[code]:>13}")
    for s, reason in tally.notes[:20]:
        dl = s.letter
        print(f"  needs a look: {request.dlq_topic}:{s.partition}:{s.offset} ({dl.error_code}, "
              f"from {dl.source_topic}:{dl.source_partition}:{dl.source_offset}): {reason}")
    if len(tally.notes) > 20:
        print(f"  ... and {len(tally.notes) - 20} more")
    if tally.notes:
        print("  -> look on the source topic for a record with header dlq_origin=<these coordinates>; "
              "if none is there, rerun with --retry-unconfirmed")


LOG = logging.getLogger("pipelines.recover_dead_letters")


def main(argv: Optional[list[str]] = None) -> int:
    """The command; its exit code. Logs its start and stop (INFO: seen with --log_format json)."""
    logs.configure_from(argv)
    args = sys.argv[1:] if argv is None else argv
    LOG.info("recovery starting", extra={"event": "job_start", "argv": [redact(a) for a in args]})  # no passwords
    code = _main(argv)
    LOG.info("recovery stopped: exit code %d", code, extra={"event": "job_stop", "exit_code": code})
    return code


def _main(argv: Optional[list[str]]) -> int:
    try:
        request = parse_args(argv)
        tally = recover(request)
    except BadRequest as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RecoveryFailed, KafkaException, psycopg2.Error) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    print_summary(request, tally)
    if tally.look and not request.dry_run:
        print(f"error: {sum(tally.look.values())} dead letter(s) need a look (listed above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
