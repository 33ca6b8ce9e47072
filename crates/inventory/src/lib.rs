//! flowline-inventory: stock levels and reservations.
//!
//! Stock is kept per product and warehouse as `on_hand` and `reserved`;
//! `available = on_hand - reserved`. A reservation holds units for an order
//! until it is confirmed (the units leave `on_hand`), released, or expires.
//! Every change is a `stock_movements` row and an event on `inventory.events`
//! committed in the same transaction.
//!
//! Correctness under contention rests on one conditional update per item —
//! `reserved = reserved + q WHERE on_hand - reserved >= q` — taken in product
//! order inside one transaction: the database's row lock decides who gets the
//! last unit, and the table's CHECK makes negative stock unrepresentable. The
//! cached "available" counter only serves reads; it never decides.

pub mod routes;

use flowline_core::{Envelope, ErrorCode, EventDraft, Problem, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_store::outbox::{self, Relay};
use flowline_store::{Db, Migration, StoreError, Tx};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const TOPIC: &str = "inventory.events";
pub const DEFAULT_WAREHOUSE: &str = "default";
/// Seed 003's reservation TTL.
pub const DEFAULT_TTL_MINUTES: i64 = 15;

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "inventory",
    version: 1,
    name: "stock, movements, reservations",
    sqlite: include_str!("../migrations/sqlite/0001_inventory.sql"),
    postgres: include_str!("../migrations/postgres/0001_inventory.sql"),
}];

/// Stock of one product in one warehouse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WarehouseStock {
    pub warehouse: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

/// A product's stock over every warehouse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StockLevel {
    pub product_id: String,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
    pub warehouses: Vec<WarehouseStock>,
}

/// `PUT /inventory/{product_id}`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    pub on_hand: i64,
    /// Defaults to `default`.
    pub warehouse: Option<String>,
    /// Why (recorded on the movement); defaults to `adjustment`.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveItem {
    pub product_id: String,
    pub quantity: i64,
    /// Defaults to `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warehouse: Option<String>,
}

/// `POST /inventory/reservations` (seed 003's reservation command).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    pub order_id: String,
    pub items: Vec<ReserveItem>,
    /// Minutes the units are held (default 15, at most 1440).
    #[serde(alias = "reservation_ttl_minutes")]
    pub ttl_minutes: Option<i64>,
    /// Seconds the units are held, instead of minutes (1 to 86400).
    pub ttl_seconds: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReservationStatus {
    Held,
    Confirmed,
    Released,
    Expired,
    /// Confirmed, then given back to stock (an order cancelled after payment).
    Returned,
}

