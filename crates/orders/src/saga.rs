//! The two order sagas and the hooks that turn their progress into order
//! events in the saga's own transaction.
//!
//! `order.place`: reserve stock → charge (authorize + capture) → confirm the
//! reservation → create the shipment; compensations release the stock,
//! refund, return sold units and cancel the shipment, in reverse.
//! `order.cancel` (a customer's cancellation of a confirmed order): cancel
//! the shipment (refused once picked) → return the stock → refund.

use crate::failpoints::Failpoints;
use crate::model::{kind, OrderLine, OrderState, PaymentInput, ShipTo};
use crate::ports::{Charge, ChargeOutcome, Ports, ShipmentRequest};
use crate::store;
use flowline_core::{Envelope, EventDraft, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_saga::{
    BoxFuture, OnFinish, OnStep, Orchestrator, RetryPolicy, SagaDef, SagaStatus, Step, StepCtx,
    StepError,
};
use flowline_store::{outbox, Db, StoreError, Tx};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::watch;

pub const PLACE: &str = "order.place";
pub const CANCEL: &str = "order.cancel";
pub const TOPIC: &str = "orders.events";

/// What the sagas share.
pub(crate) struct Env {
    pub db: Db,
    pub ports: Arc<dyn Ports>,
    pub faults: Failpoints,
    pub ttl_minutes: i64,
    /// Set once the orchestrator exists (its definitions hold this `Env`).
    pub orch: OnceLock<Weak<Orchestrator>>,
    /// Bumped whenever an order stream grows, to wake live followers.
    pub changed: watch::Sender<u64>,
}

impl Env {
    pub fn touched(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The input of both sagas: the order as placed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SagaData {
    pub order_id: String,
    pub number: String,
    pub user_id: String,
    pub currency: String,
    pub total: i64,
    pub items: Vec<OrderLine>,
    pub shipping_address: ShipTo,
    pub payment: PaymentInput,
    pub correlation_id: String,
}

impl SagaData {
    fn charge(&self) -> Charge {
        Charge {
            order_id: self.order_id.clone(),
            user_id: self.user_id.clone(),
            amount: self.total,
            currency: self.currency.clone(),
            method: self.payment.method.clone(),
            card_token: self.payment.card_token.clone(),
            vpa: self.payment.vpa.clone(),
        }
    }
}

fn data(ctx: &StepCtx) -> Result<SagaData, StepError> {
    serde_json::from_value(ctx.data.clone())
        .map_err(|e| StepError::fatal(format!("unreadable saga data [{e}]")))
}

fn request_ctx(d: &SagaData, ctx: &StepCtx) -> RequestContext {
    RequestContext {
        correlation_id: d.correlation_id.clone(),
        request_id: ctx.command_id.clone(),
    }
}

/// The charge key of an order: the place saga's charge command.
pub(crate) fn charge_key(order_id: &str) -> String {
    format!("{order_id}:charge_payment:do")
}

/// A step failure as the saga records it: the customer's words first, then
/// the technical cause in brackets (see [`customer_reason`]).
fn failure(customer: &str, e: &ApiError) -> StepError {
    let detail = e.0.detail.as_deref().unwrap_or(e.0.title);
    let msg = format!("{customer} [{}: {detail}]", e.0.code);
    // Timeouts, overload and server errors may pass; the rest will not.
    if e.0.status >= 500 || e.0.status == 429 || e.0.status == 408 {
        StepError::retryable(msg)
    } else {
        StepError::fatal(msg)
    }
}

/// The part of a saga failure meant for the customer.
pub(crate) fn customer_reason(failure: Option<&str>) -> String {
    // The orchestrator records `{step}: {message}`.
    let message = failure.map(|f| match f.split_once(": ") {
        Some((step, rest)) if !step.contains(' ') => rest,
        _ => f,
    });
    match message.and_then(|f| f.split_once(" [").map(|(c, _)| c)) {
        Some(c) if !c.is_empty() => c.to_owned(),
        _ => "We could not complete your order; any payment taken has been refunded.".to_owned(),
    }
}

const CANCELLED_BY_CUSTOMER: &str = "Cancelled at your request.";

/// Refuses to go on once the customer asked to cancel (the compensations
/// then undo what was done).
async fn still_wanted(env: &Env, order_id: &str) -> Result<(), StepError> {
    let state = store::projected(&env.db, order_id)
        .await
        .map_err(|e| StepError::retryable(e.to_string()))?;
    match state {
        Some(s) if s.cancel_requested => Err(StepError::fatal(format!(
            "{CANCELLED_BY_CUSTOMER} [cancel requested]"
        ))),
        _ => Ok(()),
    }
}

/// What a step function is given: the saga's data decoded, and the request
/// context its participant calls carry (correlation id, command id).
struct Call {
    env: Arc<Env>,
    ctx: StepCtx,
    d: SagaData,
    rctx: RequestContext,
}

type Action = dyn Fn(Call) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync;

/// A step function: checks its failpoint, decodes the data, then runs `f`.
fn step_fn(
    env: &Arc<Env>,
    f: impl Fn(Call) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync + 'static,
) -> impl Fn(StepCtx) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync + 'static {
    let env = env.clone();
    let f: Arc<Action> = Arc::new(f);
    move |ctx: StepCtx| {
        let env = env.clone();
        let f = f.clone();
        Box::pin(async move {
            env.faults.check(&ctx).await?;
            let d = data(&ctx)?;
            let rctx = request_ctx(&d, &ctx);
            f(Call { env, ctx, d, rctx }).await
        })
    }
}

/// Participant calls keyed by the order id alone, whose failures are only
/// ever worth retrying (compensations, and the cancel saga's restock).
#[derive(Debug, Clone, Copy)]
enum ByOrder {
    Release,
    ReturnStock,
    CancelShipment,
}

/// A step function calling `op`: every failure is retryable.
fn retrying(
    env: &Arc<Env>,
    op: ByOrder,
) -> impl Fn(StepCtx) -> BoxFuture<'static, Result<Value, StepError>> + Send + Sync + 'static {
    step_fn(env, move |c| {
        Box::pin(async move {
            let (ports, id) = (&c.env.ports, c.d.order_id.as_str());
            let (done, what) = match op {
                ByOrder::Release => (ports.release(&c.rctx, id).await, "released"),
                ByOrder::ReturnStock => (ports.return_stock(&c.rctx, id).await, "returned"),
                ByOrder::CancelShipment => (ports.cancel_shipment(&c.rctx, id).await, "cancelled"),
            };
            done.map_err(|e| StepError::retryable(format!("{op:?}: {}", e.0.code)))?;
            Ok(json!({ what: true }))
        })
    })
}

/// For the cancel saga: once the customer's cancellation is under way it
/// must finish (only shipping's refusal stops it, before anything changed).
fn forever() -> RetryPolicy {
    RetryPolicy {
        max_attempts: u32::MAX,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(30),
    }
}

fn patient() -> RetryPolicy {
    // Steps after the point of no return only wait for a participant to
    // come back; a long outage still ends (and compensates) eventually.
    RetryPolicy {
        max_attempts: 200,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(30),
    }
}

pub(crate) fn place_def(env: &Arc<Env>) -> SagaDef {
    let reserve = Step::new(
        "reserve_stock",
        step_fn(env, |c| {
            Box::pin(async move {
                still_wanted(&c.env, &c.d.order_id).await?;
                let ttl = c.env.ttl_minutes;
                c.env
                    .ports
                    .reserve(&c.rctx, &c.d.order_id, &c.d.items, ttl)
                    .await
                    .map_err(|e| {
                        let customer = if e.0.code == "insufficient_stock" {
                            "Some items are out of stock."
                        } else {
                            "We could not reserve your items."
                        };
                        failure(customer, &e)
                    })?;
                Ok(json!({ "ttl_minutes": ttl }))
            })
        }),
    )
    .compensate(retrying(env, ByOrder::Release))
    .timeout(Duration::from_secs(5));

    let charge = Step::new(
        "charge_payment",
        step_fn(env, |c| {
            Box::pin(async move {
                still_wanted(&c.env, &c.d.order_id).await?;
                let outcome = c
                    .env
                    .ports
                    .charge(&c.rctx, &c.ctx.command_id, &c.d.charge())
                    .await
                    .map_err(|e| failure("Your payment details could not be used.", &e))?;
                match outcome {
                    ChargeOutcome::Captured { payment_id, amount } => {
                        Ok(json!({ "payment_id": payment_id, "amount": amount }))
                    }
                    ChargeOutcome::Declined { payment_id, reason } => Err(StepError::fatal(
                        format!("{} [{reason}: payment {payment_id}]", decline_text(&reason)),
                    )),
                    ChargeOutcome::Pending { payment_id } => Err(StepError::retryable(format!(
                        "Your payment could not be confirmed. [pending: payment {payment_id}]"
                    ))),
                }
            })
        }),
    )
    .compensate(step_fn(env, |c| Box::pin(refund(c))))
    .timeout(Duration::from_secs(30));

    let confirm = Step::new(
        "confirm_stock",
        step_fn(env, |c| {
            Box::pin(async move {
                still_wanted(&c.env, &c.d.order_id).await?;
                c.env
                    .ports
                    .confirm(&c.rctx, &c.d.order_id)
                    .await
                    .map_err(|e| {
                        failure("Your reservation expired before the payment completed.", &e)
                    })?;
                Ok(json!({ "confirmed": true }))
            })
        }),
    )
    .compensate(retrying(env, ByOrder::ReturnStock))
    .timeout(Duration::from_secs(5));

    let ship = Step::new(
        "create_shipment",
        step_fn(env, |c| {
            Box::pin(async move {
                still_wanted(&c.env, &c.d.order_id).await?;
                let d = &c.d;
                let req = ShipmentRequest {
                    order_id: d.order_id.clone(),
                    order_number: d.number.clone(),
                    user_id: d.user_id.clone(),
                    address: d.shipping_address.clone(),
                    items: d.items.clone(),
                };
                let s =
                    c.env.ports.ship(&c.rctx, &req).await.map_err(|e| {
                        failure("We could not arrange shipping for this order.", &e)
                    })?;
                Ok(json!({ "shipment_id": s.shipment_id, "tracking_number": s.tracking_number }))
            })
        }),
    )
    .compensate(retrying(env, ByOrder::CancelShipment))
    .timeout(Duration::from_secs(5))
    .retry(patient());

    SagaDef::new(PLACE, vec![reserve, charge, confirm, ship])
        .on_step(PlaceProgress(env.clone()))
        .on_finish(PlaceFinished(env.clone()))
}

pub(crate) fn cancel_def(env: &Arc<Env>) -> SagaDef {
    let unship = Step::new(
        "cancel_shipment",
        step_fn(env, |c| {
            Box::pin(async move {
                c.env
                    .ports
                    .cancel_shipment(&c.rctx, &c.d.order_id)
                    .await
                    .map_err(|e| match e.0.status {
                        // Shipping's refusal: picked already. Nothing changed.
                        409 => StepError::fatal(format!(
                            "The order has already been handed to the courier. [{}: {}]",
                            e.0.code,
                            e.0.detail.as_deref().unwrap_or_default()
                        )),
                        _ => StepError::retryable(format!("cancel shipment: {}", e.0.code)),
                    })?;
                Ok(json!({ "cancelled": true }))
            })
        }),
    )
    .timeout(Duration::from_secs(5))
    .retry(forever());
    let restock = Step::new("return_stock", retrying(env, ByOrder::ReturnStock))
        .timeout(Duration::from_secs(5))
        .retry(forever());
    let refund_step = Step::new("refund_payment", step_fn(env, |c| Box::pin(refund(c))))
        .timeout(Duration::from_secs(30))
        .retry(forever());
    SagaDef::new(CANCEL, vec![unship, restock, refund_step]).on_finish(CancelFinished(env.clone()))
}

fn decline_text(reason: &str) -> &'static str {
    match reason {
        "insufficient_funds" => "Your card has insufficient funds.",
        "expired_card" => "Your card has expired.",
        "fraud_suspected" => "Your payment could not be accepted.",
        "invalid_card" | "invalid_vpa" => "Your payment details are not valid.",
        "capture_failed" => "Your payment could not be completed.",
        _ => "Your payment was declined.",
    }
}

/// Refunds what the order's charge captured and records REFUNDED once per
/// refund (outside the saga transaction, so it is deduped by the refund key).
async fn refund(c: Call) -> Result<Value, StepError> {
    let (env, d, key) = (&c.env, &c.d, &c.ctx.command_id);
    let done = env
        .ports
        .refund(&c.rctx, &charge_key(&d.order_id), key, &d.charge())
        .await
        .map_err(|e| StepError::retryable(format!("refund: {} {:?}", e.0.code, e.0.detail)))?;
    let Some((payment_id, amount)) = done else {
        return Ok(json!({ "refunded": 0 }));
    };
    let record = async {
        let mut tx = env.db.begin().await?;
        // Under the order's lock, so two runs cannot both record it.
        store::lock(&mut tx, &d.order_id).await?;
        let stream = store::load_in(&mut tx, &d.order_id).await?;
        let seen = stream
            .iter()
            .any(|e| e.kind == kind::REFUNDED && e.data["refund_key"].as_str() == Some(key));
        if !seen {
            let ev = json!({ "payment_id": payment_id, "amount": amount, "refund_key": key });
            store::append(&mut tx, &d.order_id, None, &[(kind::REFUNDED, ev)]).await?;
        }
        tx.commit().await?;
        Ok::<_, StoreError>(())
    };
    record
        .await
        .map_err(|e| StepError::retryable(format!("record refund: {e}")))?;
    env.touched();
    Ok(json!({ "payment_id": payment_id, "refunded": amount }))
}

/// Publishes an integration event of the order on [`TOPIC`].
pub(crate) async fn emit(
    tx: &mut Tx,
    correlation_id: &str,
    event_type: &str,
    s: &OrderState,
    extra: Value,
) -> Result<(), StoreError> {
    let mut payload = json!({
        "order_id": s.id,
        "order_number": s.number,
        "user_id": s.user_id,
        "status": s.status,
        "total": { "amount": s.total, "currency": s.currency },
        "items": s.items.iter().map(|l| json!({
            "product_id": l.product_id, "title": l.title, "quantity": l.quantity,
        })).collect::<Vec<_>>(),
        "at": Timestamp::from_micros(s.updated_us).to_rfc3339(),
    });
    if let (Value::Object(p), Value::Object(x)) = (&mut payload, extra) {
        p.extend(x);
    }
    let draft = EventDraft::new(TOPIC, event_type, &s.id, payload);
    outbox::enqueue(tx, &Envelope::stamp(draft, correlation_id, None)).await
}

struct PlaceProgress(Arc<Env>);

impl OnStep for PlaceProgress {
    fn call<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga_id: &'a str,
        step: &'a str,
        output: &'a Value,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let events: Vec<(&str, Value)> = match step {
                "reserve_stock" => vec![(kind::STOCK_RESERVED, output.clone())],
                "charge_payment" => vec![
                    (
                        kind::PAYMENT_AUTHORIZED,
                        json!({ "payment_id": output["payment_id"] }),
                    ),
                    (kind::PAID, output.clone()),
                ],
                _ => return Ok(()),
            };
            store::append(tx, saga_id, None, &events).await?;
            self.0.touched();
            Ok(())
        })
    }
}

