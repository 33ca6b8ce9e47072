CREATE TABLE products (
    id                     TEXT             PRIMARY KEY,
    sku                    TEXT             NOT NULL UNIQUE,
    title                  TEXT             NOT NULL,
    description            TEXT             NOT NULL,
    price_amount           BIGINT           NOT NULL CHECK (price_amount >= 0),
    original_price_amount  BIGINT,
    currency               TEXT             NOT NULL,
    category               TEXT             NOT NULL,
    brand                  TEXT             NOT NULL,
    attributes             TEXT             NOT NULL,
    in_stock               BIGINT           NOT NULL,
    popularity_score       DOUBLE PRECISION NOT NULL,
    version                BIGINT           NOT NULL,
    created_at             BIGINT           NOT NULL,
    updated_at             BIGINT           NOT NULL
);
CREATE INDEX products_category ON products (category, id);
CREATE INDEX products_brand ON products (brand, id);
