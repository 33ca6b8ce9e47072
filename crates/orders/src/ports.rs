//! What orders needs from other contexts, as an interface the server
//! implements with their public APIs: orders never reads their tables.

use crate::model::{OrderLine, ShipTo};
use flowline_http::{ApiError, BoxFuture, RequestContext};

/// A cart closed for this order, priced as it was then.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedOutCart {
    pub currency: String,
    pub lines: Vec<OrderLine>,
}

/// A charge, keyed so a retried step (same `key`) makes no second payment.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub order_id: String,
    pub user_id: String,
    pub amount: i64,
    pub currency: String,
    pub method: String,
    pub card_token: Option<String>,
    pub vpa: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChargeOutcome {
    Captured {
        payment_id: String,
        amount: i64,
    },
    /// Refused for good: `reason` is the provider's or the fraud rules' code.
    Declined {
        payment_id: String,
        reason: String,
    },
    /// Not settled yet (a provider that did not answer); ask again.
    Pending {
        payment_id: String,
    },
}

/// A shipment for a paid order.
#[derive(Debug, Clone, PartialEq)]
pub struct ShipmentRequest {
    pub order_id: String,
    pub order_number: String,
    pub user_id: String,
    pub address: ShipTo,
    pub items: Vec<OrderLine>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShipmentRef {
    pub shipment_id: String,
    pub tracking_number: String,
}

/// Every method is safe to call again with the same arguments: the saga
/// repeats a step whose outcome a crash kept it from recording.
pub trait Ports: Send + Sync {
    /// Closes the cart; the same `reference` gets the same answer again.
    fn checkout<'a>(
        &'a self,
        ctx: &'a RequestContext,
        user_id: &'a str,
        cart_id: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<CheckedOutCart, ApiError>>;

    fn address<'a>(
        &'a self,
        user_id: &'a str,
        address_id: &'a str,
    ) -> BoxFuture<'a, Result<ShipTo, ApiError>>;

    /// Refuses (422) an instrument that cannot pay: an unknown card token or
    /// another user's, a malformed VPA. Nothing is charged.
    fn check_payment<'a>(
        &'a self,
        user_id: &'a str,
        card_token: Option<&'a str>,
        vpa: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Holds every line for the order, or none.
    fn reserve<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
        lines: &'a [OrderLine],
        ttl_minutes: i64,
    ) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Gives back what the order holds; holding nothing leaves a marker that
    /// refuses a late reserve.
    fn release<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Turns the hold into a sale.
    fn confirm<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Puts sold units back on hand (releases a hold that was never sold).
    fn return_stock<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ApiError>>;

    /// Authorizes and captures, keyed by `key`.
    fn charge<'a>(
        &'a self,
        ctx: &'a RequestContext,
        key: &'a str,
        charge: &'a Charge,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ApiError>>;

    /// Refunds whatever the charge made with `charge_key` captured, keyed by
    /// `refund_key`. Returns the payment id and the amount refunded by this
    /// call's refund, or `None` when the charge took no money.
    fn refund<'a>(
        &'a self,
        ctx: &'a RequestContext,
        charge_key: &'a str,
        refund_key: &'a str,
        charge: &'a Charge,
    ) -> BoxFuture<'a, Result<Option<(String, i64)>, ApiError>>;

    fn ship<'a>(
        &'a self,
        ctx: &'a RequestContext,
        req: &'a ShipmentRequest,
    ) -> BoxFuture<'a, Result<ShipmentRef, ApiError>>;

    /// Refused (409) once the courier has the parcel.
    fn cancel_shipment<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ApiError>>;
}
