CREATE TABLE shipments (
    id              TEXT    PRIMARY KEY,
    order_id        TEXT    NOT NULL UNIQUE,
    order_number    TEXT    NOT NULL,
    user_id         TEXT    NOT NULL,
    status          TEXT    NOT NULL
        CHECK (status IN ('PENDING', 'PICKED', 'IN_TRANSIT', 'DELIVERED', 'CANCELLED')),
    tracking_number TEXT    NOT NULL UNIQUE,
    name            TEXT    NOT NULL,
    line1           TEXT    NOT NULL,
    line2           TEXT,
    city            TEXT    NOT NULL,
    region          TEXT,
    postal_code     TEXT    NOT NULL,
    country         TEXT    NOT NULL,
    latitude        REAL,
    longitude       REAL,
    items           TEXT    NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    version         INTEGER NOT NULL,
    CHECK ((latitude IS NULL) = (longitude IS NULL))
);
CREATE INDEX shipments_status ON shipments (status, created_at);
CREATE INDEX shipments_created ON shipments (created_at);
CREATE TABLE shipment_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    shipment_id TEXT    NOT NULL REFERENCES shipments (id),
    status      TEXT    NOT NULL,
    at          INTEGER NOT NULL,
    note        TEXT
);
CREATE INDEX shipment_events_shipment ON shipment_events (shipment_id, id);
-- One row per order shipping has been told about. Create and cancel lock it
-- first, so the two serialize per order; `cancelled_at` set with no shipment
-- is a tombstone: the order was cancelled before its shipment was created.
CREATE TABLE shipment_orders (
    order_id     TEXT    PRIMARY KEY,
    cancelled_at INTEGER
);
