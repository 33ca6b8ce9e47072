-- Kernel tables present in every service database.
CREATE TABLE outbox (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    event_type     TEXT    NOT NULL,
    event_key      TEXT    NOT NULL,
    occurred_at    INTEGER NOT NULL,
    correlation_id TEXT    NOT NULL,
    causation_id   TEXT,
    schema_version INTEGER NOT NULL,
    payload        TEXT    NOT NULL
);

CREATE TABLE inbox (
    consumer     TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
) WITHOUT ROWID;
