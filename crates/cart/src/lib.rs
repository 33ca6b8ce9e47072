//! flowline-cart: shopping carts and shipping addresses.
//!
//! A cart stores product ids and quantities, never prices: titles, prices and
//! stock come from a [`PriceSource`] (the catalog) each time the cart is read,
//! so a cart always shows current prices. The first item fixes the cart's
//! currency; removing the last one clears it. Every cart change commits with a
//! `cart.*` event on `cart.events` (key: cart id) in the same transaction.

mod address;
pub mod routes;

pub use address::{Address, NewAddress, MAX_ADDRESSES};
pub use routes::{routes, CartApi};

use flowline_core::{Currency, Envelope, ErrorCode, EventDraft, Money, Problem, Timestamp};
use flowline_http::{ApiError, BoxFuture, RequestContext};
use flowline_store::outbox::{self, Relay};
use flowline_store::{Db, Migration, StoreError, Tx};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub const TOPIC: &str = "cart.events";

/// Units of one product a cart may hold.
pub const MAX_QUANTITY: i64 = 99;

/// Distinct products a cart may hold: every read prices each line.
pub const MAX_LINES: i64 = 50;

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        scope: "cart",
        version: 1,
        name: "carts_addresses",
        sqlite: include_str!("../migrations/sqlite/0001_carts.sql"),
        postgres: include_str!("../migrations/postgres/0001_carts.sql"),
    },
    Migration {
        scope: "cart",
        version: 2,
        name: "checkout_reference_and_coordinates",
        sqlite: include_str!("../migrations/sqlite/0002_checkout_ref.sql"),
        postgres: include_str!("../migrations/postgres/0002_checkout_ref.sql"),
    },
];

const OPEN: &str = "open";
const CHECKED_OUT: &str = "checked_out";

/// A product as the cart shows it, read when the cart is read.
#[derive(Debug, Clone, PartialEq)]
pub struct PricedProduct {
    pub title: String,
    pub price: Money,
    pub in_stock: bool,
}

/// Where current prices come from (the server answers from the catalog: a
/// context never reads another's tables).
pub trait PriceSource: Send + Sync {
    /// The product, or `None` when the catalog no longer has it.
    fn product<'a>(
        &'a self,
        product_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<PricedProduct>, ApiError>>;
}

/// Money as documented (the core type has no schema dependency).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct MoneyDoc {
    /// Minor units (e.g. cents).
    amount: i64,
    /// ISO 4217 code.
    currency: String,
}

/// A cart priced now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CartView {
    pub id: String,
    pub user_id: String,
    /// `open` or `checked_out`.
    pub status: String,
    /// Set by the first item, cleared when the last one is removed.
    pub currency: Option<String>,
    /// In the order they were added.
    pub items: Vec<CartLine>,
    /// Units across all lines.
    pub item_count: i64,
    /// Sum of the lines the catalog still prices in the cart's currency (out of
    /// stock ones included); null while the cart has no currency.
    #[schema(value_type = Option<MoneyDoc>)]
    pub subtotal: Option<Money>,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CartLine {
    pub product_id: String,
    /// Null when the catalog no longer has the product.
    pub title: Option<String>,
    pub quantity: i64,
    /// Current price; null when the catalog no longer has the product.
    #[schema(value_type = Option<MoneyDoc>)]
    pub unit_price: Option<Money>,
    #[schema(value_type = Option<MoneyDoc>)]
    pub line_total: Option<Money>,
    /// Still sold, in stock and priced in the cart's currency: checkout needs
    /// every line available.
    pub available: bool,
}

/// A product to add; its quantity adds to what the cart already holds.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AddItem {
    #[schema(required = true)]
    pub product_id: String,
    /// 1 to 99 (and at most 99 in total).
    #[schema(required = true)]
    pub quantity: i64,
}

/// A line's new quantity.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SetQuantity {
    /// 1 to 99.
    #[schema(required = true)]
    pub quantity: i64,
}

/// A cart and its lines as stored.
struct CartRow {
    id: String,
    user_id: String,
    status: String,
    currency: Option<String>,
    created_at: i64,
    updated_at: i64,
    version: i64,
    /// (product id, quantity)
    items: Vec<(String, i64)>,
}

type JoinRow = (
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    i64,
    Option<String>,
    Option<i64>,
);

pub struct Carts {
    pub db: Db,
    relay: Relay,
    prices: Arc<dyn PriceSource>,
}