impl ReservationStatus {
    fn as_str(self) -> &'static str {
        match self {
            ReservationStatus::Held => "HELD",
            ReservationStatus::Confirmed => "CONFIRMED",
            ReservationStatus::Released => "RELEASED",
            ReservationStatus::Expired => "EXPIRED",
            ReservationStatus::Returned => "RETURNED",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "HELD" => ReservationStatus::Held,
            "CONFIRMED" => ReservationStatus::Confirmed,
            "RELEASED" => ReservationStatus::Released,
            "EXPIRED" => ReservationStatus::Expired,
            "RETURNED" => ReservationStatus::Returned,
            other => {
                return Err(StoreError::CorruptEvent(format!(
                    "reservation status {other}"
                )))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reservation {
    pub order_id: String,
    pub status: ReservationStatus,
    pub items: Vec<ReserveItem>,
    pub expires_at: String,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Movement {
    pub id: i64,
    pub product_id: String,
    pub warehouse: String,
    /// `adjustment`, `reserved`, `confirmed`, `released`, `expired`, …
    pub reason: String,
    /// Signed change of the quantity the reason is about (on_hand for
    /// adjustments and confirmations, reserved for the others).
    pub quantity: i64,
    pub reference: String,
    pub created_at: String,
}

pub struct Inventory {
    pub db: Db,
    relay: Relay,
    /// Seed 003's `inventory:product:{id}:available`: read-side only.
    cache: flowline_cache::Cache<StockLevel>,
}

fn cache_key(product_id: &str) -> String {
    format!("inventory:product:{product_id}:available")
}

fn invalid(field: &str, msg: &str) -> ApiError {
    Problem::new(ErrorCode::ValidationFailed)
        .with_detail(format!("{field}: {msg}"))
        .with_field(field, msg)
        .into()
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.bytes().all(|b| b.is_ascii_graphic())
}

fn not_found(what: &str) -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail(format!("no such {what}"))
        .into()
}

type ReservationRow = (String, String, String, i64, i64, i64);

fn reservation(r: ReservationRow) -> Result<Reservation, StoreError> {
    Ok(Reservation {
        status: ReservationStatus::parse(&r.1)?,
        items: serde_json::from_str(&r.2)?,
        order_id: r.0,
        expires_at: Timestamp::from_micros(r.3).to_rfc3339(),
        created_at: Timestamp::from_micros(r.4).to_rfc3339(),
        updated_at: Timestamp::from_micros(r.5).to_rfc3339(),
    })
}

impl Inventory {
    /// Shares cached reads through Redis (distributed mode).
    pub fn with_l2(mut self, conn: flowline_cache::RedisConnection, key_prefix: &str) -> Self {
        self.cache = self.cache.with_l2(conn, key_prefix);
        self
    }

    pub async fn open(
        db: Db,
        relay: Relay,
        metrics: &flowline_cache::CacheMetrics,
    ) -> Result<Inventory, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        let cache = flowline_cache::Cache::new(
            "inventory",
            100_000,
            std::time::Duration::from_secs(60),
            |s: &StockLevel| vec![format!("product:{}", s.product_id)],
            metrics,
        );
        Ok(Inventory { db, relay, cache })
    }

    /// Drops a product's cached level (this node's writes, and every
    /// `inventory.events` event for other nodes' writes).
    pub async fn invalidate(&self, product_id: &str) {
        self.cache
            .invalidate_tag(&format!("product:{product_id}"))
            .await;
    }

    /// The level as cached (for display); a product never stocked reads as zero.
    pub async fn level(&self, product_id: &str) -> Result<StockLevel, ApiError> {
        let load = async { self.level_now(product_id).await.map_err(|e| e.to_string()) };
        self.cache
            .get_or_load(&cache_key(product_id), load)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "stock read failed");
                ApiError::from(Problem::new(ErrorCode::Internal))
            })
    }

    /// The level as stored now.
    pub async fn level_now(&self, product_id: &str) -> Result<StockLevel, StoreError> {
        let rows: Vec<(String, i64, i64)> = flowline_store::on_pool!(&self.db, |p| {
            sqlx::query_as(
            "SELECT warehouse, on_hand, reserved FROM stock WHERE product_id = $1 ORDER BY warehouse"
        )
        .bind(product_id)
        .fetch_all(p)
        .await
        })?;
        let warehouses: Vec<WarehouseStock> = rows
            .into_iter()
            .map(|(warehouse, on_hand, reserved)| WarehouseStock {
                warehouse,
                on_hand,
                reserved,
                available: on_hand - reserved,
            })
            .collect();
        let on_hand = warehouses.iter().map(|w| w.on_hand).sum();
        let reserved = warehouses.iter().map(|w| w.reserved).sum();
        Ok(StockLevel {
            product_id: product_id.to_owned(),
            on_hand,
            reserved,
            available: on_hand - reserved,
            warehouses,
        })
    }

    /// Sets a product's on-hand count in one warehouse. Refused below what is
    /// reserved there: reserved units belong to orders.
    pub async fn set_stock(
        &self,
        ctx: &RequestContext,
        product_id: &str,
        req: SetStock,
    ) -> Result<StockLevel, ApiError> {
        if !valid_id(product_id) {
            return Err(invalid("product_id", "1 to 100 visible ASCII characters"));
        }
        if !(0..=1_000_000_000).contains(&req.on_hand) {
            return Err(invalid("on_hand", "0 to 1000000000"));
        }
        let warehouse = req.warehouse.as_deref().unwrap_or(DEFAULT_WAREHOUSE);
        if !valid_id(warehouse) {
            return Err(invalid("warehouse", "1 to 100 visible ASCII characters"));
        }
        let reason = req.reason.as_deref().unwrap_or("adjustment");
        if reason.is_empty() || reason.len() > 50 || reason.chars().any(char::is_control) {
            return Err(invalid("reason", "1 to 50 characters"));
        }
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        // Create the row if missing, then lock it (a no-op update takes the
        // row lock on PostgreSQL; SQLite's write transaction already excludes
        // others), so the count and reservations read below stay true until commit.
        flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO stock (product_id, warehouse, on_hand, reserved, version, updated_at)
             VALUES ($1, $2, 0, 0, 0, $3) ON CONFLICT (product_id, warehouse) DO NOTHING"
        )
        .bind(product_id)
        .bind(warehouse)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE stock SET version = version WHERE product_id = $1 AND warehouse = $2"
        )
        .bind(product_id)
        .bind(warehouse)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        let before: Option<(i64, i64)> = flowline_store::on_tx!(&mut tx, |c| sqlx::query_as(
            "SELECT on_hand, reserved FROM stock WHERE product_id = $1 AND warehouse = $2"
        )
        .bind(product_id)
        .bind(warehouse)
        .fetch_optional(c)
        .await)
        .map_err(StoreError::from)?;
        let (old, reserved) = before.unwrap_or((0, 0));
        if req.on_hand < reserved {
            return Err(Problem::new(ErrorCode::Conflict)
                .with_detail(format!(
                    "{reserved} units are reserved in {warehouse}; on_hand cannot go below that"
                ))
                .with_field("on_hand", format!("at least {reserved}"))
                .into());
        }
        flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE stock SET on_hand = $3, version = version + 1, updated_at = $4
             WHERE product_id = $1 AND warehouse = $2"
        )
        .bind(product_id)
        .bind(warehouse)
        .bind(req.on_hand)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        let delta = req.on_hand - old;
        movement(
            &mut tx,
            product_id,
            warehouse,
            reason,
            delta,
            &ctx.request_id,
            now,
        )
        .await?;
        self.emit(
            &mut tx,
            ctx,
            "inventory.stock_adjusted",
            product_id,
            serde_json::json!({ "product_id": product_id, "warehouse": warehouse, "on_hand": req.on_hand,
                "reserved": reserved, "available": req.on_hand - reserved, "delta": delta, "reason": reason }),
        )
        .await?;
        if delta != 0 {
            self.stock_changed(&mut tx, ctx, &[product_id]).await?;
        }
        tx.commit().await?;
        self.after_commit(&[product_id]).await;
        Ok(self.level_now(product_id).await?)
    }

    /// Holds every item for `order_id`, or none. `Ok((r, false))` when the
    /// order already had this reservation (a retried command).
    pub async fn reserve(
        &self,
        ctx: &RequestContext,
        req: ReserveRequest,
    ) -> Result<(Reservation, bool), ApiError> {
        let (items, ttl) = validate_reserve(&req)?;
        let now = Timestamp::now();
        let expires = Timestamp::from_micros(now.as_micros() + ttl * 1_000_000);
        let mut tx = self.db.begin().await?;
        let items_json = serde_json::to_string(&items).map_err(StoreError::from)?;
        let inserted = flowline_store::on_tx!(&mut tx, |c| {
            sqlx::query(
            "INSERT INTO reservations (order_id, status, items, expires_at, created_at, updated_at)
             VALUES ($1, 'HELD', $2, $3, $4, $4) ON CONFLICT (order_id) DO NOTHING"
        )
        .bind(&req.order_id)
        .bind(&items_json)
        .bind(expires.as_micros())
        .bind(now.as_micros())
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        })
        .map_err(StoreError::from)?;
        if inserted == 0 {
            tx.rollback().await?;
            let existing = self.reservation(&req.order_id).await?;
            if !matches!(
                existing.status,
                ReservationStatus::Held | ReservationStatus::Confirmed
            ) {
                return Err(wrong_state(&req.order_id, existing.status));
            }
            if existing.items != items {
                return Err(Problem::new(ErrorCode::Conflict)
                    .with_detail("this order already holds a reservation with other items")
                    .with_field("order_id", "already reserved with other items")
                    .into());
            }
            return match existing.status {
                ReservationStatus::Held | ReservationStatus::Confirmed => Ok((existing, false)),
                s => Err(wrong_state(&req.order_id, s)),
            };
        }
        // Items are sorted by (warehouse, product): concurrent reservations lock
        // rows in one order and cannot deadlock.
        let mut short = Vec::new();
        for it in &items {
            let wh = it.warehouse.as_deref().unwrap_or(DEFAULT_WAREHOUSE);
            let n = flowline_store::on_tx!(&mut tx, |c| {
                sqlx::query(
                "UPDATE stock SET reserved = reserved + $3, version = version + 1, updated_at = $4
                 WHERE product_id = $1 AND warehouse = $2 AND on_hand - reserved >= $3"
            )
            .bind(&it.product_id)
            .bind(wh)
            .bind(it.quantity)
            .bind(now.as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected())
            })
            .map_err(StoreError::from)?;
            if n == 0 {
                short.push(it);
            }
        }
        if !short.is_empty() {
            tx.rollback().await?;
            let mut p = Problem::new(ErrorCode::InsufficientStock).with_detail(format!(
                "not enough stock for {} of {} items; nothing was reserved",
                short.len(),
                items.len()
            ));
            for it in short {
                p = p.with_field(
                    format!("items.{}", it.product_id),
                    format!("{} requested, not available", it.quantity),
                );
            }
            return Err(p.into());
        }
        for it in &items {
            let wh = it.warehouse.as_deref().unwrap_or(DEFAULT_WAREHOUSE);
            movement(
                &mut tx,
                &it.product_id,
                wh,
                "reserved",
                it.quantity,
                &req.order_id,
                now.as_micros(),
            )
            .await?;
        }
        let r = Reservation {
            order_id: req.order_id.clone(),
            status: ReservationStatus::Held,
            items,
            expires_at: expires.to_rfc3339(),
            created_at: now.to_rfc3339(),
            updated_at: now.to_rfc3339(),
        };
        self.emit(
            &mut tx,
            ctx,
            "inventory.reserved",
            &r.order_id,
            serde_json::json!(r),
        )
        .await?;
        let products = product_ids(&r.items);
        self.stock_changed(&mut tx, ctx, &products).await?;
        tx.commit().await?;
        self.after_commit(&products).await;
        Ok((r, true))
    }

    pub async fn reservation(&self, order_id: &str) -> Result<Reservation, ApiError> {
        let row: Option<ReservationRow> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT order_id, status, items, expires_at, created_at, updated_at
             FROM reservations WHERE order_id = $1"
        )
        .bind(order_id)
        .fetch_optional(p)
        .await)
        .map_err(StoreError::from)?;
        Ok(reservation(row.ok_or_else(|| not_found("reservation"))?)?)
    }

    /// Turns a held reservation into a stock deduction. Confirming twice is a
    /// no-op; a released or expired reservation cannot be confirmed.
    pub async fn confirm(
        &self,
        ctx: &RequestContext,
        order_id: &str,
    ) -> Result<Reservation, ApiError> {
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let Some(r) = self
            .take_held(&mut tx, order_id, ReservationStatus::Confirmed, Some(now))
            .await?
        else {
            tx.rollback().await?;
            let r = self.reservation(order_id).await?;
            return match r.status {
                ReservationStatus::Confirmed => Ok(r),
                ReservationStatus::Held => {
                    // Past its TTL but not swept yet: expire it now, then refuse.
                    self.finish(ctx, order_id, ReservationStatus::Expired)
                        .await?;
                    Err(wrong_state(order_id, ReservationStatus::Expired))
                }
                s => Err(wrong_state(order_id, s)),
            };
        };
        take_back(&mut tx, &r.items, true, "confirmed", order_id, now).await?;
        self.emit(
            &mut tx,
            ctx,
            "inventory.reservation_confirmed",
            order_id,
            serde_json::json!(r),
        )
        .await?;
        tx.commit().await?;
        let products = product_ids(&r.items);
        self.after_commit(&products).await;
        Ok(r)
    }

    /// Returns a held reservation's units. Releasing twice (or after expiry)
    /// is a no-op; a confirmed reservation is not released (the goods are sold).
    ///
    /// Releasing an order that holds nothing records an empty RELEASED
    /// reservation: a compensation may run before its reserve command lands
    /// (a timed-out step), and that late command must then hold nothing.
    pub async fn release(
        &self,
        ctx: &RequestContext,
        order_id: &str,
    ) -> Result<Reservation, ApiError> {
        if let Some(r) = self
            .finish(ctx, order_id, ReservationStatus::Released)
            .await?
        {
            return Ok(r);
        }
        let now = Timestamp::now().as_micros();
        flowline_store::on_pool!(write & self.db, |p| sqlx::query(
            "INSERT INTO reservations (order_id, status, items, expires_at, created_at, updated_at)
             VALUES ($1, 'RELEASED', '[]', $2, $2, $2) ON CONFLICT (order_id) DO NOTHING"
        )
        .bind(order_id)
        .bind(now)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        let r = self.reservation(order_id).await?;
        match r.status {
            // Returned: sold, then given back; nothing is held any more.
            ReservationStatus::Released
            | ReservationStatus::Expired
            | ReservationStatus::Returned => Ok(r),
            // Held again only if the TTL passed meanwhile: finish it as expired.
            ReservationStatus::Held => {
                self.finish(ctx, order_id, ReservationStatus::Expired)
                    .await?;
                self.reservation(order_id).await
            }
            s => Err(wrong_state(order_id, s)),
        }
    }

    /// Puts a confirmed reservation's units back on hand (an order cancelled
    /// after it was paid, before it shipped). Twice is a no-op; anything
    /// never confirmed has nothing to return and is released instead.
    pub async fn return_stock(
        &self,
        ctx: &RequestContext,
        order_id: &str,
    ) -> Result<Reservation, ApiError> {
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let row: Option<ReservationRow> = flowline_store::on_tx!(&mut tx, |c| sqlx::query_as(
            "UPDATE reservations SET status = 'RETURNED', updated_at = $2
             WHERE order_id = $1 AND status = 'CONFIRMED'
             RETURNING order_id, status, items, expires_at, created_at, updated_at"
        )
        .bind(order_id)
        .bind(now)
        .fetch_optional(c)
        .await)
        .map_err(StoreError::from)?;
        let Some(r) = row.map(reservation).transpose()? else {
            tx.rollback().await?;
            return match self.reservation(order_id).await {
                Ok(r) if r.status == ReservationStatus::Returned => Ok(r),
                Ok(r) if r.status == ReservationStatus::Confirmed => {
                    Err(Problem::new(ErrorCode::Conflict)
                        .with_detail("the reservation changed meanwhile; retry")
                        .into())
                }
                _ => self.release(ctx, order_id).await,
            };
        };
        for it in &r.items {
            let wh = it.warehouse.as_deref().unwrap_or(DEFAULT_WAREHOUSE);
            flowline_store::on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE stock SET on_hand = on_hand + $3, version = version + 1, updated_at = $4
                 WHERE product_id = $1 AND warehouse = $2"
            )
            .bind(&it.product_id)
            .bind(wh)
            .bind(it.quantity)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?;
            movement(
                &mut tx,
                &it.product_id,
                wh,
                "returned",
                it.quantity,
                order_id,
                now,
            )
            .await?;
        }
        self.emit(
            &mut tx,
            ctx,
            "inventory.reservation_returned",
            order_id,
            serde_json::json!(r),
        )
        .await?;
        let products = product_ids(&r.items);
        self.stock_changed(&mut tx, ctx, &products).await?;
        tx.commit().await?;
        self.after_commit(&products).await;
        Ok(r)
    }

    /// Releases every held reservation past its TTL; returns how many.
    pub async fn expire_due(&self) -> Result<usize, ApiError> {
        let now = Timestamp::now().as_micros();
        let due: Vec<String> = flowline_store::on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT order_id FROM reservations
             WHERE status = 'HELD' AND expires_at < $1 ORDER BY expires_at LIMIT 500"
        )
        .bind(now)
        .fetch_all(p)
        .await)
        .map_err(StoreError::from)?;
        let mut n = 0;
        for order_id in due {
            let ctx = RequestContext::detached();
            match self
                .finish(&ctx, &order_id, ReservationStatus::Expired)
                .await
            {
                Ok(Some(_)) => n += 1,
                Ok(None) => {}
                // One bad reservation must not hold up the others.
                Err(e) => {
                    tracing::warn!(%order_id, code = %e.0.code, "cannot expire a reservation")
                }
            }
        }
        Ok(n)
    }

    /// Moves a HELD reservation to `to` (released or expired) and returns its
    /// units; `None` if it was not held (someone else finished it first).
    async fn finish(
        &self,
        ctx: &RequestContext,
        order_id: &str,
        to: ReservationStatus,
    ) -> Result<Option<Reservation>, ApiError> {
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let Some(r) = self.take_held(&mut tx, order_id, to, None).await? else {
            tx.rollback().await?;
            return Ok(None);
        };
        let reason = match to {
            ReservationStatus::Expired => "expired",
            _ => "released",
        };
        take_back(&mut tx, &r.items, false, reason, order_id, now).await?;
        let kind = match to {
            ReservationStatus::Expired => "inventory.reservation_expired",
            _ => "inventory.reservation_released",
        };
        self.emit(&mut tx, ctx, kind, order_id, serde_json::json!(r))
            .await?;
        let products = product_ids(&r.items);
        self.stock_changed(&mut tx, ctx, &products).await?;
        tx.commit().await?;
        self.after_commit(&products).await;
        Ok(Some(r))
    }

    /// Compare-and-set HELD → `to`; with `unexpired_at`, only if the TTL has
    /// not passed. Returns the reservation as it now is.
    async fn take_held(
        &self,
        tx: &mut Tx,
        order_id: &str,
        to: ReservationStatus,
        unexpired_at: Option<i64>,
    ) -> Result<Option<Reservation>, ApiError> {
        let now = Timestamp::now().as_micros();
        let row: Option<ReservationRow> = flowline_store::on_tx!(tx, |c| sqlx::query_as(
            "UPDATE reservations SET status = $2, updated_at = $3
             WHERE order_id = $1 AND status = 'HELD' AND expires_at >= $4
             RETURNING order_id, status, items, expires_at, created_at, updated_at"
        )
        .bind(order_id)
        .bind(to.as_str())
        .bind(now)
        .bind(unexpired_at.unwrap_or(i64::MIN))
        .fetch_optional(c)
        .await)
        .map_err(StoreError::from)?;
        Ok(row.map(reservation).transpose()?)
    }

    /// The product's movements, newest first.
    pub async fn movements(&self, product_id: &str, limit: i64) -> Result<Vec<Movement>, ApiError> {
        let rows: Vec<(i64, String, String, String, i64, String, i64)> =
            flowline_store::on_pool!(&self.db, |p| sqlx::query_as(
                "SELECT id, product_id, warehouse, reason, quantity, reference, created_at
                 FROM stock_movements WHERE product_id = $1 ORDER BY id DESC LIMIT $2"
            )
            .bind(product_id)
            .bind(limit)
            .fetch_all(p)
            .await)
            .map_err(StoreError::from)?;
        Ok(rows
            .into_iter()
            .map(|r| Movement {
                id: r.0,
                product_id: r.1,
                warehouse: r.2,
                reason: r.3,
                quantity: r.4,
                reference: r.5,
                created_at: Timestamp::from_micros(r.6).to_rfc3339(),
            })
            .collect())
    }

    async fn emit(
        &self,
        tx: &mut Tx,
        ctx: &RequestContext,
        kind: &str,
        key: &str,
        payload: serde_json::Value,
    ) -> Result<(), StoreError> {
        let ev = Envelope::stamp(
            EventDraft::new(TOPIC, kind, key, payload),
            &ctx.correlation_id,
            Some(&ctx.request_id),
        );
        outbox::enqueue(tx, &ev).await
    }

    /// `product.stock_changed` with each product's total availability as of
    /// this transaction, so the catalog's `in_stock` follows.
    async fn stock_changed(
        &self,
        tx: &mut Tx,
        ctx: &RequestContext,
        products: &[&str],
    ) -> Result<(), StoreError> {
        for p in products {
            let available: Option<i64> = flowline_store::on_tx!(&mut *tx, |c| {
                sqlx::query_scalar(
                "SELECT CAST(SUM(on_hand - reserved) AS BIGINT) FROM stock WHERE product_id = $1"
            )
            .bind(p)
            .fetch_one(c)
            .await
            })?;
            let available = available.unwrap_or(0);
            self.emit(
                tx,
                ctx,
                "product.stock_changed",
                p,
                serde_json::json!({ "product_id": p, "available": available, "in_stock": available > 0 }),
            )
            .await?;
        }
        Ok(())
    }

    async fn after_commit(&self, products: &[&str]) {
        for p in products {
            self.invalidate(p).await;
        }
        self.relay.notify();
    }
}

