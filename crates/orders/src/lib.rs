//! Orders context: orders placed by a durable saga, kept as events.
//!
//! - `place` validates, closes the cart (keyed by the Idempotency-Key, so a
//!   retry closes nothing twice), then in one transaction takes the next
//!   number, appends CREATED, writes the projection and starts the
//!   `order.place` saga. The saga's hooks append the order's events in the
//!   saga's own transactions.
//! - `order_events` is the source of truth (append-only, versioned per
//!   order); `orders` is a projection written with every append and
//!   rebuilt by replay; `as_of` folds the events up to a time.
//! - Output is enriched from read models fed by `user.events` and
//!   `catalog.events`, never from other contexts' tables.

pub mod failpoints;
pub mod model;
pub mod ports;
pub mod routes;
mod saga;
pub mod store;

pub use failpoints::Failpoints;
pub use model::{OrderEvent, OrderLine, OrderState, OrderStatus, PaymentInput, ShipTo};
pub use ports::{Charge, ChargeOutcome, CheckedOutCart, Ports, ShipmentRef, ShipmentRequest};
pub use saga::{CANCEL as CANCEL_SAGA, PLACE as PLACE_SAGA, TOPIC};

use flowline_core::{Envelope, ErrorCode, Problem, RecordedEvent, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_saga::{Orchestrator, SagaOptions};
use flowline_store::outbox::{self, Relay};
use flowline_store::{inbox, on_pool, Db, Handler, HandlerError, Migration, StoreError};
use model::{kind, Created};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};
use store::AppendError;
use tokio::sync::watch;

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "orders",
    version: 1,
    name: "order events, projection, numbers, read models",
    sqlite: include_str!("../migrations/sqlite/0001_orders.sql"),
    postgres: include_str!("../migrations/postgres/0001_orders.sql"),
}];

/// Consumer group that keeps the read models and follows shipments.
pub const FOLLOWER_GROUP: &str = "orders.follower";
pub const FOLLOWED_TOPICS: [&str; 3] = ["user.events", "catalog.events", "shipping.events"];

#[derive(Debug, Clone)]
pub struct OrdersConfig {
    /// How long reserved stock is held for an unpaid order.
    pub reservation_ttl_minutes: i64,
    pub saga: SagaOptions,
    pub failpoints: Failpoints,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        OrdersConfig {
            reservation_ttl_minutes: 15,
            saga: SagaOptions::default(),
            failpoints: Failpoints::default(),
        }
    }
}

/// `POST /orders` (seed 003's request).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    pub cart_id: String,
    pub shipping_address_id: String,
    pub payment: PaymentInput,
}

/// The answer to `POST /orders`: the order is being placed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Placed {
    pub id: String,
    /// `FL-2026-000123`.
    pub number: String,
    pub status: OrderStatus,
    /// Where to follow it.
    pub location: String,
    pub events: String,
}

