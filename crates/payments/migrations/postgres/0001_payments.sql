CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE card_tokens (
    id           TEXT    PRIMARY KEY,
    user_id      TEXT    NOT NULL,
    brand        TEXT    NOT NULL,
    last4        TEXT    NOT NULL,
    exp_month    BIGINT  NOT NULL,
    exp_year     BIGINT  NOT NULL,
    country      TEXT    NOT NULL,
    fingerprint  TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL
);
CREATE TABLE transactions (
    id               TEXT    PRIMARY KEY,
    user_id          TEXT    NOT NULL,
    order_id         TEXT,
    idempotency_key  TEXT    NOT NULL,
    request_hash     TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    method           TEXT    NOT NULL,
    card_token       TEXT,
    card_brand       TEXT,
    card_last4       TEXT,
    fingerprint      TEXT,
    vpa              TEXT,
    amount           BIGINT  NOT NULL CHECK (amount > 0),
    tax_amount       BIGINT  NOT NULL CHECK (tax_amount >= 0 AND tax_amount <= amount),
    currency         TEXT    NOT NULL,
    -- Settled refunds, and refunds sent but not yet answered (held).
    refunded_amount  BIGINT  NOT NULL CHECK (refunded_amount >= 0),
    refund_pending   BIGINT  NOT NULL CHECK (refund_pending >= 0),
    auto_capture     BIGINT  NOT NULL,
    billing_country  TEXT,
    fraud_score      BIGINT  NOT NULL,
    fraud_reasons    TEXT    NOT NULL,
    decline_reason   TEXT,
    version          BIGINT  NOT NULL,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    UNIQUE (user_id, idempotency_key),
    CHECK (refunded_amount + refund_pending <= amount)
);
CREATE INDEX transactions_user_time ON transactions (user_id, created_at);
CREATE INDEX transactions_fingerprint_time ON transactions (fingerprint, created_at);
CREATE INDEX transactions_pending ON transactions (status, updated_at);
CREATE TABLE refunds (
    id          TEXT    PRIMARY KEY,
    payment_id  TEXT    NOT NULL,
    idempotency_key TEXT NOT NULL,
    amount      BIGINT  NOT NULL CHECK (amount > 0),
    tax_amount  BIGINT  NOT NULL,
    status      TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);
CREATE UNIQUE INDEX refunds_payment_key ON refunds (payment_id, idempotency_key);
CREATE INDEX refunds_pending ON refunds (status, created_at);
CREATE TABLE idempotency_keys (
    user_id          TEXT    NOT NULL,
    idem_key         TEXT    NOT NULL,
    request_hash     TEXT    NOT NULL,
    response_status  BIGINT,
    response_body    TEXT,
    created_at       BIGINT  NOT NULL,
    locked_at        BIGINT  NOT NULL,
    -- Who holds the claim now: finish/abandon only by the holder.
    owner            TEXT    NOT NULL,
    PRIMARY KEY (user_id, idem_key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
-- The built-in sandbox provider's own state (a real provider keeps this on its side).
CREATE TABLE sandbox_cards (
    token      TEXT PRIMARY KEY,
    behaviour  TEXT NOT NULL,
    country    TEXT NOT NULL
);
CREATE TABLE sandbox_charges (
    reference  TEXT    PRIMARY KEY,
    status     TEXT    NOT NULL,
    behaviour  TEXT    NOT NULL,
    amount     BIGINT  NOT NULL,
    refunded   BIGINT  NOT NULL
);
CREATE TABLE sandbox_refunds (
    refund_id  TEXT    PRIMARY KEY,
    reference  TEXT    NOT NULL,
    amount     BIGINT  NOT NULL
);
