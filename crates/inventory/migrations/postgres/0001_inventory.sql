CREATE TABLE stock (
    product_id  TEXT    NOT NULL,
    warehouse   TEXT    NOT NULL,
    on_hand     BIGINT  NOT NULL CHECK (on_hand >= 0),
    reserved    BIGINT  NOT NULL CHECK (reserved >= 0),
    version     BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (product_id, warehouse),
    CHECK (reserved <= on_hand)
);
CREATE TABLE stock_movements (
    id          BIGSERIAL PRIMARY KEY,
    product_id  TEXT    NOT NULL,
    warehouse   TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    quantity    BIGINT  NOT NULL,
    reference   TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);
CREATE INDEX stock_movements_product ON stock_movements (product_id, id);
CREATE TABLE reservations (
    order_id    TEXT    PRIMARY KEY,
    status      TEXT    NOT NULL,
    items       TEXT    NOT NULL,
    expires_at  BIGINT  NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);
CREATE INDEX reservations_expiry ON reservations (status, expires_at);
