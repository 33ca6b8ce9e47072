//! An order is its events: the state is a fold over them, so history, the
//! `as_of` view and the projection all come from one function.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Event types of an order stream, in the order they usually come.
pub mod kind {
    pub const CREATED: &str = "CREATED";
    pub const STOCK_RESERVED: &str = "STOCK_RESERVED";
    pub const PAYMENT_AUTHORIZED: &str = "PAYMENT_AUTHORIZED";
    pub const PAID: &str = "PAID";
    pub const CONFIRMED: &str = "CONFIRMED";
    pub const SHIPPED: &str = "SHIPPED";
    pub const DELIVERED: &str = "DELIVERED";
    pub const CANCEL_REQUESTED: &str = "CANCEL_REQUESTED";
    pub const CANCELLATION_REFUSED: &str = "CANCELLATION_REFUSED";
    pub const REFUNDED: &str = "REFUNDED";
    pub const CANCELLED: &str = "CANCELLED";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OrderStatus {
    /// Created; the saga is reserving stock and charging.
    Pending,
    /// Paid; stock and shipment being confirmed.
    Paid,
    Confirmed,
    Shipped,
    Delivered,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "PENDING",
            OrderStatus::Paid => "PAID",
            OrderStatus::Confirmed => "CONFIRMED",
            OrderStatus::Shipped => "SHIPPED",
            OrderStatus::Delivered => "DELIVERED",
            OrderStatus::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PENDING" => OrderStatus::Pending,
            "PAID" => OrderStatus::Paid,
            "CONFIRMED" => OrderStatus::Confirmed,
            "SHIPPED" => OrderStatus::Shipped,
            "DELIVERED" => OrderStatus::Delivered,
            "CANCELLED" => OrderStatus::Cancelled,
            _ => return None,
        })
    }

    /// No saga or courier changes it any more.
    pub fn is_final(self) -> bool {
        matches!(self, OrderStatus::Delivered | OrderStatus::Cancelled)
    }
}

/// A line as it was priced at checkout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderLine {
    pub product_id: String,
    /// The product's title at checkout.
    pub title: String,
    pub quantity: i64,
    /// Minor units.
    pub unit_price: i64,
}

/// Where the order goes: a copy of the address at the time of ordering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShipTo {
    pub name: String,
    pub line1: String,
    pub line2: Option<String>,
    pub city: String,
    pub region: Option<String>,
    pub postal_code: String,
    pub country: String,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

/// The payment instrument: a card token or a UPI address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentInput {
    /// `credit_card` (or `card`) or `upi`.
    pub method: String,
    /// From `POST /payments/tokens`, for cards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_token: Option<String>,
    /// `name@bank`, for UPI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpa: Option<String>,
}

/// The CREATED event's data: everything the saga needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Created {
    pub order_id: String,
    pub number: String,
    pub user_id: String,
    pub cart_id: String,
    pub currency: String,
    pub total: i64,
    pub items: Vec<OrderLine>,
    pub shipping_address: ShipTo,
    pub payment_method: String,
}

/// One stored event of an order stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderEvent {
    /// 1 for CREATED; each event adds one.
    pub version: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub data: Value,
    pub occurred_at: String,
    #[serde(skip)]
    pub occurred_us: i64,
}

/// The order as its events leave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderState {
    pub id: String,
    pub number: String,
    pub user_id: String,
    pub cart_id: String,
    pub status: OrderStatus,
    pub currency: String,
    pub total: i64,
    pub items: Vec<OrderLine>,
    pub shipping_address: ShipTo,
    pub payment_method: String,
    pub payment_id: Option<String>,
    pub paid_amount: i64,
    pub refunded_amount: i64,
    pub shipment_id: Option<String>,
    pub tracking_number: Option<String>,
    /// Why it was cancelled, in words for the customer.
    pub cancel_reason: Option<String>,
    pub cancel_requested: bool,
    /// Why the last cancellation request was refused.
    pub cancel_refused: Option<String>,
    pub version: i64,
    pub created_us: i64,
    pub updated_us: i64,
}

