"""How the commands log: one format for every entry point.

    logs.configure_from(argv)          # --log_format text|json, --log_level (env LOG_FORMAT, LOG_LEVEL)
    LOG.info("job started", extra={"event": "job_start", "options": {...}})   # extra: JSON fields

``text`` (the default) keeps the terminal readable: one line per record,
``time LEVEL logger [correlation id]: message``. ``json`` writes one JSON
object a line (python-json-logger) with the fields ``time``, ``level``,
``logger``, ``message``, ``correlation_id`` and whatever a call passed with
``extra`` (``event``, ``options``, ``exit_code``, ``counts``, ...), for a log
collector.

Each line carries the correlation id of the HTTP request it is about (the
analytics service, service/correlation.py), or the process's CORRELATION_ID
(a replay started over HTTP gets its requester's), or ``-``.

Levels: ``--log_level`` sets the project's own loggers (pipelines, transforms,
service, and uvicorn's, which serve the service); Beam's and other libraries'
stay at WARNING, so INFO does not bury the job's lines under the runner's.
Without ``--log_level``: WARNING for text, INFO for json (start, stop, the
dead-letter summaries, replay requests).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from pythonjsonlogger.json import JsonFormatter

from service.correlation import ENV, CorrelationFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The loggers --log_level applies to; every other logger stays at WARNING.
OWN_LOGGERS = ("pipelines", "transforms", "service", "scripts", "uvicorn")
# A record's own attributes, renamed for the JSON line; the rest of the record is left out.
JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(correlation_id)s"
JSON_NAMES = {"levelname": "level", "name": "logger"}


def add_arguments(parser) -> None:
    """``--log_format`` and ``--log_level`` on ``parser`` (argparse, or a PipelineOptions' parser)."""
    parser.add_argument("--log_format", choices=FORMATS, default=os.environ.get("LOG_FORMAT", "text"),
                        help="text: readable lines; json: one JSON object a line [LOG_FORMAT]")
    parser.add_argument("--log_level", choices=LEVELS, type=str.upper, default=os.environ.get("LOG_LEVEL"),
                        help="level of the project's loggers (default: WARNING for text, INFO for json) "
                             "[LOG_LEVEL]")


def parse(argv: Optional[Sequence[str]]) -> tuple[str, int]:
    """In: a command's arguments (others are ignored). Out: (format, level). Exits 2 with an
    ``error:`` line on a bad value, also one from LOG_FORMAT / LOG_LEVEL."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    known, _ = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if known.log_format not in FORMATS:
        _refuse(f"LOG_FORMAT={known.log_format!r}: expected one of {', '.join(FORMATS)}")
    level = (known.log_level or ("INFO" if known.log_format == "json" else "WARNING")).upper()
    if level not in LEVELS:
        _refuse(f"LOG_LEVEL={level!r}: expected one of {', '.join(LEVELS)}")
    return known.log_format, getattr(logging, level)


def _refuse(message: str) -> None:
    print(tag(f"error: {message}"), file=sys.stderr)
    sys.exit(2)


def configure_from(argv: Optional[Sequence[str]] = None) -> str:
    """``configure`` with the format and level the arguments (or environment) ask for; the format."""
    fmt, level = parse(argv)
    configure(level, fmt)
    return fmt


def formatter(fmt: str = "text") -> logging.Formatter:
    """The formatter of ``fmt``: text lines, or one JSON object a line."""
    if fmt == "json":
        # "time": ISO 8601 in UTC, first on the line.
        return JsonFormatter(JSON_FIELDS, rename_fields=JSON_NAMES, timestamp="time", json_default=str)
    return logging.Formatter(FORMAT)


def configure(level: int = logging.WARNING, fmt: str = "text") -> None:
    """One stderr handler on the root logger, in ``fmt``, with the correlation-id filter;
    the project's loggers at ``level``, every other at WARNING. Replaces an earlier setup."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    # On the handler, not the logger: a logger's filters skip records of its children.
    handler.addFilter(CorrelationFilter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    # A process this one starts (a replay over HTTP) logs in the same format and level.
    os.environ["LOG_FORMAT"], os.environ["LOG_LEVEL"] = fmt, logging.getLevelName(level)


def tag(line: str) -> str:
    """``line`` with ' [<correlation id>]' appended when the process has one (env
    CORRELATION_ID, e.g. a replay started over HTTP): for the lines a command
    prints itself (progress, ``error:``), so they carry it like its log lines."""
    cid = os.environ.get(ENV)
    return f"{line} [{cid}]" if cid else line