pub async fn open(db: Db, relay: Relay, prices: Arc<dyn PriceSource>) -> Result<Carts, StoreError> {
    db.migrate(outbox::KERNEL_MIGRATIONS).await?;
    db.migrate(MIGRATIONS).await?;
    Ok(Carts { db, relay, prices })
}

impl Carts {
    /// A new, empty cart of `user_id`.
    pub async fn create(&self, ctx: &RequestContext, user_id: &str) -> Result<CartView, ApiError> {
        let now = Timestamp::now().as_micros();
        let cart = CartRow {
            id: flowline_core::id::new_id().to_string(),
            user_id: user_id.to_owned(),
            status: OPEN.to_owned(),
            currency: None,
            created_at: now,
            updated_at: now,
            version: 1,
            items: Vec::new(),
        };
        let mut tx = self.db.begin().await?;
        flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO carts (id, user_id, status, currency, created_at, updated_at, version)
             VALUES ($1, $2, $3, NULL, $4, $4, 1)"
        )
        .bind(&cart.id)
        .bind(user_id)
        .bind(OPEN)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        let payload = serde_json::json!({ "cart_id": cart.id, "user_id": user_id });
        self.emit(&mut tx, ctx, "cart.created", &cart.id, payload)
            .await?;
        tx.commit().await?;
        self.relay.notify();
        self.price(cart).await
    }

    /// The user's cart priced now; another user's cart is not found.
    pub async fn view(&self, user_id: &str, cart_id: &str) -> Result<CartView, ApiError> {
        let cart = self.load(user_id, cart_id).await?;
        self.price(cart).await
    }

    /// Adds `item.quantity` units of a product the catalog sells, fixing the
    /// cart's currency if it is the first item.
    pub async fn add_item(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        cart_id: &str,
        item: AddItem,
    ) -> Result<CartView, ApiError> {
        let mut bad =
            Problem::new(ErrorCode::ValidationFailed).with_detail("the item is not valid");
        let product_id = item.product_id.trim();
        if product_id.is_empty() || product_id.chars().count() > 100 {
            bad = bad.with_field("product_id", "1 to 100 characters");
        }
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            bad = bad.with_field("quantity", "1 to 99");
        }
        if !bad.errors.is_empty() {
            return Err(bad.into());
        }
        // Others' carts are refused before the catalog is asked anything.
        let cart = self.load(user_id, cart_id).await?;
        if cart.status != OPEN {
            return Err(checked_out());
        }
        let Some(product) = self.prices.product(product_id).await? else {
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_detail("the catalog has no such product")
                .with_field("product_id", "no such product")
                .into());
        };
        let currency = product.price.currency;
        if let Some(have) = cart.currency.as_deref().filter(|c| *c != currency.as_str()) {
            return Err(mismatch(have, currency));
        }

        let mut tx = self.db.begin().await?;
        if !lock(&mut tx, user_id, cart_id, Some(currency)).await? {
            tx.rollback().await?;
            return Err(self.refused(user_id, cart_id, Some(currency)).await);
        }
        let (held, lines): (Option<i64>, i64) = flowline_store::on_tx!(&mut tx, |c| async move {
            let held = sqlx::query_scalar(
                "SELECT quantity FROM cart_items WHERE cart_id = $1 AND product_id = $2",
            )
            .bind(cart_id)
            .bind(product_id)
            .fetch_optional(&mut *c)
            .await?;
            let lines = sqlx::query_scalar("SELECT COUNT(*) FROM cart_items WHERE cart_id = $1")
                .bind(cart_id)
                .fetch_one(&mut *c)
                .await?;
            Ok::<_, sqlx::Error>((held, lines))
        }
        .await)
        .map_err(StoreError::from)?;
        let quantity = held.unwrap_or(0) + item.quantity;
        if quantity > MAX_QUANTITY {
            tx.rollback().await?;
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_detail(format!(
                    "the cart already holds {} of this product; at most {MAX_QUANTITY} in total",
                    held.unwrap_or(0)
                ))
                .with_field("quantity", "at most 99 in total")
                .into());
        }
        if held.is_none() && lines >= MAX_LINES {
            tx.rollback().await?;
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_detail(format!("a cart holds at most {MAX_LINES} products"))
                .with_field("product_id", "the cart is full")
                .into());
        }
        // The line keeps its place (added_at) when it grows.
        let sql = "INSERT INTO cart_items (cart_id, product_id, quantity, added_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (cart_id, product_id) DO UPDATE SET quantity = excluded.quantity";
        flowline_store::on_tx!(&mut tx, |c| sqlx::query(sql)
            .bind(cart_id)
            .bind(product_id)
            .bind(quantity)
            .bind(Timestamp::now().as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        let payload = serde_json::json!({
            "cart_id": cart_id, "user_id": user_id, "product_id": product_id,
            "added": item.quantity, "quantity": quantity,
        });
        self.emit(&mut tx, ctx, "cart.item_added", cart_id, payload)
            .await?;
        tx.commit().await?;
        self.relay.notify();
        self.view(user_id, cart_id).await
    }

    /// Sets a line's quantity (1 to 99).
    pub async fn set_quantity(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        cart_id: &str,
        product_id: &str,
        quantity: i64,
    ) -> Result<CartView, ApiError> {
        if !(1..=MAX_QUANTITY).contains(&quantity) {
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_detail("quantity must be 1 to 99; remove the item to drop it")
                .with_field("quantity", "1 to 99")
                .into());
        }
        let mut tx = self.db.begin().await?;
        if !lock(&mut tx, user_id, cart_id, None).await? {
            tx.rollback().await?;
            return Err(self.refused(user_id, cart_id, None).await);
        }
        let n = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE cart_items SET quantity = $3 WHERE cart_id = $1 AND product_id = $2"
        )
        .bind(cart_id)
        .bind(product_id)
        .bind(quantity)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if n == 0 {
            tx.rollback().await?;
            return Err(no_item());
        }
        let payload = serde_json::json!({
            "cart_id": cart_id, "user_id": user_id, "product_id": product_id, "quantity": quantity,
        });
        self.emit(&mut tx, ctx, "cart.item_updated", cart_id, payload)
            .await?;
        tx.commit().await?;
        self.relay.notify();
        self.view(user_id, cart_id).await
    }

    /// Removes a line; the last one takes the cart's currency with it.
    pub async fn remove_item(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        cart_id: &str,
        product_id: &str,
    ) -> Result<CartView, ApiError> {
        let mut tx = self.db.begin().await?;
        if !lock(&mut tx, user_id, cart_id, None).await? {
            tx.rollback().await?;
            return Err(self.refused(user_id, cart_id, None).await);
        }
        let n = flowline_store::on_tx!(&mut tx, |c| async move {
            let n = sqlx::query("DELETE FROM cart_items WHERE cart_id = $1 AND product_id = $2")
                .bind(cart_id)
                .bind(product_id)
                .execute(&mut *c)
                .await?
                .rows_affected();
            sqlx::query(
                "UPDATE carts SET currency = NULL
                 WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM cart_items WHERE cart_id = $1)",
            )
            .bind(cart_id)
            .execute(&mut *c)
            .await?;
            Ok::<_, sqlx::Error>(n)
        }
        .await)
        .map_err(StoreError::from)?;
        if n == 0 {
            tx.rollback().await?;
            return Err(no_item());
        }
        let payload = serde_json::json!({
            "cart_id": cart_id, "user_id": user_id, "product_id": product_id, "quantity": 0,
        });
        self.emit(&mut tx, ctx, "cart.item_removed", cart_id, payload)
            .await?;
        tx.commit().await?;
        self.relay.notify();
        self.view(user_id, cart_id).await
    }

    /// Closes the cart for the order it becomes: refused (422) when empty, and
    /// (409) when a line is unavailable or the cart changed meanwhile. Returns
    /// the cart as priced at checkout.
    ///
    /// `reference` names the checkout (the order's idempotency key): a retry
    /// with the same reference gets the same cart back, priced as it was.
    pub async fn checkout(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        cart_id: &str,
        reference: &str,
    ) -> Result<CartView, ApiError> {
        let cart = self.load(user_id, cart_id).await?;
        if cart.status != OPEN {
            return self.checked_out_as(user_id, cart_id, reference).await;
        }
        let version = cart.version;
        let mut view = self.price(cart).await?;
        if view.items.is_empty() {
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_detail("the cart is empty")
                .with_field("items", "add at least one item")
                .into());
        }
        let unavailable: Vec<&CartLine> = view.items.iter().filter(|l| !l.available).collect();
        if !unavailable.is_empty() {
            let mut p = Problem::new(ErrorCode::Conflict)
                .with_detail("some items are no longer available; remove them and retry");
            for l in unavailable {
                p = p.with_field(format!("items.{}", l.product_id), "not available");
            }
            return Err(p.into());
        }
        let now = Timestamp::now();
        view.status = CHECKED_OUT.to_owned();
        view.updated_at = now.to_rfc3339();
        let stored = serde_json::to_string(&view).map_err(StoreError::from)?;
        let mut tx = self.db.begin().await?;
        // Only the version priced above: a concurrent change means the buyer
        // has not seen what would be ordered.
        let n = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE carts SET status = $3, version = version + 1, updated_at = $4,
                checkout_ref = $7, checkout_view = $8
             WHERE id = $1 AND user_id = $2 AND status = $5 AND version = $6"
        )
        .bind(cart_id)
        .bind(user_id)
        .bind(CHECKED_OUT)
        .bind(now.as_micros())
        .bind(OPEN)
        .bind(version)
        .bind(reference)
        .bind(&stored)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if n == 0 {
            tx.rollback().await?;
            return Err(match self.load(user_id, cart_id).await {
                Ok(c) if c.status != OPEN => {
                    return self.checked_out_as(user_id, cart_id, reference).await
                }
                Ok(_) => Problem::new(ErrorCode::Conflict)
                    .with_detail("the cart changed during checkout; review it and retry")
                    .into(),
                Err(e) => e,
            });
        }
        let lines: Vec<_> = view
            .items
            .iter()
            .map(|l| {
                serde_json::json!({
                    "product_id": l.product_id, "quantity": l.quantity, "unit_price": l.unit_price,
                })
            })
            .collect();
        let payload = serde_json::json!({
            "cart_id": cart_id, "user_id": user_id, "items": lines, "subtotal": view.subtotal,
        });
        self.emit(&mut tx, ctx, "cart.checked_out", cart_id, payload)
            .await?;
        tx.commit().await?;
        self.relay.notify();
        Ok(view)
    }

    /// A closed cart: what its checkout answered, if `reference` closed it.
    async fn checked_out_as(
        &self,
        user_id: &str,
        cart_id: &str,
        reference: &str,
    ) -> Result<CartView, ApiError> {
        let row: Option<(Option<String>, Option<String>)> =
            flowline_store::on_pool!(write & self.db, |p| sqlx::query_as(
                "SELECT checkout_ref, checkout_view FROM carts WHERE id = $1 AND user_id = $2"
            )
            .bind(cart_id)
            .bind(user_id)
            .fetch_optional(p)
            .await)
            .map_err(StoreError::from)?;
        match row {
            Some((Some(r), Some(view))) if r == reference => {
                Ok(serde_json::from_str(&view).map_err(StoreError::from)?)
            }
            _ => Err(checked_out()),
        }
    }

    /// The cart and its lines in one statement (one snapshot).
    async fn load(&self, user_id: &str, cart_id: &str) -> Result<CartRow, ApiError> {
        let rows: Vec<JoinRow> = flowline_store::on_pool!(&self.db, |p| {
            sqlx::query_as(
            "SELECT c.id, c.user_id, c.status, c.currency, c.created_at, c.updated_at, c.version,
                    i.product_id, i.quantity
             FROM carts c LEFT JOIN cart_items i ON i.cart_id = c.id
             WHERE c.id = $1 AND c.user_id = $2
             ORDER BY i.added_at, i.product_id"
        )
        .bind(cart_id)
        .bind(user_id)
        .fetch_all(p)
        .await
        })
        .map_err(StoreError::from)?;
        let Some(first) = rows.first() else {
            return Err(not_found());
        };
        let mut cart = CartRow {
            id: first.0.clone(),
            user_id: first.1.clone(),
            status: first.2.clone(),
            currency: first.3.clone(),
            created_at: first.4,
            updated_at: first.5,
            version: first.6,
            items: Vec::with_capacity(rows.len()),
        };
        for r in rows {
            if let (Some(product_id), Some(quantity)) = (r.7, r.8) {
                cart.items.push((product_id, quantity));
            }
        }
        Ok(cart)
    }

    /// Prices every line now.
    async fn price(&self, cart: CartRow) -> Result<CartView, ApiError> {
        let currency = cart.currency.as_deref();
        let mut items = Vec::with_capacity(cart.items.len());
        let mut item_count = 0i64;
        let mut subtotal = 0i64;
        for (product_id, quantity) in cart.items {
            item_count += quantity;
            let line = match self.prices.product(&product_id).await? {
                None => CartLine {
                    product_id,
                    title: None,
                    quantity,
                    unit_price: None,
                    line_total: None,
                    available: false,
                },
                Some(p) => {
                    let amount = p.price.amount.checked_mul(quantity).ok_or_else(overflow)?;
                    // A product re-priced in another currency cannot be summed.
                    let same = currency == Some(p.price.currency.as_str());
                    if same {
                        subtotal = subtotal.checked_add(amount).ok_or_else(overflow)?;
                    }
                    CartLine {
                        product_id,
                        title: Some(p.title),
                        quantity,
                        unit_price: Some(p.price),
                        line_total: Some(Money {
                            amount,
                            currency: p.price.currency,
                        }),
                        available: same && p.in_stock,
                    }
                }
            };
            items.push(line);
        }
        let subtotal = match currency {
            Some(c) => Some(Money {
                amount: subtotal,
                currency: Currency::parse(c)
                    .map_err(|_| StoreError::CorruptEvent(format!("cart {} currency", cart.id)))?,
            }),
            None => None,
        };
        Ok(CartView {
            id: cart.id,
            user_id: cart.user_id,
            status: cart.status,
            currency: cart.currency,
            items,
            item_count,
            subtotal,
            created_at: Timestamp::from_micros(cart.created_at).to_rfc3339(),
            updated_at: Timestamp::from_micros(cart.updated_at).to_rfc3339(),
        })
    }

    /// Why `lock` touched no row.
    async fn refused(&self, user_id: &str, cart_id: &str, currency: Option<Currency>) -> ApiError {
        match self.load(user_id, cart_id).await {
            Err(e) => e,
            Ok(c) if c.status != OPEN => checked_out(),
            Ok(c) => match (c.currency, currency) {
                (Some(have), Some(want)) if have != want.as_str() => mismatch(&have, want),
                _ => Problem::new(ErrorCode::Conflict)
                    .with_detail("the cart changed meanwhile; retry")
                    .into(),
            },
        }
    }

    async fn emit(
        &self,
        tx: &mut Tx,
        ctx: &RequestContext,
        kind: &str,
        cart_id: &str,
        payload: serde_json::Value,
    ) -> Result<(), StoreError> {
        let ev = Envelope::stamp(
            EventDraft::new(TOPIC, kind, cart_id, payload),
            &ctx.correlation_id,
            Some(&ctx.request_id),
        );
        outbox::enqueue(tx, &ev).await
    }
}

