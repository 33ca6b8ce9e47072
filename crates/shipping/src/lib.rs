//! flowline-shipping: one shipment per confirmed order, moved forward by
//! couriers, and the day's delivery routes.
//!
//! A shipment goes PENDING → PICKED → IN_TRANSIT → DELIVERED, one step at a
//! time, or PENDING → CANCELLED when the order is compensated. Each change is
//! a compare-and-set on the row's version, a `shipment_events` history row and
//! an event on `shipping.events` (key: the order id), all in one transaction.
//!
//! Create and cancel both arrive from the order saga and may race or be
//! retried, so both first lock the order's row in `shipment_orders`: they
//! serialize per order on every backend. A cancel that finds no shipment
//! leaves a tombstone there, and a create that arrives after it (a late
//! command overtaken by its compensation) is refused instead of shipping a
//! cancelled order.

pub mod routes;
pub mod routing;

use flowline_core::{Envelope, ErrorCode, EventDraft, Problem, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_store::outbox::{self, Relay};
use flowline_store::{Db, Migration, StoreError, Tx};
use routing::{Point, Stop};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::collections::HashMap;

pub const TOPIC: &str = "shipping.events";
/// Largest page of [`Shipping::list`].
pub const MAX_LIST: i64 = 1000;
/// Bounds of a route plan request.
pub const MAX_VEHICLES: i64 = 50;
pub const MAX_CAPACITY: i64 = 500;

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "shipping",
    version: 1,
    name: "shipments, history, order tombstones",
    sqlite: include_str!("../migrations/sqlite/0001_shipping.sql"),
    postgres: include_str!("../migrations/postgres/0001_shipping.sql"),
}];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Picked,
    InTransit,
    Delivered,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Picked => "PICKED",
            Status::InTransit => "IN_TRANSIT",
            Status::Delivered => "DELIVERED",
            Status::Cancelled => "CANCELLED",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "PENDING" => Status::Pending,
            "PICKED" => Status::Picked,
            "IN_TRANSIT" => Status::InTransit,
            "DELIVERED" => Status::Delivered,
            "CANCELLED" => Status::Cancelled,
            other => return Err(StoreError::CorruptEvent(format!("shipment status {other}"))),
        })
    }

    /// The one status a courier may move this one to.
    pub fn next(self) -> Option<Status> {
        match self {
            Status::Pending => Some(Status::Picked),
            Status::Picked => Some(Status::InTransit),
            Status::InTransit => Some(Status::Delivered),
            Status::Delivered | Status::Cancelled => None,
        }
    }

    fn event_type(self) -> &'static str {
        match self {
            Status::Pending => "shipment.created",
            Status::Picked => "shipment.picked",
            Status::InTransit => "shipment.in_transit",
            Status::Delivered => "shipment.delivered",
            Status::Cancelled => "shipment.cancelled",
        }
    }
}

/// Where the parcel goes: a snapshot of the order's address, so later edits
/// to the customer's address book do not move a parcel already on its way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShipAddress {
    /// Recipient, 1 to 100 characters.
    pub name: String,
    /// 1 to 200 characters.
    pub line1: String,
    /// At most 200 characters.
    #[serde(default)]
    pub line2: Option<String>,
    /// 1 to 100 characters.
    pub city: String,
    /// At most 100 characters.
    #[serde(default)]
    pub region: Option<String>,
    /// 1 to 20 characters.
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, upper case.
    pub country: String,
    /// Degrees, -90 to 90; given together with `longitude` or not at all.
    /// Shipments without coordinates cannot be routed.
    #[serde(default)]
    pub latitude: Option<f64>,
    /// Degrees, -180 to 180.
    #[serde(default)]
    pub longitude: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShipItem {
    pub product_id: String,
    pub title: String,
    /// 1 to 10000.
    pub quantity: i64,
}