fn product_ids(items: &[ReserveItem]) -> Vec<&str> {
    let mut v: Vec<&str> = items.iter().map(|i| i.product_id.as_str()).collect();
    v.sort_unstable();
    v.dedup();
    v
}

fn wrong_state(order_id: &str, s: ReservationStatus) -> ApiError {
    Problem::new(ErrorCode::InvalidState)
        .with_detail(format!(
            "reservation for order {order_id} is {}",
            s.as_str()
        ))
        .into()
}

/// Ends a hold on `items`: the units leave `reserved`, and with `deduct`
/// leave `on_hand` too (a sale); each item gets its movement.
async fn take_back(
    tx: &mut Tx,
    items: &[ReserveItem],
    deduct: bool,
    reason: &str,
    order_id: &str,
    now: i64,
) -> Result<(), StoreError> {
    for it in items {
        let wh = it.warehouse.as_deref().unwrap_or(DEFAULT_WAREHOUSE);
        flowline_store::on_tx!(&mut *tx, |c| sqlx::query(
            "UPDATE stock SET on_hand = on_hand - $4, reserved = reserved - $3,
                version = version + 1, updated_at = $5
             WHERE product_id = $1 AND warehouse = $2"
        )
        .bind(&it.product_id)
        .bind(wh)
        .bind(it.quantity)
        .bind(if deduct { it.quantity } else { 0 })
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        movement(tx, &it.product_id, wh, reason, -it.quantity, order_id, now).await?;
    }
    Ok(())
}

async fn movement(
    tx: &mut Tx,
    product_id: &str,
    warehouse: &str,
    reason: &str,
    quantity: i64,
    reference: &str,
    at: i64,
) -> Result<(), StoreError> {
    flowline_store::on_tx!(tx, |c| {
        sqlx::query(
        "INSERT INTO stock_movements (product_id, warehouse, reason, quantity, reference, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)"
    )
    .bind(product_id)
    .bind(warehouse)
    .bind(reason)
    .bind(quantity)
    .bind(reference)
    .bind(at)
    .execute(c)
    .await
    .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Checks a reservation request; returns its items merged per product and
/// warehouse in lock order, and the TTL in seconds.
fn validate_reserve(req: &ReserveRequest) -> Result<(Vec<ReserveItem>, i64), ApiError> {
    let mut errors: Vec<(String, &str)> = Vec::new();
    let id_msg = "1 to 100 visible ASCII characters";
    if !valid_id(&req.order_id) {
        errors.push(("order_id".into(), id_msg));
    }
    if req.items.is_empty() || req.items.len() > 100 {
        errors.push(("items".into(), "1 to 100 items"));
    }
    let mut merged: BTreeMap<(String, String), i64> = BTreeMap::new();
    for (i, it) in req.items.iter().enumerate() {
        if !valid_id(&it.product_id) {
            errors.push((format!("items[{i}].product_id"), id_msg));
        }
        if !(1..=10_000).contains(&it.quantity) {
            errors.push((format!("items[{i}].quantity"), "1 to 10000"));
        }
        let wh = it
            .warehouse
            .clone()
            .unwrap_or_else(|| DEFAULT_WAREHOUSE.to_owned());
        if !valid_id(&wh) {
            errors.push((format!("items[{i}].warehouse"), id_msg));
        }
        *merged.entry((wh, it.product_id.clone())).or_default() += it.quantity.clamp(0, 10_000);
    }
    let ttl = match (req.ttl_minutes, req.ttl_seconds) {
        (Some(_), Some(_)) => {
            errors.push((
                "ttl_seconds".into(),
                "give ttl_minutes or ttl_seconds, not both",
            ));
            0
        }
        (None, Some(s)) if !(1..=86_400).contains(&s) => {
            errors.push(("ttl_seconds".into(), "1 to 86400"));
            0
        }
        (None, Some(s)) => s,
        (Some(m), None) if !(1..=1440).contains(&m) => {
            errors.push(("ttl_minutes".into(), "1 to 1440"));
            0
        }
        (m, None) => m.unwrap_or(DEFAULT_TTL_MINUTES) * 60,
    };
    if !errors.is_empty() {
        let mut p =
            Problem::new(ErrorCode::ValidationFailed).with_detail("the reservation is not valid");
        for (f, m) in errors {
            p = p.with_field(f, m);
        }
        return Err(p.into());
    }
    let items = merged
        .into_iter()
        .map(|((wh, product_id), quantity)| ReserveItem {
            product_id,
            quantity,
            warehouse: (wh != DEFAULT_WAREHOUSE).then_some(wh),
        })
        .collect();
    Ok((items, ttl))
}
