-- The source of truth: each order's events, numbered per order. The primary
-- key is the optimistic-concurrency check: two writers of one version collide.
CREATE TABLE order_events (
    order_id     TEXT    NOT NULL,
    version      INTEGER NOT NULL CHECK (version >= 1),
    event_type   TEXT    NOT NULL,
    data         TEXT    NOT NULL,
    occurred_at  INTEGER NOT NULL,
    PRIMARY KEY (order_id, version)
) WITHOUT ROWID;
CREATE TRIGGER order_events_no_update BEFORE UPDATE ON order_events
BEGIN SELECT RAISE(ABORT, 'order_events is append-only'); END;
CREATE TRIGGER order_events_no_delete BEFORE DELETE ON order_events
BEGIN SELECT RAISE(ABORT, 'order_events is append-only'); END;

-- The read side, rebuilt from order_events by replay.
CREATE TABLE orders (
    id          TEXT    PRIMARY KEY,
    number      TEXT    NOT NULL UNIQUE,
    user_id     TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    currency    TEXT    NOT NULL,
    total       INTEGER NOT NULL,
    item_count  INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX orders_user ON orders (user_id, created_at);
CREATE INDEX orders_status ON orders (status, created_at);

-- Idempotency-Key of each placed order (kept with the order, not expired).
CREATE TABLE order_requests (
    user_id          TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    request_hash     TEXT    NOT NULL,
    order_id         TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);

-- Per-year counter behind FL-YYYY-NNNNNN, bumped in the creating transaction.
CREATE TABLE order_numbers (
    year  INTEGER PRIMARY KEY,
    last  INTEGER NOT NULL
);

-- Read models fed by user.events and catalog.events, for enriched output.
CREATE TABLE order_users (
    user_id       TEXT    PRIMARY KEY,
    display_name  TEXT    NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE TABLE order_products (
    product_id  TEXT    PRIMARY KEY,
    title       TEXT    NOT NULL,
    brand       TEXT    NOT NULL,
    category    TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    deleted     INTEGER NOT NULL DEFAULT 0
);