/// What the order saga sends once an order is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewShipment {
    pub order_id: String,
    /// The number the customer sees, e.g. `FL-2026-000123`.
    pub order_number: String,
    pub user_id: String,
    pub address: ShipAddress,
    /// 1 to 100 items.
    pub items: Vec<ShipItem>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Shipment {
    pub id: String,
    pub order_id: String,
    pub order_number: String,
    pub user_id: String,
    pub status: Status,
    /// `FLS` and 10 letters or digits (no I or O), unique.
    pub tracking_number: String,
    pub address: ShipAddress,
    pub items: Vec<ShipItem>,
    pub created_at: String,
    pub updated_at: String,
    /// Bumped by every status change.
    pub version: i64,
}

/// One row of a shipment's status history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusChange {
    pub status: Status,
    pub at: String,
    pub note: Option<String>,
}

/// The payload of every `shipping.events` event (`shipment.created`,
/// `.picked`, `.in_transit`, `.delivered`, `.cancelled`); the key is the
/// order id, so one order's events stay in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipmentEvent {
    pub shipment_id: String,
    pub order_id: String,
    pub order_number: String,
    pub user_id: String,
    /// The status the shipment entered.
    pub status: Status,
    pub tracking_number: String,
    /// When it entered it (RFC 3339).
    pub at: String,
}

impl ShipmentEvent {
    pub fn of(s: &Shipment) -> ShipmentEvent {
        ShipmentEvent {
            shipment_id: s.id.clone(),
            order_id: s.order_id.clone(),
            order_number: s.order_number.clone(),
            user_id: s.user_id.clone(),
            status: s.status,
            tracking_number: s.tracking_number.clone(),
            at: s.updated_at.clone(),
        }
    }
}

/// `POST /admin/shipping/routes`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutePlanRequest {
    /// `YYYY-MM-DD`: the UTC day the shipments were created.
    pub date: String,
    /// Where every route starts and ends.
    pub depot: Point,
    /// 1 to 50 (default 1).
    #[serde(default)]
    pub vehicles: Option<i64>,
    /// Stops per vehicle, 1 to 500 (default 100).
    #[serde(default)]
    pub capacity: Option<i64>,
}

/// One delivery on a route.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RouteStop {
    pub shipment_id: String,
    pub order_number: String,
    pub tracking_number: String,
    pub status: Status,
    pub address: ShipAddress,
}

/// One vehicle's tour: depot → `stops` in order → depot.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct PlannedRoute {
    /// 1-based.
    pub vehicle: usize,
    pub stops: Vec<RouteStop>,
    /// Length of the nearest-neighbour tour the route started as.
    pub nearest_neighbour_km: f64,
    /// Length after 2-opt: what the vehicle drives.
    pub distance_km: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct RoutePlan {
    pub date: String,
    pub depot: Point,
    pub vehicles: i64,
    pub capacity: i64,
    pub routes: Vec<PlannedRoute>,
    /// Sums over the routes.
    pub nearest_neighbour_km: f64,
    pub distance_km: f64,
    /// Shipment ids beyond `vehicles × capacity`, farthest from the depot.
    pub unassigned: Vec<String>,
    /// Shipment ids without coordinates: they need a manual plan.
    pub unplaced: Vec<String>,
}

pub struct Shipping {
    pub db: Db,
    relay: Relay,
}

const COLUMNS: &str = "id, order_id, order_number, user_id, status, tracking_number, name, line1,
    line2, city, region, postal_code, country, latitude, longitude, items, created_at, updated_at,
    version";

/// A `shipments` row as stored (more columns than sqlx decodes as a tuple).
struct ShipmentRow {
    id: String,
    order_id: String,
    order_number: String,
    user_id: String,
    status: String,
    tracking_number: String,
    name: String,
    line1: String,
    line2: Option<String>,
    city: String,
    region: Option<String>,
    postal_code: String,
    country: String,
    latitude: Option<f64>,
    longitude: Option<f64>,
    items: String,
    created_at: i64,
    updated_at: i64,
    version: i64,
}

