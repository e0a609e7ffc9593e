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
CREATE INDEX IF NOT EXISTS window_metrics_recent ON window_metrics (window_seconds, family, window_start DESC);
