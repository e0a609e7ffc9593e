-- Durable tables of the learning-analytics pipelines. Idempotent: safe to apply again.

-- Every valid event, partitioned by day of event time. Daily partitions are
-- created by the archive sink as events for a new day arrive. A repeated event
-- (same event_id and event time) is ignored: that keeps re-delivery and replay exact.
CREATE TABLE IF NOT EXISTS raw_events (
    event_id         text        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    event_type       text        NOT NULL,
    user_id          text        NOT NULL,
    correlation_id   text,
    schema_id        integer     NOT NULL,
    schema_version   integer     NOT NULL,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    payload          jsonb       NOT NULL,
    ingested_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

-- One row per window, metric family and entity; a refired pane overwrites its row.
CREATE TABLE IF NOT EXISTS window_metrics (
    window_seconds integer     NOT NULL,
    window_start   timestamptz NOT NULL,
    window_end     timestamptz NOT NULL,
    family         text        NOT NULL,
    entity_id      text        NOT NULL,
    metrics        jsonb       NOT NULL,
    pane_timing    text        NOT NULL,
    pane_index     bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (window_seconds, window_start, family, entity_id)
);
-- Aggregates recomputed by a replay, kept apart so a replay never overwrites what
-- the streaming job wrote; same shape, compare them with a join.
CREATE TABLE IF NOT EXISTS window_metrics_replay (LIKE window_metrics INCLUDING ALL);

CREATE INDEX IF NOT EXISTS window_metrics_recent ON window_metrics (window_seconds, family, window_start DESC);

-- The window ledger: what the streaming job folded into each window, per
-- partition and offset range, so that a restart rebuilds every open window's
-- total from what the consumer group committed (transforms/ledger.py). A row is
-- written before the offsets it covers are committed; rows above the committed
-- offset are dropped at start-up (those records are read again).
CREATE TABLE IF NOT EXISTS window_ledger (
    group_id        text    NOT NULL,
    topic           text    NOT NULL,
    partition       integer NOT NULL,
    from_offset     bigint  NOT NULL,  -- the first and one past the last offset folded
    to_offset       bigint  NOT NULL,
    window_seconds  integer NOT NULL,
    window_start_ms bigint  NOT NULL,
    partial         jsonb   NOT NULL,  -- {family: {entity: [counters]}}, see transforms/aggregate.py
    horizon_ms      bigint  NOT NULL,  -- the lateness horizon (batch time) these events were read at
    written_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (group_id, topic, partition, window_seconds, window_start_ms, from_offset)
);

-- Dead letters re-published by pipelines/recover_dead_letters.py, one row per dead
-- letter, keyed by where the dead letter itself sits on the dead-letter topic.
-- A row is 'claimed' (committed) before the record is produced and 'published'
-- once the producer confirmed delivery; a row left 'claimed' is a crash or a
-- failed delivery in between and needs a look, never a blind retry. The second
-- key makes two copies of one failure (a retried bundle wrote it twice) one row.
CREATE TABLE IF NOT EXISTS dead_letter_recoveries (
    dlq_topic             text        NOT NULL,
    dlq_partition         integer     NOT NULL,
    dlq_offset            bigint      NOT NULL,
    source_topic          text        NOT NULL,
    source_partition      integer     NOT NULL,
    source_offset         bigint      NOT NULL,
    attempt               integer     NOT NULL,  -- the dead letter's; re-published with attempt + 1
    error_code            text        NOT NULL,
    correlation_id        text,
    failed_at             timestamptz NOT NULL,
    status                text        NOT NULL CHECK (status IN ('claimed', 'published')),
    claimed_at            timestamptz NOT NULL DEFAULT now(),
    published_at          timestamptz,
    republished_partition integer,
    republished_offset    bigint,
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset),
    UNIQUE (source_topic, source_partition, source_offset, attempt)
);

-- Learner behaviour profiles (transforms/profiles): one row per user, the whole
-- profile state as jsonb (its shape: transforms/profiles/profile.py empty()),
-- so that a new field needs no migration; readers wanting plain values read
-- the Redis hash (schemas/serving.py PROFILE_KEY). Upserted by the streaming job.
CREATE TABLE IF NOT EXISTS learner_profiles (
    user_id    text        PRIMARY KEY,
    profile    jsonb       NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The next offset of each partition whose events are already in learner_profiles,
-- per consumer group: written in the same transaction as the profiles ("offsets
-- with the output"), so an event read again after a restart is recognised and
-- skipped, and no event counts twice.
CREATE TABLE IF NOT EXISTS profile_offsets (
    group_id    text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);

-- Anomaly alerts (transforms/alerts/publish.py): one row per RAISED and per RESOLVED
-- record, the authority that makes alerts exactly-once across restarts. alert_id is
-- deterministic (uuid5 of kind, entity, window start, status); a RAISED row is
-- open while resolved_by is NULL, and the partial unique index allows one open
-- episode per (kind, entity): INSERT ... ON CONFLICT DO NOTHING RETURNING tells
-- the worker whether it raised the alert. 'published' is set once the record is
-- on the alerts topic and in the Redis list; rows left unpublished by a publisher
-- that is gone (a crash in between; its owner lock is free) are published again.
CREATE TABLE IF NOT EXISTS alerts (
    alert_id       uuid        PRIMARY KEY,
    episode_id     uuid        NOT NULL,
    status         text        NOT NULL CHECK (status IN ('RAISED', 'RESOLVED')),
    kind           text        NOT NULL,
    severity       text        NOT NULL,
    entity_type    text        NOT NULL,
    entity_id      text        NOT NULL,
    window_seconds integer     NOT NULL,
    window_start   timestamptz NOT NULL,
    window_end     timestamptz NOT NULL,
    observed       double precision NOT NULL,
    expected_low   double precision NOT NULL,
    expected_high  double precision NOT NULL,
    message        text        NOT NULL,
    created_at     timestamptz NOT NULL,
    resolved_by    uuid,        -- on a RAISED row: the RESOLVED alert that closed the episode
    owner          text        NOT NULL,  -- the publisher that recorded it (holds an advisory lock while alive)
    published      boolean     NOT NULL DEFAULT false,
    published_at   timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_open_episode ON alerts (kind, entity_id)
    WHERE status = 'RAISED' AND resolved_by IS NULL;
CREATE INDEX IF NOT EXISTS alerts_by_entity ON alerts (kind, entity_id, window_start DESC);
CREATE INDEX IF NOT EXISTS alerts_unpublished ON alerts (created_at) WHERE NOT published;

-- Every dead letter's source record and its time, for the dead_letter_rate rule
-- (transforms/alerts/evaluate.py): written before the reader's offsets are committed,
-- so a restart counts the dead letters of a minute the earlier run read. Rows are
-- deleted a day after they were written.
CREATE TABLE IF NOT EXISTS alert_dead_letters (
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    record_time      timestamptz NOT NULL,  -- the source record's Kafka timestamp (its event time)
    written_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);
CREATE INDEX IF NOT EXISTS alert_dead_letters_by_time ON alert_dead_letters (record_time);
