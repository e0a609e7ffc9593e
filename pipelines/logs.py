"""How the commands log: one format for every entry point.

Each line carries the correlation id of the HTTP request it is about (the
analytics service, service/correlation.py), or the process's CORRELATION_ID,
or ``-``.
"""
from __future__ import annotations

import logging
import os

from service.correlation import ENV, CorrelationFilter

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"


def configure(level: int = logging.WARNING) -> None:
    """Log lines to stderr, warnings and above by default."""
    logging.basicConfig(level=level, format=FORMAT)
    for handler in logging.getLogger().handlers:
        # On the handler, not the logger: a logger's filters skip records of its children.
        if not any(isinstance(f, CorrelationFilter) for f in handler.filters):
            handler.addFilter(CorrelationFilter())


def tag(line: str) -> str:
    """``line`` with ' [<correlation id>]' appended when the process has one (env
    CORRELATION_ID, e.g. a replay started over HTTP): for the lines a command
    prints itself (progress, ``error:``), so they carry it like its log lines."""
    cid = os.environ.get(ENV)
    return f"{line} [{cid}]" if cid else line