/// An order as the API shows it, enriched with names from read models.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OrderView {
    pub id: String,
    pub number: String,
    pub status: OrderStatus,
    pub user: UserRef,
    pub items: Vec<ItemView>,
    pub item_count: i64,
    pub total: MoneyView,
    pub shipping_address: ShipTo,
    pub payment: PaymentView,
    pub shipment: Option<ShipmentView>,
    /// Why it was cancelled, in words for the customer.
    pub cancel_reason: Option<String>,
    /// A cancellation is being carried out.
    pub cancel_requested: bool,
    /// Why the last cancellation request was refused.
    pub cancellation_refused: Option<String>,
    /// The stream version this view folds up to.
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UserRef {
    pub id: String,
    /// Null until the user's profile reached the orders read model.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ItemView {
    pub product_id: String,
    /// The catalog's current title (the title at checkout if it is gone).
    pub name: String,
    pub brand: Option<String>,
    pub category: Option<String>,
    pub quantity: i64,
    pub unit_price: MoneyView,
    pub line_total: MoneyView,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MoneyView {
    /// Minor units.
    pub amount: i64,
    pub currency: String,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PaymentView {
    pub method: String,
    pub payment_id: Option<String>,
    pub paid: i64,
    pub refunded: i64,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ShipmentView {
    pub id: Option<String>,
    pub tracking_number: Option<String>,
}

/// A row of `GET /orders`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct OrderSummary {
    pub id: String,
    pub number: String,
    pub status: OrderStatus,
    pub total: MoneyView,
    pub item_count: i64,
    pub created_at: String,
    pub updated_at: String,
}

pub struct Orders {
    pub db: Db,
    relay: Relay,
    env: Arc<saga::Env>,
    orch: Arc<Orchestrator>,
}

impl Orders {
    pub async fn open(
        db: Db,
        relay: Relay,
        ports: Arc<dyn Ports>,
        cfg: OrdersConfig,
    ) -> Result<Arc<Orders>, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        let (changed, _) = watch::channel(0u64);
        let env = Arc::new(saga::Env {
            db: db.clone(),
            ports,
            faults: cfg.failpoints,
            ttl_minutes: cfg.reservation_ttl_minutes,
            orch: OnceLock::new(),
            changed,
        });
        let defs = vec![saga::place_def(&env), saga::cancel_def(&env)];
        let orch = Arc::new(Orchestrator::new(db.clone(), relay.clone(), defs, cfg.saga).await?);
        let _ = env.orch.set(Arc::downgrade(&orch));
        Ok(Arc::new(Orders {
            db,
            relay,
            env,
            orch,
        }))
    }

    /// The saga orchestrator: the server runs it and serves its inspection API.
    pub fn orchestrator(&self) -> &Arc<Orchestrator> {
        &self.orch
    }

    /// Changes whenever an order stream grows in this process.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.env.changed.subscribe()
    }

    /// Places an order. `Ok((placed, true))` when this key placed it before
    /// (a retried request): nothing new happens.
    pub async fn place(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        key: Option<&str>,
        req: PlaceOrder,
    ) -> Result<(Placed, bool), ApiError> {
        let key = idempotency_key(key)?;
        let req = validate(req)?;
        let hash = request_hash(&req);
        // The key is bound to this request before the cart is touched, so a
        // concurrent request under it with another body closes no cart.
        let order_id = match self.claim(user_id, key, &hash).await? {
            Claim::Placed(p) => return Ok((p, true)),
            Claim::Mine(order_id) => order_id,
        };
        let checked = self.check_and_checkout(ctx, user_id, key, &req).await;
        let (address, cart) = match checked {
            Ok(v) => v,
            Err(e) => {
                // Refused: the key keeps nothing, so a corrected retry runs.
                if e.0.status < 500 {
                    self.unclaim(user_id, key, &order_id).await?;
                }
                return Err(e);
            }
        };
        let total: i64 = cart.lines.iter().map(|l| l.unit_price * l.quantity).sum();
        let now = Timestamp::now();

        let mut tx = self.db.begin().await?;
        let n = store::next_number(&mut tx, now.year_month().0).await?;
        let number = model::order_number(now.year_month().0, n);
        let created = Created {
            order_id: order_id.clone(),
            number: number.clone(),
            user_id: user_id.to_owned(),
            cart_id: req.cart_id.clone(),
            currency: cart.currency.clone(),
            total,
            items: cart.lines.clone(),
            shipping_address: address.clone(),
            payment_method: req.payment.method.clone(),
        };
        let mut data = serde_json::to_value(&created).map_err(StoreError::from)?;
        data["correlation_id"] = json!(ctx.correlation_id);
        let state = match store::append(&mut tx, &order_id, Some(0), &[(kind::CREATED, data)]).await
        {
            Ok(s) => s,
            Err(AppendError::Conflict { .. }) => {
                // A concurrent request with this key and body placed it first.
                tx.rollback().await?;
                return match self.placed_with(user_id, key, &hash).await? {
                    Some(p) => Ok((p, true)),
                    None => Err(Problem::new(ErrorCode::IdempotencyKeyInProgress).into()),
                };
            }
            Err(e) => return Err(StoreError::from(e).into()),
        };
        let saga_data = saga::SagaData {
            order_id: order_id.clone(),
            number: number.clone(),
            user_id: user_id.to_owned(),
            currency: cart.currency,
            total,
            items: cart.lines,
            shipping_address: address,
            payment: req.payment,
            correlation_id: ctx.correlation_id.clone(),
        };
        self.orch
            .start(
                &mut tx,
                saga::PLACE,
                &order_id,
                serde_json::to_value(&saga_data).map_err(StoreError::from)?,
            )
            .await?;
        saga::emit(
            &mut tx,
            &ctx.correlation_id,
            "order.created",
            &state,
            json!({}),
        )
        .await?;
        tx.commit().await?;
        self.orch.wake();
        self.relay.notify();
        self.env.touched();
        Ok((placed(&order_id, &number, OrderStatus::Pending), false))
    }

    /// Binds `key` to this request (or finds what it is bound to).
    async fn claim(&self, user_id: &str, key: &str, hash: &str) -> Result<Claim, ApiError> {
        let fresh = flowline_core::id::new_id().to_string();
        on_pool!(write &self.db, |p| sqlx::query(
            "INSERT INTO order_requests (user_id, idempotency_key, request_hash, order_id, created_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, idempotency_key) DO NOTHING"
        )
        .bind(user_id)
        .bind(key)
        .bind(hash)
        .bind(&fresh)
        .bind(Timestamp::now().as_micros())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        match self.placed_with(user_id, key, hash).await? {
            Some(p) => Ok(Claim::Placed(p)),
            None => {
                let id: Option<String> = on_pool!(write &self.db, |p| sqlx::query_scalar(
                    "SELECT order_id FROM order_requests WHERE user_id = $1 AND idempotency_key = $2"
                )
                .bind(user_id)
                .bind(key)
                .fetch_optional(p)
                .await)
                .map_err(StoreError::from)?;
                // Gone only if a refused attempt just released it: start afresh.
                Ok(Claim::Mine(id.unwrap_or(fresh)))
            }
        }
    }

    /// Releases a claim whose request was refused (no order was made).
    async fn unclaim(&self, user_id: &str, key: &str, order_id: &str) -> Result<(), ApiError> {
        on_pool!(write &self.db, |p| sqlx::query(
            "DELETE FROM order_requests WHERE user_id = $1 AND idempotency_key = $2 AND order_id = $3
               AND NOT EXISTS (SELECT 1 FROM orders WHERE id = $3)"
        )
        .bind(user_id)
        .bind(key)
        .bind(order_id)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        Ok(())
    }

    /// The instrument, the address and the cart, checked in that order (the
    /// cart is closed last, once nothing else can refuse the order).
    async fn check_and_checkout(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        key: &str,
        req: &PlaceOrder,
    ) -> Result<(ShipTo, CheckedOutCart), ApiError> {
        let pay = &req.payment;
        self.env
            .ports
            .check_payment(user_id, pay.card_token.as_deref(), pay.vpa.as_deref())
            .await
            .map_err(|e| prefixed(e, "payment."))?;
        let address = self
            .env
            .ports
            .address(user_id, &req.shipping_address_id)
            .await
            .map_err(|e| as_field(e, "shipping_address_id", "no such address of yours"))?;
        let cart = self
            .env
            .ports
            .checkout(ctx, user_id, &req.cart_id, key)
            .await
            .map_err(|e| as_field(e, "cart_id", "no such cart of yours"))?;
        Ok((address, cart))
    }

    /// The order `key` placed, if it did; 422 if the key is bound to another request.
    async fn placed_with(
        &self,
        user_id: &str,
        key: &str,
        hash: &str,
    ) -> Result<Option<Placed>, ApiError> {
        let row: Option<(String, String)> = on_pool!(write & self.db, |p| sqlx::query_as(
            "SELECT request_hash, order_id FROM order_requests
             WHERE user_id = $1 AND idempotency_key = $2"
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(p)
        .await)
        .map_err(StoreError::from)?;
        let Some((h, order_id)) = row else {
            return Ok(None);
        };
        if h != hash {
            return Err(Problem::new(ErrorCode::IdempotencyKeyReused)
                .with_detail(
                    "this Idempotency-Key already placed an order with a different request",
                )
                .into());
        }
        let events = store::load(&self.db, &order_id).await?;
        Ok(OrderState::replay(&events).map(|s| placed(&s.id, &s.number, s.status)))
    }

    /// The order's state now (from the projection), or at `as_of` (by replay).
    pub async fn state(
        &self,
        order_id: &str,
        as_of: Option<Timestamp>,
    ) -> Result<OrderState, ApiError> {
        let s = match as_of {
            None => store::projected(&self.db, order_id).await?,
            Some(t) => {
                let events = store::load(&self.db, order_id).await?;
                let upto: Vec<&OrderEvent> = events
                    .iter()
                    .filter(|e| e.occurred_us <= t.as_micros())
                    .collect();
                OrderState::replay(upto)
            }
        };
        s.ok_or_else(not_found)
    }

    /// The order if `user_id` owns it (or `admin`); 404 otherwise, so ids
    /// of others' orders are not confirmed.
    pub async fn get(
        &self,
        user_id: &str,
        admin: bool,
        order_id: &str,
        as_of: Option<Timestamp>,
    ) -> Result<OrderView, ApiError> {
        let owner = self.state(order_id, None).await?;
        if owner.user_id != user_id && !admin {
            return Err(not_found());
        }
        let s = match as_of {
            None => owner,
            Some(_) => match self.state(order_id, as_of).await {
                Err(e) if e.0.status == 404 => {
                    return Err(Problem::new(ErrorCode::NotFound)
                        .with_detail("the order did not exist yet at `as_of`")
                        .into())
                }
                r => r?,
            },
        };
        self.enrich(s).await
    }

    /// The order's events, oldest first.
    pub async fn history(
        &self,
        user_id: &str,
        admin: bool,
        order_id: &str,
    ) -> Result<Vec<OrderEvent>, ApiError> {
        let s = self.state(order_id, None).await?;
        if s.user_id != user_id && !admin {
            return Err(not_found());
        }
        let mut events = store::load(&self.db, order_id).await?;
        events.iter_mut().for_each(scrub);
        Ok(events)
    }

    /// Events after `version`, for live followers (already authorized);
    /// not scrubbed (see [`scrub`]).
    pub async fn events_after(
        &self,
        order_id: &str,
        version: i64,
    ) -> Result<Vec<OrderEvent>, ApiError> {
        Ok(store::load_after(&self.db, order_id, version).await?)
    }

    /// Orders from the projection, newest first: one user's, or everyone's.
    pub async fn list(
        &self,
        user_id: Option<&str>,
        status: Option<OrderStatus>,
        limit: i64,
        before: Option<(i64, String)>,
    ) -> Result<(Vec<OrderSummary>, Option<String>), ApiError> {
        let (before_at, before_id) = before.unwrap_or((i64::MAX, String::new()));
        let rows: Vec<SummaryRow> = on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT id, number, status, currency, total, item_count, created_at, updated_at
                 FROM orders
                 WHERE ($1 IS NULL OR user_id = $1) AND ($2 IS NULL OR status = $2)
                   AND (created_at < $3 OR (created_at = $3 AND id < $4))
                 ORDER BY created_at DESC, id DESC LIMIT $5"
        )
        .bind(user_id)
        .bind(status.map(OrderStatus::as_str))
        .bind(before_at)
        .bind(&before_id)
        .bind(limit + 1)
        .fetch_all(p)
        .await)
        .map_err(StoreError::from)?;
        let more = rows.len() as i64 > limit;
        let next = match (more, rows.get(limit as usize - 1)) {
            (true, Some(last)) => Some(format!("{}_{}", last.6, last.0)),
            _ => None,
        };
        let items: Vec<OrderSummary> = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| OrderSummary {
                status: OrderStatus::parse(&r.2).unwrap_or(OrderStatus::Pending),
                total: MoneyView {
                    amount: r.4,
                    currency: r.3,
                },
                item_count: r.5,
                created_at: Timestamp::from_micros(r.6).to_rfc3339(),
                updated_at: Timestamp::from_micros(r.7).to_rfc3339(),
                id: r.0,
                number: r.1,
            })
            .collect();
        Ok((items, next))
    }

    /// The customer's cancellation: before the courier has the parcel.
    /// While the order is being placed the saga stops at its next step and
    /// compensates; a confirmed order runs the `order.cancel` saga.
    pub async fn cancel(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        order_id: &str,
    ) -> Result<OrderView, ApiError> {
        for _ in 0..3 {
            let s = self.state(order_id, None).await?;
            if s.user_id != user_id {
                return Err(not_found());
            }
            if s.cancel_requested {
                return self.enrich(s).await;
            }
            if !s.cancellable() {
                return Err(Problem::new(ErrorCode::InvalidState)
                    .with_detail(format!(
                        "the order is {} and can no longer be cancelled",
                        s.status.as_str()
                    ))
                    .into());
            }
            let mut tx = self.db.begin().await?;
            let appended = store::append(
                &mut tx,
                order_id,
                Some(s.version),
                &[(kind::CANCEL_REQUESTED, json!({ "by": user_id }))],
            )
            .await;
            let next = match appended {
                Ok(next) => next,
                Err(AppendError::Conflict { .. }) => {
                    tx.rollback().await?;
                    continue;
                }
                Err(e) => return Err(StoreError::from(e).into()),
            };
            if next.status == OrderStatus::Confirmed {
                saga::start_cancel(&self.env, &mut tx, &next, &ctx.correlation_id).await?;
            }
            // PENDING or PAID: the place saga sees the request at its next
            // step; if it finishes first, its last hook starts the cancel saga.
            tx.commit().await?;
            self.orch.wake();
            self.env.touched();
            return self.enrich(next).await;
        }
        Err(Problem::new(ErrorCode::Conflict)
            .with_detail("the order changed meanwhile; retry")
            .into())
    }

    /// Drops the `orders` projection and rebuilds it from `order_events`.
    pub async fn rebuild_projection(&self) -> Result<u64, ApiError> {
        Ok(store::rebuild(&self.db).await?)
    }

    async fn enrich(&self, s: OrderState) -> Result<OrderView, ApiError> {
        let name: Option<String> = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT display_name FROM order_users WHERE user_id = $1"
        )
        .bind(&s.user_id)
        .fetch_optional(p)
        .await)
        .map_err(StoreError::from)?;
        // Every line's catalog names in one read.
        let marks: Vec<String> = (1..=s.items.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT product_id, title, brand, category FROM order_products
             WHERE deleted = 0 AND product_id IN ({})",
            marks.join(", ")
        );
        let known: Vec<(String, String, String, String)> = if s.items.is_empty() {
            Vec::new()
        } else {
            on_pool!(&self.db, |p| {
                let mut q = sqlx::query_as(&sql);
                for l in &s.items {
                    q = q.bind(&l.product_id);
                }
                q.fetch_all(p).await
            })
            .map_err(StoreError::from)?
        };
        let money = |amount| MoneyView {
            amount,
            currency: s.currency.clone(),
        };
        let items = s
            .items
            .iter()
            .map(|l| {
                let (name, brand, category) = match known.iter().find(|k| k.0 == l.product_id) {
                    Some((_, t, b, c)) => (t.clone(), Some(b.clone()), Some(c.clone())),
                    None => (l.title.clone(), None, None),
                };
                ItemView {
                    product_id: l.product_id.clone(),
                    name,
                    brand,
                    category,
                    quantity: l.quantity,
                    unit_price: money(l.unit_price),
                    line_total: money(l.unit_price * l.quantity),
                }
            })
            .collect();
        Ok(OrderView {
            user: UserRef {
                id: s.user_id.clone(),
                name,
            },
            item_count: s.item_count(),
            items,
            total: MoneyView {
                amount: s.total,
                currency: s.currency.clone(),
            },
            payment: PaymentView {
                method: s.payment_method.clone(),
                payment_id: s.payment_id.clone(),
                paid: s.paid_amount,
                refunded: s.refunded_amount,
            },
            shipment: (s.shipment_id.is_some() || s.tracking_number.is_some()).then(|| {
                ShipmentView {
                    id: s.shipment_id.clone(),
                    tracking_number: s.tracking_number.clone(),
                }
            }),
            cancel_reason: s.cancel_reason.clone(),
            cancel_requested: s.cancel_requested,
            cancellation_refused: s.cancel_refused.clone(),
            version: s.version,
            created_at: Timestamp::from_micros(s.created_us).to_rfc3339(),
            updated_at: Timestamp::from_micros(s.updated_us).to_rfc3339(),
            shipping_address: s.shipping_address,
            id: s.id,
            number: s.number,
            status: s.status,
        })
    }

    /// Applies a shipment's progress to its order (SHIPPED, DELIVERED), once.
    async fn shipment_moved(&self, ev: &Envelope, status: &str) -> Result<(), HandlerError> {
        let (kind, event_type) = match status {
            "IN_TRANSIT" => (kind::SHIPPED, "order.shipped"),
            "DELIVERED" => (kind::DELIVERED, "order.delivered"),
            _ => return Ok(()),
        };
        let order_id = ev.payload["order_id"]
            .as_str()
            .ok_or_else(|| HandlerError::permanent("shipment event without order_id"))?;
        let mut tx = self.db.begin().await?;
        if !inbox::claim(&mut tx, FOLLOWER_GROUP, ev.id).await? {
            tx.rollback().await?;
            return Ok(());
        }
        let data = json!({
            "shipment_id": ev.payload["shipment_id"],
            "tracking_number": ev.payload["tracking_number"],
        });
        let s = match store::append(&mut tx, order_id, None, &[(kind, data.clone())]).await {
            Ok(s) => s,
            Err(AppendError::NotFound) => {
                // A shipment of an order this database does not hold.
                tx.rollback().await?;
                return Err(HandlerError::permanent(format!("no order {order_id}")));
            }
            Err(e) => return Err(HandlerError::transient(StoreError::from(e))),
        };
        saga::emit(&mut tx, &ev.correlation_id, event_type, &s, data).await?;
        tx.commit().await?;
        self.relay.notify();
        self.env.touched();
        Ok(())
    }

    async fn user_changed(&self, ev: &Envelope) -> Result<(), HandlerError> {
        let (Some(id), Some(name)) = (
            ev.payload["user_id"].as_str(),
            ev.payload["display_name"].as_str(),
        ) else {
            return Ok(());
        };
        let at = ev.occurred_at.as_micros();
        on_pool!(write & self.db, |p| sqlx::query(
            "INSERT INTO order_users (user_id, display_name, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (user_id) DO UPDATE SET display_name = excluded.display_name,
                 updated_at = excluded.updated_at
             WHERE order_users.updated_at <= excluded.updated_at"
        )
        .bind(id)
        .bind(name)
        .bind(at)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    async fn product_changed(&self, ev: &Envelope) -> Result<(), HandlerError> {
        let p = &ev.payload;
        let (Some(id), Some(version)) = (p["product_id"].as_str(), p["version"].as_i64()) else {
            return Ok(());
        };
        let deleted = i64::from(ev.event_type == "product.deleted");
        let product = &p["product"];
        let text = |k: &str| product[k].as_str().unwrap_or_default().to_owned();
        // Versions only move forward: a redelivered old event changes nothing.
        on_pool!(write & self.db, |db| {
            sqlx::query(
            "INSERT INTO order_products (product_id, title, brand, category, version, deleted)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (product_id) DO UPDATE SET
                 title = CASE WHEN excluded.title = '' THEN order_products.title ELSE excluded.title END,
                 brand = CASE WHEN excluded.title = '' THEN order_products.brand ELSE excluded.brand END,
                 category = CASE WHEN excluded.title = '' THEN order_products.category ELSE excluded.category END,
                 version = excluded.version, deleted = excluded.deleted
             WHERE order_products.version <= excluded.version"
        )
        .bind(id)
        .bind(text("title"))
        .bind(text("brand"))
        .bind(text("category"))
        .bind(version)
        .bind(deleted)
        .execute(db)
        .await
        .map(|r| r.rows_affected())
        })?;
        Ok(())
    }
}

/// The orders consumer (group [`FOLLOWER_GROUP`] over [`FOLLOWED_TOPICS`]).
pub struct Follower(pub Arc<Orders>);

impl Handler for Follower {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let e = &ev.envelope;
        match e.event_type.as_str() {
            "user.registered" | "user.updated" => self.0.user_changed(e).await,
            "product.created" | "product.updated" | "product.deleted" => {
                self.0.product_changed(e).await
            }
            t if t.starts_with("shipment.") => {
                let status = e.payload["status"].as_str().unwrap_or_default().to_owned();
                self.0.shipment_moved(e, &status).await
            }
            _ => Ok(()),
        }
    }
}

