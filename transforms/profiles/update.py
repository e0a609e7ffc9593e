"""UpdateProfiles: batches of events in, learner profiles in Postgres and Redis, fast-answers signals out.

    signals = decoded.events | "Profiles" >> UpdateProfiles(dsn, redis_url, group_id, retry)

Exact across restarts without Beam state (Prism checkpoints none): the
partitions' next offsets are stored in Postgres (``profile_offsets``) in the
same transaction as the profiles they produced. A bundle's events are buffered
per (topic, partition); ``finish_bundle`` then, in one transaction:

1. locks the bundle's ``profile_offsets`` rows and drops the events below
   ``next_offset``: an earlier run applied them (a re-read after a restart);
2. locks the users' ``learner_profiles`` rows in user order (two bundles of
   different topics touch the same users; one order means no deadlock);
3. folds the new events into the profiles (transforms/profiles/profile.py),
   upserts them and moves ``next_offset`` past the bundle;
4. writes the profiles to Redis (one pipelined round trip), BEFORE the commit;
5. hands the signals on, then commits.

A crash before the commit leaves Postgres as it was, and the re-read
re-applies the same events to the same state, writing the same values to Redis
again; a crash after it leaves Redis already right. The Kafka offsets are
committed after the bundle, so they never run ahead of ``profile_offsets``.
A signal is handed on before the commit, so a crash may repeat it, never lose
it; the alert publisher turns repeats into one episode.

Outages: Postgres and Redis writes go through circuit breakers
(transforms/sinks/resilience.py): the bundle waits, nothing is dropped. A lost
connection during the transaction redoes it whole.
"""
from __future__ import annotations

import logging
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from psycopg2.extras import Json, execute_values

from schemas.serving import profile_key
from transforms.profiles import profile
from transforms.records import Event
from transforms.sinks.postgres_sink import TRANSIENT as PG_TRANSIENT
from transforms.sinks.postgres_sink import _close_quietly, apply_schema, postgres_breaker, sink_connect
from transforms.sinks.redis_sink import TRANSIENT as REDIS_TRANSIENT
from transforms.sinks.redis_sink import _client, _where
from transforms.sinks.resilience import BreakerCounters, CircuitBreaker, SinkRetryConfig

LOG = logging.getLogger(__name__)

_NEW_OFFSETS = ("INSERT INTO profile_offsets (group_id, topic, partition, next_offset) VALUES %s "
                "ON CONFLICT DO NOTHING")
_LOCK_OFFSETS = ("SELECT topic, partition, next_offset FROM profile_offsets "
                 "WHERE group_id = %s AND (topic, partition) IN %s ORDER BY topic, partition FOR UPDATE")
# Rows of new users first (sorted: a concurrent insert of the same user waits in the same order),
# then every row locked in user order.
_NEW_USERS = ("INSERT INTO learner_profiles (user_id, profile) "
              "SELECT u, '{}'::jsonb FROM unnest(%s::text[]) AS u ORDER BY u ON CONFLICT DO NOTHING")
_LOCK_USERS = ("SELECT user_id, profile FROM learner_profiles WHERE user_id = ANY(%s) "
               "ORDER BY user_id FOR UPDATE")
_UPSERT = ("INSERT INTO learner_profiles (user_id, profile) VALUES %s "
           "ON CONFLICT (user_id) DO UPDATE SET profile = EXCLUDED.profile, updated_at = now()")
_ADVANCE = ("UPDATE profile_offsets AS o SET next_offset = v.next_offset "
            "FROM (VALUES %s) AS v(group_id, topic, partition, next_offset) "
            "WHERE o.group_id = v.group_id AND o.topic = v.topic AND o.partition = v.partition")


class _Prepared(NamedTuple):
    """A transaction ready to commit: what it applied and the signals it caused."""
    applied: int
    skipped: int
    profiles: int
    signals: list


