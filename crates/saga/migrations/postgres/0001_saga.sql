-- Saga instances and their timelines.
CREATE TABLE saga_instances (
    id              TEXT    PRIMARY KEY,
    name            TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    data            TEXT    NOT NULL,
    results         TEXT    NOT NULL,
    step_index      BIGINT  NOT NULL,
    attempt         BIGINT  NOT NULL,
    next_attempt_at BIGINT  NOT NULL,
    locked_until    BIGINT,
    failure         TEXT,
    stuck           BIGINT  NOT NULL DEFAULT 0,
    version         BIGINT  NOT NULL,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL
);
CREATE INDEX saga_instances_due ON saga_instances (status, next_attempt_at);
CREATE INDEX saga_instances_created ON saga_instances (created_at);

CREATE TABLE saga_steps (
    saga_id     TEXT    NOT NULL,
    seq         BIGINT  NOT NULL,
    step        TEXT    NOT NULL,
    phase       TEXT    NOT NULL,
    attempt     BIGINT  NOT NULL,
    status      TEXT    NOT NULL,
    started_at  BIGINT  NOT NULL,
    finished_at BIGINT  NOT NULL,
    output      TEXT,
    error       TEXT,
    PRIMARY KEY (saga_id, seq)
);