/// id, number, status, currency, total, item_count, created_at, updated_at.
type SummaryRow = (String, String, String, String, i64, i64, i64, i64);

/// Drops internal plumbing from an event before a customer sees it.
pub fn scrub(e: &mut OrderEvent) {
    if let Value::Object(m) = &mut e.data {
        m.remove("correlation_id");
        m.remove("refund_key");
        m.remove("detail");
    }
}

enum Claim {
    /// The key placed this order already.
    Placed(Placed),
    /// The key is this request's: place the order under this id.
    Mine(String),
}

/// Names a participant's field errors as fields of this request (`payment.card_token`).
fn prefixed(mut e: ApiError, prefix: &str) -> ApiError {
    for f in &mut e.0.errors {
        f.field = format!("{prefix}{}", f.field);
    }
    e
}

fn placed(id: &str, number: &str, status: OrderStatus) -> Placed {
    Placed {
        id: id.to_owned(),
        number: number.to_owned(),
        status,
        location: format!("/api/v1/orders/{id}"),
        events: format!("/api/v1/orders/{id}/events"),
    }
}

fn not_found() -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail("no such order")
        .into()
}

/// A referenced resource that does not exist is a bad field of this request.
fn as_field(e: ApiError, field: &str, message: &str) -> ApiError {
    if e.0.status == 404 {
        Problem::new(ErrorCode::ValidationFailed)
            .with_detail("the order cannot be placed")
            .with_field(field, message)
            .into()
    } else {
        e
    }
}

