-- The audit chain: append-only, seq 1, 2, 3… without gaps; each record holds
-- the hash of the one before (prev_hash) and its own (hash), see chain.rs.
CREATE TABLE audit_records (
    seq            BIGINT  PRIMARY KEY,
    event_id       TEXT    NOT NULL UNIQUE,
    occurred_at    BIGINT  NOT NULL,
    recorded_at    BIGINT  NOT NULL,
    category       TEXT    NOT NULL,
    action         TEXT    NOT NULL,
    actor          TEXT,
    subject        TEXT,
    ip             TEXT,
    outcome        TEXT    NOT NULL,
    correlation_id TEXT    NOT NULL,
    details        TEXT    NOT NULL,
    prev_hash      TEXT    NOT NULL,
    hash           TEXT    NOT NULL
);
CREATE INDEX audit_records_actor ON audit_records (actor, seq);
CREATE INDEX audit_records_ip ON audit_records (ip, seq);
CREATE INDEX audit_records_action ON audit_records (action, seq);
CREATE INDEX audit_records_occurred ON audit_records (occurred_at);
-- The alert rules count failures per account and per address by event time.
CREATE INDEX audit_records_action_actor_time ON audit_records (action, actor, occurred_at);
CREATE INDEX audit_records_action_ip_time ON audit_records (action, ip, occurred_at);

-- The chain's head: one row, updated in the transaction of every append
-- (the first statement of it, so appenders queue on this row).
CREATE TABLE audit_head (
    id   BIGINT  PRIMARY KEY CHECK (id = 1),
    seq  BIGINT  NOT NULL,
    hash TEXT    NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Alerts raised; one per (rule, key, window).
CREATE TABLE audit_alerts (
    id           TEXT    PRIMARY KEY,
    rule         TEXT    NOT NULL,
    key_kind     TEXT    NOT NULL,
    alert_key    TEXT    NOT NULL,
    window_start BIGINT  NOT NULL,
    window_end   BIGINT  NOT NULL,
    count        BIGINT  NOT NULL,
    threshold    BIGINT  NOT NULL,
    seq          BIGINT  NOT NULL,
    raised_at    BIGINT  NOT NULL,
    UNIQUE (rule, alert_key, window_start)
);
CREATE INDEX audit_alerts_key ON audit_alerts (rule, alert_key, window_end);
