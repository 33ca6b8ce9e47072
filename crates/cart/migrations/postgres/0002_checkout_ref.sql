-- What closed the cart (an order's reference) and the cart as priced then,
-- so a retried checkout with the same reference gets the same answer.
ALTER TABLE carts ADD COLUMN checkout_ref TEXT;
ALTER TABLE carts ADD COLUMN checkout_view TEXT;
ALTER TABLE addresses ADD COLUMN latitude DOUBLE PRECISION;
ALTER TABLE addresses ADD COLUMN longitude DOUBLE PRECISION;