fn idempotency_key(key: Option<&str>) -> Result<&str, ApiError> {
    match key {
        None => Err(Problem::new(ErrorCode::IdempotencyKeyRequired)
            .with_detail(
                "send an Idempotency-Key header: retrying with it never places a second order",
            )
            .into()),
        Some(k) if k.is_empty() || k.len() > 255 || !k.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(Problem::new(ErrorCode::MalformedRequest)
                .with_field("Idempotency-Key", "1 to 255 visible ASCII characters")
                .into())
        }
        Some(k) => Ok(k),
    }
}

fn validate(mut req: PlaceOrder) -> Result<PlaceOrder, ApiError> {
    let mut p = Problem::new(ErrorCode::ValidationFailed).with_detail("the order is not valid");
    let id_ok =
        |s: &str| !s.is_empty() && s.len() <= 100 && s.bytes().all(|b| b.is_ascii_graphic());
    if !id_ok(&req.cart_id) {
        p = p.with_field("cart_id", "a cart id");
    }
    if !id_ok(&req.shipping_address_id) {
        p = p.with_field("shipping_address_id", "an address id");
    }
    let pay = &mut req.payment;
    match pay.method.as_str() {
        "credit_card" | "card" => {
            if pay.card_token.as_deref().is_none_or(str::is_empty) {
                p = p.with_field("payment.card_token", "required for card payments");
            }
            if pay.vpa.is_some() {
                p = p.with_field("payment.vpa", "only for UPI payments");
            }
        }
        "upi" => {
            if pay.vpa.as_deref().is_none_or(str::is_empty) {
                p = p.with_field("payment.vpa", "required for UPI payments");
            }
            if pay.card_token.is_some() {
                p = p.with_field("payment.card_token", "only for card payments");
            }
        }
        _ => p = p.with_field("payment.method", "credit_card, card or upi"),
    }
    if p.errors.is_empty() {
        Ok(req)
    } else {
        Err(p.into())
    }
}

fn request_hash(req: &PlaceOrder) -> String {
    let body = serde_json::to_vec(req).unwrap_or_default();
    Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `{created_at}_{id}` from a previous page.
pub fn parse_cursor(s: &str) -> Option<(i64, String)> {
    let (at, id) = s.split_once('_')?;
    Some((at.parse().ok()?, id.to_owned()))
}