/// Bumps the cart's version if it is the user's and open (and, with
/// `currency`, empty or in that currency, which it then takes). On PostgreSQL
/// the row lock serialises writers of one cart until commit.
async fn lock(
    tx: &mut Tx,
    user_id: &str,
    cart_id: &str,
    currency: Option<Currency>,
) -> Result<bool, StoreError> {
    let n = flowline_store::on_tx!(tx, |c| {
        sqlx::query(
        "UPDATE carts SET version = version + 1, updated_at = $3, currency = COALESCE(currency, $4)
         WHERE id = $1 AND user_id = $2 AND status = $5
           AND ($4 IS NULL OR currency IS NULL OR currency = $4)"
    )
    .bind(cart_id)
    .bind(user_id)
    .bind(Timestamp::now().as_micros())
    .bind(currency.as_ref().map(Currency::as_str))
    .bind(OPEN)
    .execute(c)
    .await
    .map(|r| r.rows_affected())
    })?;
    Ok(n == 1)
}

/// Missing and other users' carts look the same: existence is not revealed.
fn not_found() -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail("no such cart")
        .into()
}

fn no_item() -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail("the cart has no such item")
        .into()
}

fn checked_out() -> ApiError {
    Problem::new(ErrorCode::InvalidState)
        .with_detail("the cart is checked out and can no longer change")
        .into()
}

fn mismatch(cart: &str, product: Currency) -> ApiError {
    Problem::new(ErrorCode::CurrencyMismatch)
        .with_detail(format!(
            "the cart is in {cart} and the product is priced in {product}"
        ))
        .with_field("product_id", format!("priced in {product}, not {cart}"))
        .into()
}

fn overflow() -> ApiError {
    Problem::new(ErrorCode::ValidationFailed)
        .with_detail("the cart's total is too large to compute")
        .into()
}
