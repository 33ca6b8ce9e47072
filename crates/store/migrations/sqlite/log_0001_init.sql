-- The durable event log.
CREATE TABLE log_partitions (
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    PRIMARY KEY (topic, partition_no)
) WITHOUT ROWID;

-- Clustered by (topic, partition, offset): a consumer's fetch is one range scan.
CREATE TABLE log_events (
    topic          TEXT    NOT NULL,
    partition_no   INTEGER NOT NULL,
    log_offset     INTEGER NOT NULL,
    event_id       TEXT    NOT NULL,
    event_type     TEXT    NOT NULL,
    event_key      TEXT    NOT NULL,
    occurred_at    INTEGER NOT NULL,
    appended_at    INTEGER NOT NULL,
    correlation_id TEXT    NOT NULL,
    causation_id   TEXT,
    schema_version INTEGER NOT NULL,
    payload        TEXT    NOT NULL,
    size_bytes     INTEGER NOT NULL,
    PRIMARY KEY (topic, partition_no, log_offset)
) WITHOUT ROWID;
-- Relay idempotence: an event id is appended once, however often it is sent.
CREATE UNIQUE INDEX log_events_event_id ON log_events (event_id);
CREATE INDEX log_events_appended ON log_events (topic, appended_at);

CREATE TABLE log_groups (
    group_name   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (group_name, topic, partition_no)
) WITHOUT ROWID;

CREATE TABLE log_dead_letters (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    group_name   TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    partition_no INTEGER NOT NULL,
    log_offset   INTEGER NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    error        TEXT    NOT NULL,
    attempts     INTEGER NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('dead', 'retry', 'resolved')),
    dead_at      INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX log_dead_letters_group ON log_dead_letters (group_name, status);
-- An event is dead-lettered once per group, even if a crash makes the consumer
-- exhaust its attempts again before its position was committed.
CREATE UNIQUE INDEX log_dead_letters_once ON log_dead_letters (group_name, event_id);
