CREATE TABLE products (
    id                     TEXT    PRIMARY KEY,
    sku                    TEXT    NOT NULL UNIQUE,
    title                  TEXT    NOT NULL,
    description            TEXT    NOT NULL,
    price_amount           INTEGER NOT NULL CHECK (price_amount >= 0),
    original_price_amount  INTEGER,
    currency               TEXT    NOT NULL,
    category               TEXT    NOT NULL,
    brand                  TEXT    NOT NULL,
    attributes             TEXT    NOT NULL,
    in_stock               INTEGER NOT NULL,
    popularity_score       REAL    NOT NULL,
    version                INTEGER NOT NULL,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL
);
CREATE INDEX products_category ON products (category, id);
CREATE INDEX products_brand ON products (brand, id);
