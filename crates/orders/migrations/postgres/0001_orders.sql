-- The source of truth: each order's events, numbered per order. The primary
-- key is the optimistic-concurrency check: two writers of one version collide.
CREATE TABLE order_events (
    order_id     TEXT    NOT NULL,
    version      BIGINT NOT NULL CHECK (version >= 1),
    event_type   TEXT    NOT NULL,
    data         TEXT    NOT NULL,
    occurred_at  BIGINT NOT NULL,
    PRIMARY KEY (order_id, version)
);
CREATE FUNCTION order_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'order_events is append-only';
END
$$;
CREATE TRIGGER order_events_append_only BEFORE UPDATE OR DELETE ON order_events
    FOR EACH ROW EXECUTE FUNCTION order_events_append_only();

-- The read side, rebuilt from order_events by replay.
CREATE TABLE orders (
    id          TEXT    PRIMARY KEY,
    number      TEXT    NOT NULL UNIQUE,
    user_id     TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    currency    TEXT    NOT NULL,
    total       BIGINT NOT NULL,
    item_count  BIGINT NOT NULL,
    state       TEXT    NOT NULL,
    version     BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE INDEX orders_user ON orders (user_id, created_at);
CREATE INDEX orders_status ON orders (status, created_at);

-- Idempotency-Key of each placed order (kept with the order, not expired).
CREATE TABLE order_requests (
    user_id          TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    request_hash     TEXT    NOT NULL,
    order_id         TEXT    NOT NULL,
    created_at       BIGINT NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);

-- Per-year counter behind FL-YYYY-NNNNNN, bumped in the creating transaction.
CREATE TABLE order_numbers (
    year  BIGINT PRIMARY KEY,
    last  BIGINT NOT NULL
);

-- Read models fed by user.events and catalog.events, for enriched output.
CREATE TABLE order_users (
    user_id       TEXT    PRIMARY KEY,
    display_name  TEXT    NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE TABLE order_products (
    product_id  TEXT    PRIMARY KEY,
    title       TEXT    NOT NULL,
    brand       TEXT    NOT NULL,
    category    TEXT    NOT NULL,
    version     BIGINT NOT NULL,
    deleted     BIGINT NOT NULL DEFAULT 0
);