struct PlaceFinished(Arc<Env>);

impl OnFinish for PlaceFinished {
    fn call<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga_id: &'a str,
        status: SagaStatus,
        reason: Option<&'a str>,
        results: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let Some(created) = store::load_in(tx, saga_id).await?.into_iter().next() else {
                return Err(StoreError::CorruptEvent(format!(
                    "order {saga_id} has no events"
                )));
            };
            let correlation = created.data["correlation_id"]
                .as_str()
                .unwrap_or(saga_id)
                .to_owned();
            if status == SagaStatus::Completed {
                let ship = results.get("create_shipment").cloned().unwrap_or_default();
                let ev = json!({
                    "shipment_id": ship["shipment_id"], "tracking_number": ship["tracking_number"],
                });
                let s = store::append(tx, saga_id, None, &[(kind::CONFIRMED, ev.clone())]).await?;
                emit(tx, &correlation, "order.confirmed", &s, ev).await?;
                if s.cancel_requested {
                    // Asked while the saga ran past its last check: undo it all now.
                    start_cancel(&self.0, tx, &s, &correlation).await?;
                }
            } else {
                let why = customer_reason(reason);
                let s = store::append(
                    tx,
                    saga_id,
                    None,
                    &[(kind::CANCELLED, json!({ "reason": why }))],
                )
                .await?;
                emit(
                    tx,
                    &correlation,
                    "order.cancelled",
                    &s,
                    json!({ "reason": why }),
                )
                .await?;
            }
            self.0.touched();
            Ok(())
        })
    }
}

/// Starts the cancel saga of a confirmed order in `tx`.
pub(crate) async fn start_cancel(
    env: &Env,
    tx: &mut Tx,
    s: &OrderState,
    correlation_id: &str,
) -> Result<(), StoreError> {
    let orch = env
        .orch
        .get()
        .and_then(Weak::upgrade)
        .ok_or_else(|| StoreError::CorruptEvent("the orchestrator is gone".into()))?;
    let d = SagaData {
        order_id: s.id.clone(),
        number: s.number.clone(),
        user_id: s.user_id.clone(),
        currency: s.currency.clone(),
        total: s.total,
        items: s.items.clone(),
        shipping_address: s.shipping_address.clone(),
        // Refunds find the charge by its key; no instrument is needed again.
        payment: PaymentInput {
            method: s.payment_method.clone(),
            card_token: None,
            vpa: None,
        },
        correlation_id: correlation_id.to_owned(),
    };
    let id = format!("{}:cancel:{}", s.id, s.version);
    orch.start(tx, CANCEL, &id, serde_json::to_value(&d)?).await
}

struct CancelFinished(Arc<Env>);

impl OnFinish for CancelFinished {
    fn call<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga_id: &'a str,
        status: SagaStatus,
        reason: Option<&'a str>,
        _results: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let order_id = saga_id.split(':').next().unwrap_or(saga_id);
            let created = store::load_in(tx, order_id).await?;
            let correlation = created
                .first()
                .and_then(|e| e.data["correlation_id"].as_str())
                .unwrap_or(order_id)
                .to_owned();
            if status == SagaStatus::Completed {
                let s = store::append(
                    tx,
                    order_id,
                    None,
                    &[(kind::CANCELLED, json!({ "reason": CANCELLED_BY_CUSTOMER }))],
                )
                .await?;
                emit(
                    tx,
                    &correlation,
                    "order.cancelled",
                    &s,
                    json!({ "reason": CANCELLED_BY_CUSTOMER }),
                )
                .await?;
            } else {
                let why = match reason {
                    Some(r) if r.contains(" [") => customer_reason(Some(r)),
                    _ => "The order could not be cancelled.".to_owned(),
                };
                store::append(
                    tx,
                    order_id,
                    None,
                    &[(kind::CANCELLATION_REFUSED, json!({ "reason": why }))],
                )
                .await?;
            }
            self.0.touched();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_customer_sees_only_their_part_of_a_failure() {
        assert_eq!(
            customer_reason(Some("Some items are out of stock. [insufficient_stock: x]")),
            "Some items are out of stock."
        );
        assert_eq!(
            customer_reason(Some("reserve_stock: Some items are out of stock. [x: y]")),
            "Some items are out of stock."
        );
        assert!(customer_reason(Some("step timed out after 5s")).starts_with("We could not"));
        assert!(customer_reason(None).starts_with("We could not"));
    }
}
