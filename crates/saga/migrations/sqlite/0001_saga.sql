-- Saga instances and their timelines.
CREATE TABLE saga_instances (
    id              TEXT    PRIMARY KEY,
    name            TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    data            TEXT    NOT NULL,
    results         TEXT    NOT NULL,
    step_index      INTEGER NOT NULL,
    attempt         INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    locked_until    INTEGER,
    failure         TEXT,
    stuck           INTEGER NOT NULL DEFAULT 0,
    version         INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX saga_instances_due ON saga_instances (status, next_attempt_at);
CREATE INDEX saga_instances_created ON saga_instances (created_at);

CREATE TABLE saga_steps (
    saga_id     TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    step        TEXT    NOT NULL,
    phase       TEXT    NOT NULL,
    attempt     INTEGER NOT NULL,
    status      TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    output      TEXT,
    error       TEXT,
    PRIMARY KEY (saga_id, seq)
) WITHOUT ROWID;
