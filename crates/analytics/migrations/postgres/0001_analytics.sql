-- Per-job progress: the watermark and the counters of what happened to each
-- input element. Written in the transaction of every event the job consumes,
-- together with the inbox claim, so it is checkpointed with the consumer.
CREATE TABLE analytics_jobs (
    job            TEXT    PRIMARY KEY,
    -- Largest event time seen (µs); NULL before the first element.
    max_event_time BIGINT,
    -- max_event_time - out_of_orderness, never moving back.
    watermark      BIGINT,
    -- Elements that updated state (on time or late).
    events         BIGINT NOT NULL DEFAULT 0,
    -- Elements applied to a window the watermark had already passed.
    late_applied   BIGINT NOT NULL DEFAULT 0,
    -- Elements whose windows were all final (beyond allowed lateness).
    dropped        BIGINT NOT NULL DEFAULT 0,
    updated_at     BIGINT NOT NULL
);

-- One row per (job, key, window): the aggregate so far. Finality is derived
-- from the job's watermark (end + allowed lateness <= watermark).
CREATE TABLE analytics_windows (
    job            TEXT    NOT NULL,
    window_key     TEXT    NOT NULL,
    window_start   BIGINT NOT NULL,
    window_end     BIGINT NOT NULL,
    elements       BIGINT NOT NULL,
    late_elements  BIGINT NOT NULL,
    -- Revenue in minor units, or latency in µs.
    sum_value      BIGINT NOT NULL,
    distinct_count BIGINT NOT NULL,
    -- Largest latency in µs (latency jobs only).
    max_value      BIGINT,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (job, window_key, window_start, window_end)
);
CREATE INDEX analytics_windows_by_start ON analytics_windows (job, window_start);

-- Distinct members (users) of a window: the exact set behind distinct_count.
CREATE TABLE analytics_window_members (
    job          TEXT    NOT NULL,
    window_key   TEXT    NOT NULL,
    window_start BIGINT NOT NULL,
    window_end   BIGINT NOT NULL,
    member       TEXT    NOT NULL,
    PRIMARY KEY (job, window_key, window_start, window_end, member)
);

-- Latency distribution of a window: durations (µs, three significant digits)
-- with their multiplicity; percentiles are read off it by nearest rank.
CREATE TABLE analytics_window_latency (
    job          TEXT    NOT NULL,
    window_key   TEXT    NOT NULL,
    window_start BIGINT NOT NULL,
    window_end   BIGINT NOT NULL,
    bucket_us    BIGINT NOT NULL,
    n            BIGINT NOT NULL,
    PRIMARY KEY (job, window_key, window_start, window_end, bucket_us)
);

-- Session windows still open (not final yet): one row per session.
CREATE TABLE analytics_open_sessions (
    job           TEXT    NOT NULL,
    session_key   TEXT    NOT NULL,
    session_start BIGINT NOT NULL,
    last_event    BIGINT NOT NULL,
    events        BIGINT NOT NULL,
    PRIMARY KEY (job, session_key, session_start)
);
CREATE INDEX analytics_open_sessions_by_last ON analytics_open_sessions (job, last_event);

-- Sessions the watermark closed (final, never changed again).
CREATE TABLE analytics_sessions (
    job           TEXT    NOT NULL,
    session_key   TEXT    NOT NULL,
    session_start BIGINT NOT NULL,
    session_end   BIGINT NOT NULL,
    events        BIGINT NOT NULL,
    closed_at     BIGINT NOT NULL,
    PRIMARY KEY (job, session_key, session_start)
);
CREATE INDEX analytics_sessions_by_start ON analytics_sessions (job, session_start);