/// Decodes a [`ShipmentRow`] from a row of [`COLUMNS`], on either driver.
macro_rules! shipment_row {
    ($r:expr) => {{
        let r = $r;
        ShipmentRow {
            id: r.try_get("id")?,
            order_id: r.try_get("order_id")?,
            order_number: r.try_get("order_number")?,
            user_id: r.try_get("user_id")?,
            status: r.try_get("status")?,
            tracking_number: r.try_get("tracking_number")?,
            name: r.try_get("name")?,
            line1: r.try_get("line1")?,
            line2: r.try_get("line2")?,
            city: r.try_get("city")?,
            region: r.try_get("region")?,
            postal_code: r.try_get("postal_code")?,
            country: r.try_get("country")?,
            latitude: r.try_get("latitude")?,
            longitude: r.try_get("longitude")?,
            items: r.try_get("items")?,
            created_at: r.try_get("created_at")?,
            updated_at: r.try_get("updated_at")?,
            version: r.try_get("version")?,
        }
    }};
}

impl ShipmentRow {
    fn into_shipment(self) -> Result<Shipment, StoreError> {
        Ok(Shipment {
            status: Status::parse(&self.status)?,
            items: serde_json::from_str(&self.items)?,
            address: ShipAddress {
                name: self.name,
                line1: self.line1,
                line2: self.line2,
                city: self.city,
                region: self.region,
                postal_code: self.postal_code,
                country: self.country,
                latitude: self.latitude,
                longitude: self.longitude,
            },
            id: self.id,
            order_id: self.order_id,
            order_number: self.order_number,
            user_id: self.user_id,
            tracking_number: self.tracking_number,
            created_at: Timestamp::from_micros(self.created_at).to_rfc3339(),
            updated_at: Timestamp::from_micros(self.updated_at).to_rfc3339(),
            version: self.version,
        })
    }
}

/// Which unique column a lookup goes by (never user input in SQL).
#[derive(Clone, Copy)]
enum By {
    Id,
    Order,
}

impl By {
    fn sql(self) -> String {
        let col = match self {
            By::Id => "id",
            By::Order => "order_id",
        };
        format!("SELECT {COLUMNS} FROM shipments WHERE {col} = $1")
    }
}

fn invalid_state(detail: impl Into<String>) -> ApiError {
    Problem::new(ErrorCode::InvalidState)
        .with_detail(detail)
        .into()
}

fn not_found() -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail("no such shipment")
        .into()
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.bytes().all(|b| b.is_ascii_graphic())
}

impl Shipping {
    pub async fn open(db: Db, relay: Relay) -> Result<Shipping, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        Ok(Shipping { db, relay })
    }

    /// Creates the order's shipment (PENDING, `shipment.created`). Idempotent
    /// by order: a repeat, even a concurrent one, returns the existing
    /// shipment as it is and emits nothing. Refused (409 `invalid_state`)
    /// when the order was cancelled before any shipment existed.
    pub async fn create(
        &self,
        ctx: &RequestContext,
        new: NewShipment,
    ) -> Result<Shipment, ApiError> {
        validate_new(&new)?;
        // A retry only follows a tracking-number collision (about 1 in 10^15).
        for _ in 0..3 {
            let now = Timestamp::now();
            let mut tx = self.db.begin().await?;
            if lock_order(&mut tx, &new.order_id).await?.is_some() {
                tx.rollback().await?;
                return Err(invalid_state(
                    "the order was cancelled before its shipment was created",
                ));
            }
            if let Some(s) = find_tx(&mut tx, By::Order, &new.order_id).await? {
                tx.rollback().await?;
                return Ok(s);
            }
            let s = Shipment {
                id: flowline_core::id::new_id().to_string(),
                order_id: new.order_id.clone(),
                order_number: new.order_number.clone(),
                user_id: new.user_id.clone(),
                status: Status::Pending,
                tracking_number: tracking_number(),
                address: new.address.clone(),
                items: new.items.clone(),
                created_at: now.to_rfc3339(),
                updated_at: now.to_rfc3339(),
                version: 1,
            };
            match insert(&mut tx, &s, now.as_micros()).await {
                Ok(()) => {}
                Err(StoreError::Database(e))
                    if e.as_database_error()
                        .is_some_and(|d| d.is_unique_violation()) =>
                {
                    tx.rollback().await?;
                    // The order lock makes a second row for the order
                    // unreachable; should one appear anyway, it is the answer.
                    if let Some(s) = self.find(By::Order, &new.order_id).await? {
                        return Ok(s);
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            record(&mut tx, &s.id, Status::Pending, now.as_micros(), None).await?;
            self.emit(&mut tx, ctx, &s).await?;
            tx.commit().await?;
            self.relay.notify();
            return Ok(s);
        }
        tracing::error!(order_id = %new.order_id, "no free tracking number after 3 tries");
        Err(Problem::new(ErrorCode::Internal).into())
    }

    /// Cancels the order's shipment: PENDING → CANCELLED (`shipment.cancelled`).
    /// Already cancelled: returned, nothing emitted. No shipment yet: a
    /// tombstone is left so a late create is refused, and `Ok(None)`. Picked
    /// or later: 409 `invalid_state`, the parcel is with the courier.
    pub async fn cancel(
        &self,
        ctx: &RequestContext,
        order_id: &str,
    ) -> Result<Option<Shipment>, ApiError> {
        if !valid_id(order_id) {
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_detail("order_id: 1 to 100 visible ASCII characters")
                .with_field("order_id", "1 to 100 visible ASCII characters")
                .into());
        }
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        lock_order(&mut tx, order_id).await?;
        let Some(s) = find_tx(&mut tx, By::Order, order_id).await? else {
            flowline_store::on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE shipment_orders SET cancelled_at = COALESCE(cancelled_at, $2)
                 WHERE order_id = $1"
            )
            .bind(order_id)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?;
            tx.commit().await?;
            return Ok(None);
        };
        match s.status {
            Status::Cancelled => {
                tx.rollback().await?;
                Ok(Some(s))
            }
            Status::Pending => {
                // Holding the order lock does not stop a courier's advance:
                // the version check does.
                let Some(s) = transition(&mut tx, &s, Status::Cancelled, now, None).await? else {
                    tx.rollback().await?;
                    return Err(invalid_state(
                        "the order has already been picked for shipping",
                    ));
                };
                self.emit(&mut tx, ctx, &s).await?;
                tx.commit().await?;
                self.relay.notify();
                Ok(Some(s))
            }
            _ => {
                tx.rollback().await?;
                Err(invalid_state(
                    "the order has already been picked for shipping",
                ))
            }
        }
    }

    /// Moves a shipment one step forward (PENDING → PICKED → IN_TRANSIT →
    /// DELIVERED). Asking for the status it already has is a no-op (a retried
    /// courier scan); any other move is 409 `invalid_state`.
    pub async fn advance(
        &self,
        ctx: &RequestContext,
        shipment_id: &str,
        to: Status,
        note: Option<String>,
    ) -> Result<Shipment, ApiError> {
        let note = note.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
        if let Some(n) = &note {
            if n.chars().count() > 500 {
                return Err(Problem::new(ErrorCode::ValidationFailed)
                    .with_detail("note: at most 500 characters")
                    .with_field("note", "at most 500 characters")
                    .into());
            }
        }
        // Only a concurrent change to the same shipment makes a round fail.
        for _ in 0..5 {
            let s = self.get(shipment_id).await?;
            if s.status == to {
                return Ok(s);
            }
            if s.status.next() != Some(to) {
                let detail = match s.status.next() {
                    Some(next) => format!(
                        "the shipment is {}; it can only move to {}",
                        s.status.as_str(),
                        next.as_str()
                    ),
                    None => format!(
                        "the shipment is {}; it cannot move any more",
                        s.status.as_str()
                    ),
                };
                return Err(invalid_state(detail));
            }
            let now = Timestamp::now().as_micros();
            let mut tx = self.db.begin().await?;
            let Some(s) = transition(&mut tx, &s, to, now, note.as_deref()).await? else {
                tx.rollback().await?;
                continue;
            };
            self.emit(&mut tx, ctx, &s).await?;
            tx.commit().await?;
            self.relay.notify();
            return Ok(s);
        }
        Err(Problem::new(ErrorCode::Conflict)
            .with_detail("the shipment kept changing; try again")
            .into())
    }

    pub async fn get(&self, id: &str) -> Result<Shipment, ApiError> {
        self.find(By::Id, id).await?.ok_or_else(not_found)
    }

    /// The order's shipment; `None` before one is created.
    pub async fn by_order(&self, order_id: &str) -> Result<Option<Shipment>, ApiError> {
        Ok(self.find(By::Order, order_id).await?)
    }

    /// Shipments newest first, optionally of one status; `limit` is clamped
    /// to 1..=[`MAX_LIST`].
    pub async fn list(
        &self,
        status: Option<Status>,
        limit: i64,
    ) -> Result<Vec<Shipment>, ApiError> {
        let limit = limit.clamp(1, MAX_LIST);
        let filter = if status.is_some() {
            "WHERE status = $2"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM shipments {filter} ORDER BY created_at DESC, id DESC LIMIT $1"
        );
        let status = status.map(Status::as_str);
        let rows = flowline_store::on_pool!(&self.db, |p| {
            let mut q = sqlx::query(&sql).bind(limit);
            if let Some(st) = status {
                q = q.bind(st);
            }
            let rows = q.fetch_all(p).await.map_err(StoreError::from)?;
            rows.iter()
                .map(|r| Ok(shipment_row!(r)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)?
        });
        Ok(rows
            .into_iter()
            .map(ShipmentRow::into_shipment)
            .collect::<Result<_, _>>()?)
    }

    /// The shipment's status changes, oldest first.
    pub async fn history(&self, id: &str) -> Result<Vec<StatusChange>, ApiError> {
        let rows: Vec<(String, i64, Option<String>)> = flowline_store::on_pool!(&self.db, |p| {
            sqlx::query_as(
                "SELECT status, at, note FROM shipment_events WHERE shipment_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(p)
            .await
        })
        .map_err(StoreError::from)?;
        // Every shipment has at least its PENDING row.
        if rows.is_empty() {
            return Err(not_found());
        }
        rows.into_iter()
            .map(|(status, at, note)| {
                Ok(StatusChange {
                    status: Status::parse(&status)?,
                    at: Timestamp::from_micros(at).to_rfc3339(),
                    note,
                })
            })
            .collect::<Result<_, StoreError>>()
            .map_err(ApiError::from)
    }

    /// Plans delivery routes over the PENDING and PICKED shipments created on
    /// or before `req.date` (UTC): yesterday's overflow is today's backlog.
    /// See [`routing`] for the method.
    pub async fn plan_routes(&self, req: RoutePlanRequest) -> Result<RoutePlan, ApiError> {
        let (day, vehicles, capacity) = validate_plan(&req)?;
        let until = (day + 1) * 86_400_000_000;
        let sql = format!(
            "SELECT {COLUMNS} FROM shipments
             WHERE created_at < $1 AND status IN ('PENDING', 'PICKED')
             ORDER BY id"
        );
        let rows = flowline_store::on_pool!(&self.db, |p| {
            let rows = sqlx::query(&sql)
                .bind(until)
                .fetch_all(p)
                .await
                .map_err(StoreError::from)?;
            rows.iter()
                .map(|r| Ok(shipment_row!(r)))
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(StoreError::from)?
        });
        let shipments: Vec<Shipment> = rows
            .into_iter()
            .map(ShipmentRow::into_shipment)
            .collect::<Result<_, _>>()?;
        let mut unplaced = Vec::new();
        let mut stops = Vec::new();
        for s in &shipments {
            match (s.address.latitude, s.address.longitude) {
                (Some(latitude), Some(longitude)) => stops.push(Stop {
                    id: s.id.clone(),
                    point: Point {
                        latitude,
                        longitude,
                    },
                }),
                _ => unplaced.push(s.id.clone()),
            }
        }
        let depot = req.depot;
        // 2-opt over hundreds of stops is CPU work: off the async workers.
        let plan = tokio::task::spawn_blocking(move || {
            routing::plan(depot, &stops, vehicles as usize, capacity as usize)
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "route planning failed");
            ApiError::from(Problem::new(ErrorCode::Internal))
        })?;
        let by_id: HashMap<&str, &Shipment> =
            shipments.iter().map(|s| (s.id.as_str(), s)).collect();
        let routes = plan
            .routes
            .into_iter()
            .map(|r| PlannedRoute {
                vehicle: r.vehicle,
                stops: r
                    .stops
                    .iter()
                    .map(|id| {
                        let s = by_id[id.as_str()];
                        RouteStop {
                            shipment_id: s.id.clone(),
                            order_number: s.order_number.clone(),
                            tracking_number: s.tracking_number.clone(),
                            status: s.status,
                            address: s.address.clone(),
                        }
                    })
                    .collect(),
                nearest_neighbour_km: r.nearest_neighbour_km,
                distance_km: r.distance_km,
            })
            .collect();
        Ok(RoutePlan {
            date: req.date,
            depot,
            vehicles,
            capacity,
            routes,
            nearest_neighbour_km: plan.nearest_neighbour_km,
            distance_km: plan.distance_km,
            unassigned: plan.unassigned,
            unplaced,
        })
    }

    async fn find(&self, by: By, key: &str) -> Result<Option<Shipment>, StoreError> {
        let sql = by.sql();
        let row = flowline_store::on_pool!(&self.db, |p| {
            match sqlx::query(&sql).bind(key).fetch_optional(p).await? {
                Some(r) => Some(shipment_row!(&r)),
                None => None,
            }
        });
        row.map(ShipmentRow::into_shipment).transpose()
    }

    async fn emit(
        &self,
        tx: &mut Tx,
        ctx: &RequestContext,
        s: &Shipment,
    ) -> Result<(), StoreError> {
        let payload = serde_json::to_value(ShipmentEvent::of(s))?;
        let ev = Envelope::stamp(
            EventDraft::new(TOPIC, s.status.event_type(), &s.order_id, payload),
            &ctx.correlation_id,
            Some(&ctx.request_id),
        );
        outbox::enqueue(tx, &ev).await
    }
}

async fn find_tx(tx: &mut Tx, by: By, key: &str) -> Result<Option<Shipment>, StoreError> {
    let sql = by.sql();
    let row = flowline_store::on_tx!(tx, |c| {
        match sqlx::query(&sql).bind(key).fetch_optional(c).await? {
            Some(r) => Some(shipment_row!(&r)),
            None => None,
        }
    });
    row.map(ShipmentRow::into_shipment).transpose()
}

/// Locks (creating if needed) the order's `shipment_orders` row until the
/// transaction ends; returns its tombstone time. A concurrent insert of the
/// same key waits for this transaction, so create and cancel cannot both
/// miss each other.
async fn lock_order(tx: &mut Tx, order_id: &str) -> Result<Option<i64>, StoreError> {
    Ok(flowline_store::on_tx!(tx, |c| sqlx::query_scalar(
        "INSERT INTO shipment_orders (order_id, cancelled_at) VALUES ($1, NULL)
         ON CONFLICT (order_id) DO UPDATE SET cancelled_at = shipment_orders.cancelled_at
         RETURNING cancelled_at"
    )
    .bind(order_id)
    .fetch_one(c)
    .await)?)
}

async fn insert(tx: &mut Tx, s: &Shipment, now: i64) -> Result<(), StoreError> {
    let items = serde_json::to_string(&s.items)?;
    let a = &s.address;
    flowline_store::on_tx!(tx, |c| {
        sqlx::query(
        "INSERT INTO shipments (id, order_id, order_number, user_id, status, tracking_number,
            name, line1, line2, city, region, postal_code, country, latitude, longitude, items,
            created_at, updated_at, version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $17, $18)"
    )
    .bind(&s.id)
    .bind(&s.order_id)
    .bind(&s.order_number)
    .bind(&s.user_id)
    .bind(s.status.as_str())
    .bind(&s.tracking_number)
    .bind(&a.name)
    .bind(&a.line1)
    .bind(a.line2.as_deref())
    .bind(&a.city)
    .bind(a.region.as_deref())
    .bind(&a.postal_code)
    .bind(&a.country)
    .bind(a.latitude)
    .bind(a.longitude)
    .bind(&items)
    .bind(now)
    .bind(s.version)
    .execute(c)
    .await
    .map(|r| r.rows_affected())
    })?;
    Ok(())
}

/// Compare-and-set `s` (as read) → `to`, with its history row. `None` if the
/// shipment changed since it was read.
async fn transition(
    tx: &mut Tx,
    s: &Shipment,
    to: Status,
    now: i64,
    note: Option<&str>,
) -> Result<Option<Shipment>, StoreError> {
    let n = flowline_store::on_tx!(&mut *tx, |c| sqlx::query(
        "UPDATE shipments SET status = $4, version = version + 1, updated_at = $5
         WHERE id = $1 AND version = $2 AND status = $3"
    )
    .bind(&s.id)
    .bind(s.version)
    .bind(s.status.as_str())
    .bind(to.as_str())
    .bind(now)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    if n == 0 {
        return Ok(None);
    }
    record(tx, &s.id, to, now, note).await?;
    Ok(Some(Shipment {
        status: to,
        version: s.version + 1,
        updated_at: Timestamp::from_micros(now).to_rfc3339(),
        ..s.clone()
    }))
}

async fn record(
    tx: &mut Tx,
    shipment_id: &str,
    status: Status,
    at: i64,
    note: Option<&str>,
) -> Result<(), StoreError> {
    flowline_store::on_tx!(tx, |c| sqlx::query(
        "INSERT INTO shipment_events (shipment_id, status, at, note) VALUES ($1, $2, $3, $4)"
    )
    .bind(shipment_id)
    .bind(status.as_str())
    .bind(at)
    .bind(note)
    .execute(c)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// `FLS` and 10 characters of a 34-letter alphabet (digits and upper case
/// without I and O, which read as 1 and 0): 2×10^15 numbers. The bits come
/// from std's `RandomState` (keys seeded by the OS), so one number says
/// nothing about the next; a UUIDv7's spare bits are mostly a counter.
fn tracking_number() -> String {
    use std::hash::BuildHasher;
    const ALPHABET: &[u8; 34] = b"0123456789ABCDEFGHJKLMNPQRSTUVWXYZ";
    let mut x = std::hash::RandomState::new().hash_one(Timestamp::now().as_micros());
    let mut s = String::with_capacity(13);
    s.push_str("FLS");
    for _ in 0..10 {
        s.push(ALPHABET[(x % 34) as usize] as char);
        x /= 34;
    }
    s
}

/// Checks a new shipment, naming every bad field.
fn validate_new(n: &NewShipment) -> Result<(), ApiError> {
    let mut p = Problem::new(ErrorCode::ValidationFailed).with_detail("the shipment is not valid");
    let id_msg = "1 to 100 visible ASCII characters";
    let text_ok = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.chars().count()) && !s.chars().any(char::is_control)
    };
    if !valid_id(&n.order_id) {
        p = p.with_field("order_id", id_msg);
    }
    if !valid_id(&n.user_id) {
        p = p.with_field("user_id", id_msg);
    }
    if !text_ok(&n.order_number, 1, 100) {
        p = p.with_field("order_number", "1 to 100 characters");
    }
    let a = &n.address;
    for (field, value, min, max) in [
        ("address.name", Some(a.name.as_str()), 1, 100),
        ("address.line1", Some(a.line1.as_str()), 1, 200),
        ("address.line2", a.line2.as_deref(), 0, 200),
        ("address.city", Some(a.city.as_str()), 1, 100),
        ("address.region", a.region.as_deref(), 0, 100),
        ("address.postal_code", Some(a.postal_code.as_str()), 1, 20),
    ] {
        if !text_ok(value.unwrap_or(""), min, max) {
            let msg = if min == 0 {
                format!("at most {max} characters")
            } else {
                format!("{min} to {max} characters")
            };
            p = p.with_field(field, msg);
        }
    }
    if a.country.len() != 2 || !a.country.bytes().all(|b| b.is_ascii_uppercase()) {
        p = p.with_field(
            "address.country",
            "an ISO 3166-1 alpha-2 code in upper case",
        );
    }
    match (a.latitude, a.longitude) {
        (Some(lat), Some(lon)) => {
            if !(-90.0..=90.0).contains(&lat) {
                p = p.with_field("address.latitude", "-90 to 90");
            }
            if !(-180.0..=180.0).contains(&lon) {
                p = p.with_field("address.longitude", "-180 to 180");
            }
        }
        (None, None) => {}
        (Some(_), None) => p = p.with_field("address.longitude", "required with latitude"),
        (None, Some(_)) => p = p.with_field("address.latitude", "required with longitude"),
    }
    if n.items.is_empty() || n.items.len() > 100 {
        p = p.with_field("items", "1 to 100 items");
    }
    for (i, it) in n.items.iter().enumerate() {
        if !valid_id(&it.product_id) {
            p = p.with_field(format!("items[{i}].product_id"), id_msg);
        }
        if !text_ok(&it.title, 1, 200) {
            p = p.with_field(format!("items[{i}].title"), "1 to 200 characters");
        }
        if !(1..=10_000).contains(&it.quantity) {
            p = p.with_field(format!("items[{i}].quantity"), "1 to 10000");
        }
    }
    if p.errors.is_empty() {
        Ok(())
    } else {
        Err(p.into())
    }
}

/// Checks a route plan request; returns (day since the epoch, vehicles, capacity).
fn validate_plan(req: &RoutePlanRequest) -> Result<(i64, i64, i64), ApiError> {
    let mut p = Problem::new(ErrorCode::ValidationFailed)
        .with_detail("the route plan request is not valid");
    let day = parse_day(&req.date);
    if day.is_none() {
        p = p.with_field("date", "a calendar date YYYY-MM-DD, 1970 or later");
    }
    if !(-90.0..=90.0).contains(&req.depot.latitude) {
        p = p.with_field("depot.latitude", "-90 to 90");
    }
    if !(-180.0..=180.0).contains(&req.depot.longitude) {
        p = p.with_field("depot.longitude", "-180 to 180");
    }
    let vehicles = req.vehicles.unwrap_or(1);
    if !(1..=MAX_VEHICLES).contains(&vehicles) {
        p = p.with_field("vehicles", format!("1 to {MAX_VEHICLES}"));
    }
    let capacity = req.capacity.unwrap_or(100);
    if !(1..=MAX_CAPACITY).contains(&capacity) {
        p = p.with_field("capacity", format!("1 to {MAX_CAPACITY}"));
    }
    match day {
        Some(day) if p.errors.is_empty() => Ok((day, vehicles, capacity)),
        _ => Err(p.into()),
    }
}

/// `YYYY-MM-DD` (1970 to 9999) → days since 1970-01-01.
fn parse_day(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |from: usize, to: usize| {
        b[from..to].iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let (y, m, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if y < 1970 || !(1..=12).contains(&m) || d < 1 || d > month_days[(m - 1) as usize] {
        return None;
    }
    // Days from civil (H. Hinnant): years start in March, so the leap day ends one.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_counted_from_the_epoch_and_bad_dates_refused() {
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(parse_day("2000-03-01"), Some(11_017));
        assert_eq!(parse_day("2024-02-29"), Some(19_782));
        assert_eq!(parse_day("2024-12-31"), Some(20_088));
        for bad in [
            "2023-02-29",
            "2024-13-01",
            "2024-00-10",
            "2024-1-01",
            "24-01-01x",
            "1969-12-31",
            "2024-01-32",
            "２０24-01-01",
            "",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }

    #[test]
    fn tracking_numbers_have_the_documented_shape() {
        let a = tracking_number();
        assert_eq!(a.len(), 13);
        assert!(a.starts_with("FLS"));
        assert!(a[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && b != b'I' && b != b'O')));
        assert_ne!(a, tracking_number());
    }

    #[test]
    fn only_one_step_forward_is_allowed() {
        assert_eq!(Status::Pending.next(), Some(Status::Picked));
        assert_eq!(Status::Picked.next(), Some(Status::InTransit));
        assert_eq!(Status::InTransit.next(), Some(Status::Delivered));
        assert_eq!(Status::Delivered.next(), None);
        assert_eq!(Status::Cancelled.next(), None);
        for s in [
            Status::Pending,
            Status::Picked,
            Status::InTransit,
            Status::Delivered,
            Status::Cancelled,
        ] {
            assert_eq!(Status::parse(s.as_str()).unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