fn text(data: &Value, key: &str) -> Option<String> {
    data.get(key).and_then(Value::as_str).map(str::to_owned)
}

impl OrderState {
    /// Folds a stream; `None` when it does not start with CREATED.
    pub fn replay<'a>(events: impl IntoIterator<Item = &'a OrderEvent>) -> Option<OrderState> {
        let mut it = events.into_iter();
        let first = it.next()?;
        let mut s = OrderState::created(first)?;
        for e in it {
            s.apply(e);
        }
        Some(s)
    }

    fn created(e: &OrderEvent) -> Option<OrderState> {
        if e.kind != kind::CREATED {
            return None;
        }
        let c: Created = serde_json::from_value(e.data.clone()).ok()?;
        Some(OrderState {
            id: c.order_id,
            number: c.number,
            user_id: c.user_id,
            cart_id: c.cart_id,
            status: OrderStatus::Pending,
            currency: c.currency,
            total: c.total,
            items: c.items,
            shipping_address: c.shipping_address,
            payment_method: c.payment_method,
            payment_id: None,
            paid_amount: 0,
            refunded_amount: 0,
            shipment_id: None,
            tracking_number: None,
            cancel_reason: None,
            cancel_requested: false,
            cancel_refused: None,
            version: e.version,
            created_us: e.occurred_us,
            updated_us: e.occurred_us,
        })
    }

    /// Applies one event. Unknown types only bump the version, so an older
    /// binary can still fold a stream a newer one wrote.
    pub fn apply(&mut self, e: &OrderEvent) {
        let d = &e.data;
        match e.kind.as_str() {
            kind::PAYMENT_AUTHORIZED => self.payment_id = text(d, "payment_id"),
            kind::PAID => {
                self.status = OrderStatus::Paid;
                self.payment_id = text(d, "payment_id").or(self.payment_id.take());
                self.paid_amount = d
                    .get("amount")
                    .and_then(Value::as_i64)
                    .unwrap_or(self.total);
            }
            kind::CONFIRMED => {
                // Never back from SHIPPED/DELIVERED (a late, retried confirmation).
                if matches!(self.status, OrderStatus::Pending | OrderStatus::Paid) {
                    self.status = OrderStatus::Confirmed;
                }
                self.shipment_id = text(d, "shipment_id");
                self.tracking_number = text(d, "tracking_number");
            }
            kind::SHIPPED => {
                self.status = OrderStatus::Shipped;
                if let Some(t) = text(d, "tracking_number") {
                    self.tracking_number = Some(t);
                }
            }
            kind::DELIVERED => self.status = OrderStatus::Delivered,
            kind::CANCEL_REQUESTED => {
                self.cancel_requested = true;
                self.cancel_refused = None;
            }
            kind::CANCELLATION_REFUSED => {
                self.cancel_requested = false;
                self.cancel_refused = text(d, "reason");
            }
            kind::REFUNDED => {
                self.refunded_amount += d.get("amount").and_then(Value::as_i64).unwrap_or(0);
            }
            kind::CANCELLED => {
                self.status = OrderStatus::Cancelled;
                self.cancel_reason = text(d, "reason");
            }
            _ => {}
        }
        self.version = e.version;
        self.updated_us = e.occurred_us;
    }

    pub fn item_count(&self) -> i64 {
        self.items.iter().map(|l| l.quantity).sum()
    }

    /// The customer may still ask to cancel: not cancelled, not yet handed
    /// to the courier as far as orders knows (shipping has the last word).
    pub fn cancellable(&self) -> bool {
        matches!(
            self.status,
            OrderStatus::Pending | OrderStatus::Paid | OrderStatus::Confirmed
        ) && !self.cancel_requested
    }
}

/// `FL-2026-000123`: the year, then a per-year counter.
pub fn order_number(year: u32, n: i64) -> String {
    format!("FL-{year}-{n:06}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(version: i64, kind: &str, data: Value) -> OrderEvent {
        OrderEvent {
            version,
            kind: kind.into(),
            data,
            occurred_at: String::new(),
            occurred_us: version * 10,
        }
    }

    fn created() -> OrderEvent {
        let c = Created {
            order_id: "o1".into(),
            number: order_number(2026, 123),
            user_id: "u1".into(),
            cart_id: "c1".into(),
            currency: "BRL".into(),
            total: 2500,
            items: vec![OrderLine {
                product_id: "p1".into(),
                title: "Mug".into(),
                quantity: 2,
                unit_price: 1250,
            }],
            shipping_address: ShipTo {
                name: "Ana".into(),
                line1: "Rua 1".into(),
                line2: None,
                city: "São Paulo".into(),
                region: None,
                postal_code: "01310-100".into(),
                country: "BR".into(),
                latitude: None,
                longitude: None,
            },
            payment_method: "credit_card".into(),
        };
        ev(1, kind::CREATED, serde_json::to_value(c).unwrap())
    }

    #[test]
    fn numbers_are_zero_padded_per_year() {
        assert_eq!(order_number(2026, 123), "FL-2026-000123");
        assert_eq!(order_number(2027, 1_234_567), "FL-2027-1234567");
    }

    #[test]
    fn a_stream_folds_to_its_state_and_any_prefix_is_a_past_state() {
        let events = vec![
            created(),
            ev(2, kind::STOCK_RESERVED, json!({})),
            ev(3, kind::PAYMENT_AUTHORIZED, json!({"payment_id": "pay1"})),
            ev(4, kind::PAID, json!({"payment_id": "pay1", "amount": 2500})),
            ev(
                5,
                kind::CONFIRMED,
                json!({"shipment_id": "s1", "tracking_number": "FLS1"}),
            ),
            ev(6, kind::SHIPPED, json!({})),
            ev(7, kind::DELIVERED, json!({})),
        ];
        let s = OrderState::replay(&events).unwrap();
        assert_eq!(s.status, OrderStatus::Delivered);
        assert_eq!(s.payment_id.as_deref(), Some("pay1"));
        assert_eq!(s.tracking_number.as_deref(), Some("FLS1"));
        assert_eq!((s.version, s.updated_us, s.created_us), (7, 70, 10));
        let past = OrderState::replay(&events[..4]).unwrap();
        assert_eq!((past.status, past.paid_amount), (OrderStatus::Paid, 2500));
        assert!(past.cancellable());
        assert!(!s.cancellable());
    }

    #[test]
    fn cancellation_keeps_the_reason_and_refunds() {
        let events = vec![
            created(),
            ev(2, kind::PAID, json!({"payment_id": "pay1", "amount": 2500})),
            ev(3, kind::CANCEL_REQUESTED, json!({})),
            ev(4, kind::REFUNDED, json!({"amount": 2500})),
            ev(
                5,
                kind::CANCELLED,
                json!({"reason": "Cancelled at your request."}),
            ),
        ];
        let s = OrderState::replay(&events).unwrap();
        assert_eq!(s.status, OrderStatus::Cancelled);
        assert_eq!(s.refunded_amount, 2500);
        assert_eq!(
            s.cancel_reason.as_deref(),
            Some("Cancelled at your request.")
        );
        assert!(!s.cancellable());
    }

    #[test]
    fn a_stream_must_start_with_created_and_unknown_events_are_skipped() {
        assert!(OrderState::replay(&[ev(1, kind::PAID, json!({}))]).is_none());
        let s = OrderState::replay(&[created(), ev(2, "GIFT_WRAPPED", json!({}))]).unwrap();
        assert_eq!((s.status, s.version), (OrderStatus::Pending, 2));
    }

    #[test]
    fn a_refused_cancellation_can_be_asked_again() {
        let s = OrderState::replay(&[
            created(),
            ev(2, kind::CANCEL_REQUESTED, json!({})),
            ev(
                3,
                kind::CANCELLATION_REFUSED,
                json!({"reason": "already picked"}),
            ),
        ])
        .unwrap();
        assert!(s.cancellable());
        assert_eq!(s.cancel_refused.as_deref(), Some("already picked"));
    }
}
