"""One run per consumer group at a time: a lease held in Postgres while the job runs.

A deploy that starts the new job before the old one has stopped, or a
supervisor that starts a second copy, would otherwise have two runs read the
same partitions: each folds the same events into the window ledger and the
later run's seeds count them twice. So a starting job first takes the
group's lease, a Postgres session-level advisory lock, and holds it until it
exits; a second run waits (saying which run holds it) and resumes only once
the first has stopped and its last commits are final. The lock dies with the
holder's connection, so a killed run frees it at once.

A Postgres restart drops every session lock: the holder notices within
``check_every_s``, takes the lease again and logs an error if another run got
it meanwhile (it cannot stop that run; the operator must).

    lease = GroupLease(dsn, "learning-analytics")
    lease.acquire()          # blocks while another run holds it
    ...                      # resume, build, run
    lease.release()
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Optional

import psycopg2

from schemas.postgres import LEASE_LOCK

LOG = logging.getLogger(__name__)
_TRY = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"
_HOLDER = """SELECT a.application_name, a.client_addr, a.backend_start FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = hashtext(%s)::oid AND l.granted"""


class GroupLease:
    """The right to consume ``group_id``, held by one run at a time."""

    def __init__(self, dsn: str, group_id: str, check_every_s: float = 30.0,
                 say: Callable[[str], None] = LOG.warning):
        self.dsn, self.group_id, self.check_every_s, self.say = dsn, group_id, check_every_s, say
        self.name = f"learning-analytics run {socket.gethostname()}:{os.getpid()}"
        self.conn = None
        self._stop = threading.Event()
        self._watch: Optional[threading.Thread] = None

    def acquire(self, poll_s: float = 1.0, say_every_s: float = 15.0) -> float:
        """Blocks until this run holds the lease; returns the seconds it waited."""
        began, said = time.monotonic(), None
        while not self._try():
            if said is None or time.monotonic() - said >= say_every_s:
                said = time.monotonic()
                self.say(f"waiting for the run that holds consumer group {self.group_id!r} to stop "
                         f"({self._holder()}); this run resumes where that one stops")
            time.sleep(poll_s)
        self._watch = threading.Thread(target=self._keep, daemon=True, name="group-lease")
        self._watch.start()
        return time.monotonic() - began

    def release(self) -> None:
        self._stop.set()
        self._close()

    def _try(self) -> bool:
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg2.connect(self.dsn, connect_timeout=10, application_name=self.name,
                                             keepalives=1, keepalives_idle=10, keepalives_interval=5,
                                             keepalives_count=3)
                self.conn.autocommit = True
            with self.conn.cursor() as cur:
                cur.execute(_TRY, (LEASE_LOCK, self.group_id))
                return bool(cur.fetchone()[0])
        except psycopg2.Error:
            self._close()
            raise

    def _holder(self) -> str:
        try:
            with self.conn.cursor() as cur:
                cur.execute(_HOLDER, (LEASE_LOCK, self.group_id))
                row = cur.fetchone()
        except psycopg2.Error as e:
            return f"holder unknown: {e}"
        if row is None:
            return "it just stopped"
        return f"{row[0] or 'a session'} from {row[1] or 'a local socket'}, since {row[2]:%Y-%m-%d %H:%M:%S %Z}"

    def _keep(self) -> None:
        """Re-takes the lease after its connection was lost (a Postgres restart)."""
        held = True
        while not self._stop.wait(self.check_every_s):
            if held and self._alive():
                continue
            try:
                held = self._try()
            except psycopg2.Error as e:
                held = False
                LOG.warning("the lease of consumer group %r could not be checked (%s); retrying",
                            self.group_id, str(e).strip())
                continue
            if not held:
                LOG.error("the lease of consumer group %r was lost with its Postgres connection and another "
                          "run holds it now (%s): two runs are consuming the group; stop one",
                          self.group_id, self._holder())

    def _alive(self) -> bool:
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT 1")
            return True
        except (psycopg2.Error, AttributeError):
            self._close()
            return False

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass
