//! The order saga's participants: orders' ports implemented with the other
//! contexts' public APIs (in-process calls; never their tables).

use flowline_core::{ErrorCode, Problem};
use flowline_http::{ApiError, BoxFuture, RequestContext};
use flowline_orders::{
    Charge, ChargeOutcome, CheckedOutCart, OrderLine, Ports, ShipTo, ShipmentRef, ShipmentRequest,
};
use flowline_payments::{NewPayment, Payment, Payments, RefundRequest, Status};
use std::sync::Arc;

pub struct ContextPorts {
    pub carts: Arc<flowline_cart::Carts>,
    pub inventory: Arc<flowline_inventory::Inventory>,
    pub payments: Arc<Payments>,
    pub shipping: Arc<flowline_shipping::Shipping>,
}

fn new_payment(c: &Charge) -> NewPayment {
    NewPayment {
        order_id: Some(c.order_id.clone()),
        amount: c.amount,
        currency: c.currency.clone(),
        method: c.method.clone(),
        card_token: c.card_token.clone(),
        vpa: c.vpa.clone(),
        tax_amount: None,
        billing_country: None,
        capture: None,
    }
}

/// Not settled yet: the saga asks again after its backoff.
fn unsettled(p: &Payment, what: &str) -> ApiError {
    Problem::new(ErrorCode::PaymentProviderUnavailable)
        .with_detail(format!("payment {} {what}", p.id))
        .into()
}

impl Ports for ContextPorts {
    fn checkout<'a>(
        &'a self,
        ctx: &'a RequestContext,
        user_id: &'a str,
        cart_id: &'a str,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<CheckedOutCart, ApiError>> {
        Box::pin(async move {
            let view = self
                .carts
                .checkout(ctx, user_id, cart_id, reference)
                .await?;
            let currency = view.currency.clone().unwrap_or_default();
            let lines = view
                .items
                .into_iter()
                .map(|l| OrderLine {
                    title: l.title.unwrap_or_default(),
                    unit_price: l.unit_price.map_or(0, |m| m.amount),
                    product_id: l.product_id,
                    quantity: l.quantity,
                })
                .collect();
            Ok(CheckedOutCart { currency, lines })
        })
    }

    fn address<'a>(
        &'a self,
        user_id: &'a str,
        address_id: &'a str,
    ) -> BoxFuture<'a, Result<ShipTo, ApiError>> {
        Box::pin(async move {
            let a = self.carts.address(user_id, address_id).await?;
            Ok(ShipTo {
                name: a.name,
                line1: a.line1,
                line2: a.line2,
                city: a.city,
                region: a.region,
                postal_code: a.postal_code,
                country: a.country,
                latitude: a.latitude,
                longitude: a.longitude,
            })
        })
    }

    fn check_payment<'a>(
        &'a self,
        user_id: &'a str,
        card_token: Option<&'a str>,
        vpa: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            self.payments
                .check_instrument(user_id, card_token, vpa)
                .await
        })
    }

    fn reserve<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
        lines: &'a [OrderLine],
        ttl_minutes: i64,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            let req = flowline_inventory::ReserveRequest {
                order_id: order_id.to_owned(),
                items: lines
                    .iter()
                    .map(|l| flowline_inventory::ReserveItem {
                        product_id: l.product_id.clone(),
                        quantity: l.quantity,
                        warehouse: None,
                    })
                    .collect(),
                ttl_minutes: Some(ttl_minutes),
                ttl_seconds: None,
            };
            self.inventory.reserve(ctx, req).await.map(|_| ())
        })
    }

    fn release<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move { self.inventory.release(ctx, order_id).await.map(|_| ()) })
    }

    fn confirm<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move { self.inventory.confirm(ctx, order_id).await.map(|_| ()) })
    }

    fn return_stock<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move { self.inventory.return_stock(ctx, order_id).await.map(|_| ()) })
    }

    fn charge<'a>(
        &'a self,
        ctx: &'a RequestContext,
        key: &'a str,
        charge: &'a Charge,
    ) -> BoxFuture<'a, Result<ChargeOutcome, ApiError>> {
        Box::pin(async move {
            let mut p = self
                .payments
                .create(ctx, &charge.user_id, key, new_payment(charge))
                .await?;
            if p.status == Status::Authorized {
                p = self.payments.capture(ctx, &p.id).await?;
            }
            Ok(match p.status {
                Status::Captured | Status::PartiallyRefunded | Status::Refunded => {
                    ChargeOutcome::Captured {
                        amount: p.amount,
                        payment_id: p.id,
                    }
                }
                Status::Declined | Status::Failed => ChargeOutcome::Declined {
                    reason: p
                        .decline_reason
                        .clone()
                        .unwrap_or_else(|| "declined".into()),
                    payment_id: p.id,
                },
                Status::Pending | Status::Authorized => ChargeOutcome::Pending { payment_id: p.id },
            })
        })
    }

    fn refund<'a>(
        &'a self,
        ctx: &'a RequestContext,
        charge_key: &'a str,
        refund_key: &'a str,
        charge: &'a Charge,
    ) -> BoxFuture<'a, Result<Option<(String, i64)>, ApiError>> {
        Box::pin(async move {
            let Some(mut p) = self
                .payments
                .made_with_key(&charge.user_id, charge_key)
                .await?
            else {
                return Ok(None);
            };
            if p.status == Status::Pending {
                if charge.card_token.is_none() && charge.vpa.is_none() {
                    // The reconciler settles it; ask again later.
                    return Err(unsettled(&p, "is still pending"));
                }
                p = self
                    .payments
                    .create(ctx, &charge.user_id, charge_key, new_payment(charge))
                    .await?;
            }
            if p.status == Status::Authorized {
                p = self.payments.capture(ctx, &p.id).await?;
            }
            match p.status {
                Status::Declined | Status::Failed => Ok(None),
                Status::Refunded if p.refund_pending == 0 => Ok(Some((p.id, p.refunded_amount))),
                Status::Captured | Status::PartiallyRefunded | Status::Refunded => {
                    // A refund the provider refused is final for its key: the
                    // next attempt goes under the next derived key.
                    let mut n = 0u32;
                    let after = loop {
                        let key = match n {
                            0 => refund_key.to_owned(),
                            n => format!("{refund_key}#{n}"),
                        };
                        match self
                            .payments
                            .refund(ctx, &p.id, &key, RefundRequest::default())
                            .await
                        {
                            Err(e) if e.0.code == "invalid_state" && n < 1000 => {
                                let now = self.payments.get(&p.id).await?;
                                if now.status == Status::Refunded && now.refund_pending == 0 {
                                    break now;
                                }
                                if now.refund_pending > 0 {
                                    return Err(unsettled(&now, "has a refund in flight"));
                                }
                                n += 1;
                            }
                            r => break r?,
                        }
                    };
                    if after.refund_pending > 0 {
                        return Err(unsettled(
                            &after,
                            "has a refund the provider has not answered",
                        ));
                    }
                    // Orders refund all that is left: the total refunded.
                    Ok(Some((after.id, after.refunded_amount)))
                }
                Status::Pending | Status::Authorized => Err(unsettled(&p, "is not settled")),
            }
        })
    }

    fn ship<'a>(
        &'a self,
        ctx: &'a RequestContext,
        req: &'a ShipmentRequest,
    ) -> BoxFuture<'a, Result<ShipmentRef, ApiError>> {
        Box::pin(async move {
            let a = &req.address;
            let new = flowline_shipping::NewShipment {
                order_id: req.order_id.clone(),
                order_number: req.order_number.clone(),
                user_id: req.user_id.clone(),
                address: flowline_shipping::ShipAddress {
                    name: a.name.clone(),
                    line1: a.line1.clone(),
                    line2: a.line2.clone(),
                    city: a.city.clone(),
                    region: a.region.clone(),
                    postal_code: a.postal_code.clone(),
                    country: a.country.clone(),
                    latitude: a.latitude,
                    longitude: a.longitude,
                },
                items: req
                    .items
                    .iter()
                    .map(|l| flowline_shipping::ShipItem {
                        product_id: l.product_id.clone(),
                        title: l.title.clone(),
                        quantity: l.quantity,
                    })
                    .collect(),
            };
            let s = self.shipping.create(ctx, new).await?;
            if s.status == flowline_shipping::Status::Cancelled {
                // A replayed create after the order's shipment was cancelled.
                return Err(Problem::new(ErrorCode::InvalidState)
                    .with_detail("the order's shipment was cancelled")
                    .into());
            }
            Ok(ShipmentRef {
                shipment_id: s.id,
                tracking_number: s.tracking_number,
            })
        })
    }

    fn cancel_shipment<'a>(
        &'a self,
        ctx: &'a RequestContext,
        order_id: &'a str,
    ) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move { self.shipping.cancel(ctx, order_id).await.map(|_| ()) })
    }
}
