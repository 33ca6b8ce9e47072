-- The durable event log.
CREATE TABLE log_partitions (
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    next_offset  BIGINT  NOT NULL,
    PRIMARY KEY (topic, partition_no)
);

CREATE TABLE log_events (
    topic          TEXT    NOT NULL,
    partition_no   INTEGER NOT NULL,
    log_offset     BIGINT  NOT NULL,
    event_id       TEXT    NOT NULL,
    event_type     TEXT    NOT NULL,
    event_key      TEXT    NOT NULL,
    occurred_at    BIGINT  NOT NULL,
    appended_at    BIGINT  NOT NULL,
    correlation_id TEXT    NOT NULL,
    causation_id   TEXT,
    schema_version INTEGER NOT NULL,
    payload        TEXT    NOT NULL,
    size_bytes     BIGINT  NOT NULL,
    PRIMARY KEY (topic, partition_no, log_offset)
);
CREATE UNIQUE INDEX log_events_event_id ON log_events (event_id);
CREATE INDEX log_events_appended ON log_events (topic, appended_at);

CREATE TABLE log_groups (
    group_name   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    next_offset  BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL,
    PRIMARY KEY (group_name, topic, partition_no)
);

CREATE TABLE log_dead_letters (
    id           BIGSERIAL PRIMARY KEY,
    group_name   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    log_offset   BIGINT  NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    error        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('dead', 'retry', 'resolved')),
    dead_at      BIGINT  NOT NULL,
    updated_at   BIGINT  NOT NULL
);
CREATE INDEX log_dead_letters_group ON log_dead_letters (group_name, status);
-- An event is dead-lettered once per group, even if a crash makes the consumer
-- exhaust its attempts again before its position was committed.
CREATE UNIQUE INDEX log_dead_letters_once ON log_dead_letters (group_name, event_id);
