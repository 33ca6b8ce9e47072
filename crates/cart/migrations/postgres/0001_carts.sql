CREATE TABLE carts (
    id          TEXT    PRIMARY KEY,
    user_id     TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('open', 'checked_out')),
    currency    TEXT,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    version     BIGINT  NOT NULL
);
CREATE INDEX carts_user ON carts (user_id, id);

CREATE TABLE cart_items (
    cart_id     TEXT    NOT NULL REFERENCES carts (id) ON DELETE CASCADE,
    product_id  TEXT    NOT NULL,
    quantity    BIGINT  NOT NULL CHECK (quantity BETWEEN 1 AND 99),
    added_at    BIGINT  NOT NULL,
    PRIMARY KEY (cart_id, product_id)
);

CREATE TABLE addresses (
    id           TEXT    PRIMARY KEY,
    user_id      TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    line1        TEXT    NOT NULL,
    line2        TEXT,
    city         TEXT    NOT NULL,
    region       TEXT,
    postal_code  TEXT    NOT NULL,
    country      TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL
);
CREATE INDEX addresses_user ON addresses (user_id, id);

-- One row per user holding addresses: the per-user limit is enforced on it,
-- so concurrent creates serialise on its row lock.
CREATE TABLE address_counts (
    user_id  TEXT    PRIMARY KEY,
    n        BIGINT  NOT NULL CHECK (n >= 0)
);