class UpdateProfilesFn(beam.DoFn):
    """Input: lists of Event (one Kafka poll each). Keeps each user's profile in
    Postgres ``learner_profiles`` and the Redis hash ``analytics:profile:<user>``.
    Output: AlertSignals of the fast-answers rule (in the global window)."""

    def __init__(self, dsn: str, redis_url: str, group_id: str, retry: Optional[SinkRetryConfig] = None):
        self.dsn, self.redis_url, self.group_id = dsn, redis_url, group_id
        self.retry = retry or SinkRetryConfig()
        self.applied = Metrics.counter("UpdateProfiles", "events_applied")
        self.skipped = Metrics.counter("UpdateProfiles", "events_already_applied")
        self.written = Metrics.counter("UpdateProfiles", "profiles_written")
        self.signalled = Metrics.counter("UpdateProfiles", "signals")
        self.pg_counters = BreakerCounters("UpdateProfiles.postgres")
        self.redis_counters = BreakerCounters("UpdateProfiles.redis")

    def setup(self):
        self.conn = None
        self.client = None
        self.pg = postgres_breaker("UpdateProfiles", self.dsn, self.retry)
        self.redis = CircuitBreaker(f"UpdateProfiles({_where(self.redis_url)})", self.retry,
                                    probe=self._ping, transient=REDIS_TRANSIENT)
        # A DoFn set up while Postgres is away (a new instance for a new bundle) waits here.
        self.pg.call(lambda: apply_schema(self.dsn))

    def teardown(self):
        self._reset_pg()
        self._reset_redis()

    def start_bundle(self):
        self.pending: dict[tuple[str, int], list[Event]] = {}
        self.timestamp: Optional[Timestamp] = None

    def process(self, events: list[Event], timestamp=beam.DoFn.TimestampParam):
        for e in events:
            self.pending.setdefault((e.topic, e.partition), []).append(e)
        if self.timestamp is None or timestamp > self.timestamp:
            self.timestamp = timestamp
        return ()

    def finish_bundle(self):
        pending, self.pending = self.pending, {}
        if not pending:
            return
        for batch in pending.values():
            batch.sort(key=lambda e: e.offset)   # in offset order already; cheap insurance
        while True:
            prepared = self.pg.call(lambda: self._prepare(pending), reset=self._reset_pg)
            # Before the commit: a crash repeats a signal, never loses it (see the module docstring).
            for signal in prepared.signals:
                yield WindowedValue(signal, self.timestamp, [window.GlobalWindow()])
            if self._commit():
                break
        self.applied.inc(prepared.applied)
        self.skipped.inc(prepared.skipped)
        self.written.inc(prepared.profiles)
        self.signalled.inc(len(prepared.signals))
        self.pg_counters.report(self.pg)
        self.redis_counters.report(self.redis)

    def _commit(self) -> bool:
        """Commits the prepared transaction; False when the connection broke (redo it all:
        whether the server committed or not, redoing is exact)."""
        try:
            self.conn.commit()
            return True
        except PG_TRANSIENT as e:
            LOG.warning("UpdateProfiles: commit failed (%s); redoing the bundle's transaction", e)
            self._reset_pg()
            return False

    def _prepare(self, pending: dict[tuple[str, int], list[Event]]) -> _Prepared:
        """Steps 1-4 of the module docstring, on one transaction left open for the commit."""
        conn = self._connection()
        try:
            with conn.cursor() as cur:
                fresh, skipped = self._lock_offsets(cur, pending)
                users = sorted({e.fields["user_id"] for batch in fresh.values() for e in batch})
                if not users:
                    return _Prepared(0, skipped, 0, [])
                states = self._lock_users(cur, users)
                signals = []
                for key in sorted(fresh):
                    for e in fresh[key]:
                        signals.extend(profile.apply(states[e.fields["user_id"]], e))
                execute_values(cur, _UPSERT, [(u, Json(states[u])) for u in users], page_size=500)
                execute_values(cur, _ADVANCE, [(self.group_id, t, p, batch[-1].offset + 1)
                                               for (t, p), batch in fresh.items() if batch],
                               template="(%s, %s, %s::integer, %s::bigint)")
            self.redis.call(lambda: self._write_redis(states), reset=self._reset_redis)
            return _Prepared(sum(map(len, fresh.values())), skipped, len(users), signals)
        except BaseException:
            self._reset_pg()   # never leave a failed transaction on the connection
            raise

    def _lock_offsets(self, cur, pending: dict) -> tuple[dict, int]:
        """Locks the partitions' offset rows; returns the events not applied yet and how many were."""
        keys = sorted(pending)
        execute_values(cur, _NEW_OFFSETS, [(self.group_id, t, p, 0) for t, p in keys])
        cur.execute(_LOCK_OFFSETS, (self.group_id, tuple(keys)))
        next_offset = {(t, p): o for t, p, o in cur.fetchall()}
        fresh, skipped = {}, 0
        for key in keys:
            batch = [e for e in pending[key] if e.offset >= next_offset[key]]
            skipped += len(pending[key]) - len(batch)
            fresh[key] = batch
        return fresh, skipped

    def _lock_users(self, cur, users: list[str]) -> dict[str, dict]:
        cur.execute(_NEW_USERS, (users,))
        cur.execute(_LOCK_USERS, (users,))
        return {u: profile.load(stored) for u, stored in cur.fetchall()}

    def _write_redis(self, states: dict[str, dict]) -> None:
        """Every changed profile's hash in one pipelined round trip; idempotent (HSET overwrites)."""
        if self.client is None:
            self.client = _client(self.redis_url, self.retry.probe_timeout_s, self.retry.write_timeout_s)
        pipe = self.client.pipeline(transaction=False)
        for user, state in states.items():
            pipe.hset(profile_key(user), mapping=profile.redis_fields(user, state))
        pipe.execute()

    def _connection(self):
        if self.conn is None:
            self.conn = sink_connect(self.dsn, self.retry)
        return self.conn

    def _reset_pg(self) -> None:
        conn, self.conn = getattr(self, "conn", None), None
        _close_quietly(conn)

    def _ping(self) -> None:
        c = _client(self.redis_url, self.retry.probe_timeout_s, self.retry.probe_timeout_s)
        try:
            c.ping()
        finally:
            c.close()

    def _reset_redis(self) -> None:
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            client.close()


class UpdateProfiles(beam.PTransform):
    """Batches of Event -> AlertSignals (kind ``fast_answers``); every valid event
    is folded once into its user's profile in Postgres and Redis."""

    def __init__(self, dsn: str, redis_url: str, group_id: str, retry: Optional[SinkRetryConfig] = None):
        super().__init__()
        self.dsn, self.redis_url, self.group_id, self.retry = dsn, redis_url, group_id, retry

    def expand(self, event_batches):
        return event_batches | "FoldIntoProfiles" >> beam.ParDo(
            UpdateProfilesFn(self.dsn, self.redis_url, self.group_id, self.retry))
