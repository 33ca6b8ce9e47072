CREATE TABLE stock (
    product_id  TEXT    NOT NULL,
    warehouse   TEXT    NOT NULL,
    on_hand     INTEGER NOT NULL CHECK (on_hand >= 0),
    reserved    INTEGER NOT NULL CHECK (reserved >= 0),
    version     INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (product_id, warehouse),
    CHECK (reserved <= on_hand)
);
CREATE TABLE stock_movements (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    product_id  TEXT    NOT NULL,
    warehouse   TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    quantity    INTEGER NOT NULL,
    reference   TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX stock_movements_product ON stock_movements (product_id, id);
CREATE TABLE reservations (
    order_id    TEXT    PRIMARY KEY,
    status      TEXT    NOT NULL,
    items       TEXT    NOT NULL,
    expires_at  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX reservations_expiry ON reservations (status, expires_at);
