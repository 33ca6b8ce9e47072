-- Closed spans of request-driven flows, oldest pruned first (by seq).
CREATE TABLE trace_spans (
    seq         BIGSERIAL PRIMARY KEY,
    trace_id    TEXT    NOT NULL,
    span_id     TEXT    NOT NULL,
    parent_id   TEXT,
    name        TEXT    NOT NULL,
    start_us    BIGINT  NOT NULL,
    duration_us BIGINT  NOT NULL,
    attrs       TEXT    NOT NULL,
    db_calls    BIGINT  NOT NULL,
    db_us       BIGINT  NOT NULL,
    node        TEXT    NOT NULL
);
CREATE INDEX trace_spans_trace ON trace_spans (trace_id);
CREATE INDEX trace_spans_name ON trace_spans (name, seq);
