"""Correlation ids: one per HTTP request, on its response and on every log line about it.

    app.add_middleware(CorrelationMiddleware)   # X-Correlation-ID in, or a new uuid4; echoed back
    current()                                   # the id of the request being served, or None
    handler.addFilter(CorrelationFilter())      # %(correlation_id)s in a log format

The id lives in a contextvar, so it follows the request into the endpoint,
also when FastAPI runs a sync endpoint on its thread pool (it copies the
context). Log lines outside any request show the process default: the
environment's CORRELATION_ID (a process started for a request, such as a
replay, can be given its requester's id that way), else ``-``.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from contextvars import ContextVar
from typing import Optional

HEADER = "X-Correlation-ID"
ENV = "CORRELATION_ID"
_HEADER_KEY = HEADER.lower().encode("latin-1")
# What a caller may send: printable, no spaces, bounded (it goes into every log line).
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_current: ContextVar[Optional[str]] = ContextVar("correlation_id", default=None)


def current() -> Optional[str]:
    """The correlation id of the request being served here, or None outside a request."""
    return _current.get()


def choose(header: Optional[str]) -> str:
    """In: the request's X-Correlation-ID (or None). Out: it, when acceptable, else a new uuid4."""
    if header and _ACCEPTABLE.fullmatch(header):
        return header
    return str(uuid.uuid4())


class CorrelationMiddleware:
    """ASGI middleware: sets the request's correlation id and returns it in the response header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(_HEADER_KEY)
        cid = choose(sent.decode("latin-1") if sent else None)
        token = _current.set(cid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != _HEADER_KEY]
                message = dict(message, headers=headers + [(_HEADER_KEY, cid.encode("latin-1"))])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class CorrelationFilter(logging.Filter):
    """Puts ``correlation_id`` on every record it sees: the request's, else the process default."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "correlation_id"):
            record.correlation_id = current() or os.environ.get(ENV) or "-"
        return True
