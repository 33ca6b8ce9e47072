//! Payments against a real database and the sandbox provider: SQLite always,
//! PostgreSQL too when `FLOWLINE_TEST_POSTGRES_URL` is set.

use flowline_http::RequestContext;
use flowline_payments::card::CardInput;
use flowline_payments::provider::Sandbox;
use flowline_payments::{NewPayment, Payments, PaymentsConfig, RefundRequest, Status};
use flowline_store::outbox::Relay;
use flowline_store::{Backend, Db, Durability, EventLog, LogOptions};
use std::sync::Arc;
use std::time::Duration;

struct Env {
    pay: Arc<Payments>,
    sandbox: Arc<Sandbox>,
    relay: Relay,
    log: EventLog,
    _dir: tempfile::TempDir,
}

async fn envs(cfg: PaymentsConfig) -> Vec<Env> {
    let dir = tempfile::tempdir().unwrap();
    let mut backends = vec![Backend::Sqlite {
        dir: dir.path().to_path_buf(),
        durability: Durability::Relaxed,
    }];
    if let Ok(url) = std::env::var("FLOWLINE_TEST_POSTGRES_URL") {
        backends.push(Backend::Postgres {
            url,
            schema_prefix: format!("t{}_", uuid::Uuid::now_v7().simple()),
            max_connections: 16,
        });
    }
    let mut v = Vec::new();
    for b in backends {
        let log = EventLog::open(&b, LogOptions::default()).await.unwrap();
        let db = Db::open(&b, "payments").await.unwrap();
        let relay = Relay::new(db.clone(), log.clone());
        let sandbox = Arc::new(Sandbox::new(db.clone(), Duration::ZERO));
        let pay = Payments::open(db, relay.clone(), sandbox.clone(), cfg.clone())
            .await
            .unwrap();
        v.push(Env {
            pay: Arc::new(pay),
            sandbox,
            relay,
            log,
            _dir: tempfile::tempdir().unwrap(),
        });
    }
    std::mem::forget(dir);
    v
}

fn ctx() -> RequestContext {
    RequestContext {
        correlation_id: "test".into(),
        request_id: flowline_core::id::new_id().to_string(),
    }
}

fn card(number: &str) -> CardInput {
    serde_json::from_value(
        serde_json::json!({"number": number, "exp_month": 12, "exp_year": 2040, "cvc": "123"}),
    )
    .unwrap()
}

fn pay_with(token: &str, amount: i64) -> NewPayment {
    serde_json::from_value(serde_json::json!({
        "order_id": flowline_core::id::new_id().to_string(), "amount": amount, "currency": "BRL",
        "method": "credit_card", "card_token": token, "tax_amount": amount / 10,
    }))
    .unwrap()
}

async fn events(env: &Env) -> Vec<String> {
    env.relay.drain().await.unwrap();
    let mut kinds = Vec::new();
    for partition in 0..4 {
        for e in env
            .log
            .read(flowline_payments::TOPIC, partition, 0, 1000)
            .await
            .unwrap()
        {
            kinds.push(e.envelope.event_type);
        }
    }
    kinds
}

#[tokio::test]
async fn test_cards_approve_decline_time_out_and_fail_as_documented() {
    for env in envs(PaymentsConfig::default()).await {
        let p = &env.pay;
        let ok = p
            .tokenize("u1", &card("4242 4242 4242 4242"))
            .await
            .unwrap();
        let first = pay_with(&ok.id, 29990);
        let paid = p.create(&ctx(), "u1", "k1", first.clone()).await.unwrap();
        assert_eq!(paid.status, Status::Captured);
        assert_eq!(paid.card.as_ref().unwrap().last4, "4242");

        let no = p.tokenize("u1", &card("4000000000000002")).await.unwrap();
        let declined = p
            .create(&ctx(), "u1", "k2", pay_with(&no.id, 100))
            .await
            .unwrap();
        assert_eq!(
            (declined.status, declined.decline_reason.as_deref()),
            (Status::Declined, Some("card_declined"))
        );

        // Every answer times out; the provider is asked, and it did authorize once.
        let slow = p.tokenize("u1", &card("4000000000000119")).await.unwrap();
        let resolved = p
            .create(&ctx(), "u1", "k3", pay_with(&slow.id, 500))
            .await
            .unwrap();
        assert_eq!(resolved.status, Status::Captured);
        assert_eq!(env.sandbox.charges(&resolved.id).await.unwrap(), 1);

        let late = p.tokenize("u1", &card("4000000000000341")).await.unwrap();
        let failed = p
            .create(&ctx(), "u1", "k4", pay_with(&late.id, 700))
            .await
            .unwrap();
        assert_eq!(
            (failed.status, failed.decline_reason.as_deref()),
            (Status::Failed, Some("capture_failed"))
        );

        // The same key resumes the same payment: no second charge.
        let again = p.create(&ctx(), "u1", "k1", first.clone()).await.unwrap();
        assert_eq!(again.id, paid.id);
        assert_eq!(env.sandbox.charges(&paid.id).await.unwrap(), 1);
        // The same key with another request is refused, however late.
        let e = p
            .create(&ctx(), "u1", "k1", pay_with(&ok.id, 29990))
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "idempotency_key_reused");

        let kinds = events(&env).await;
        for k in [
            "payment.authorized",
            "payment.captured",
            "payment.declined",
            "payment.failed",
        ] {
            assert!(kinds.iter().any(|e| e == k), "{k} missing from {kinds:?}");
        }
    }
}

#[tokio::test]
async fn refunds_are_partial_or_full_once_per_key_and_never_exceed_the_capture() {
    let refund = |amount: Option<i64>, currency: Option<&str>| RefundRequest {
        amount,
        currency: currency.map(str::to_owned),
    };
    for env in envs(PaymentsConfig::default()).await {
        let p = &env.pay;
        let t = p.tokenize("u", &card("5555555555554444")).await.unwrap();
        // 1000 with 333 tax: the refunds' tax shares must add up to 333 exactly.
        let mut req = pay_with(&t.id, 1000);
        req.tax_amount = Some(333);
        let paid = p.create(&ctx(), "u", "k", req).await.unwrap();
        let part = p
            .refund(&ctx(), &paid.id, "r1", refund(Some(300), None))
            .await
            .unwrap();
        assert_eq!(
            (part.status, part.refunded_amount),
            (Status::PartiallyRefunded, 300)
        );
        // The same key again is the same refund, not a second one.
        let again = p
            .refund(&ctx(), &paid.id, "r1", refund(Some(300), None))
            .await
            .unwrap();
        assert_eq!(again.refunded_amount, 300);
        let e = p
            .refund(&ctx(), &paid.id, "r1", refund(Some(5), None))
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "idempotency_key_reused");
        let e = p
            .refund(&ctx(), &paid.id, "r2", refund(Some(701), None))
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "refund_exceeds_capture");
        let e = p
            .refund(&ctx(), &paid.id, "r3", refund(Some(1), Some("USD")))
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "currency_mismatch");
        let third = p
            .refund(&ctx(), &paid.id, "r4", refund(Some(333), None))
            .await
            .unwrap();
        assert_eq!(third.refunded_amount, 633);
        let full = p
            .refund(&ctx(), &paid.id, "r5", RefundRequest::default())
            .await
            .unwrap();
        assert_eq!(
            (full.status, full.refunded_amount, full.refund_pending),
            (Status::Refunded, 1000, 0)
        );
        let e = p
            .refund(&ctx(), &paid.id, "r6", RefundRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.0.code, "invalid_state");
        env.relay.drain().await.unwrap();
        let mut taxes = 0;
        let mut refunds = 0;
        for partition in 0..4 {
            for e in env
                .log
                .read(flowline_payments::TOPIC, partition, 0, 1000)
                .await
                .unwrap()
            {
                if e.envelope.event_type == "payment.refunded" {
                    refunds += 1;
                    taxes += e.envelope.payload["tax_amount"].as_i64().unwrap();
                }
            }
        }
        assert_eq!((refunds, taxes), (3, 333));
    }
}

#[tokio::test]
async fn fraud_rules_decline_before_the_provider_is_called() {
    let mut cfg = PaymentsConfig::default();
    cfg.fraud.max_per_card = 3;
    for env in envs(cfg.clone()).await {
        let p = &env.pay;
        let br = p.tokenize("u", &card("4000000760000002")).await.unwrap();
        let mut req = pay_with(&br.id, cfg.fraud.review_amount);
        req.billing_country = Some("US".into());
        let d = p.create(&ctx(), "u", "k0", req).await.unwrap();
        assert_eq!(
            (d.status, d.decline_reason.as_deref()),
            (Status::Declined, Some("fraud_suspected"))
        );
        assert_eq!(d.fraud.reasons, ["high_amount", "country_mismatch"]);
        assert_eq!(env.sandbox.charges(&d.id).await.unwrap(), 0);
        // Velocity per card counts across tokens of the same number.
        let mut last = None;
        for i in 0..3 {
            let t = p.tokenize("u", &card("4242424242424242")).await.unwrap();
            last = Some(
                p.create(&ctx(), "u", &format!("v{i}"), pay_with(&t.id, 100))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(last.unwrap().status, Status::Captured);
        let t = p.tokenize("u", &card("4242424242424242")).await.unwrap();
        let d = p
            .create(&ctx(), "u", "v4", pay_with(&t.id, 100))
            .await
            .unwrap();
        assert_eq!(d.fraud.reasons, ["velocity_card"]);
    }
}

#[tokio::test]
async fn bad_input_is_refused_and_stores_nothing() {
    for env in envs(PaymentsConfig::default()).await {
        let p = &env.pay;
        assert_eq!(
            p.tokenize("u", &card("4242424242424241"))
                .await
                .unwrap_err()
                .0
                .code,
            "invalid_card"
        );
        let mut expired = card("4242424242424242");
        expired.exp_year = 2020;
        let e = p.tokenize("u", &expired).await.unwrap_err();
        assert_eq!(e.0.code, "invalid_card");
        assert_eq!(e.0.errors[0].field, "exp_year");
        let upi: NewPayment = serde_json::from_value(serde_json::json!({
            "amount": 100, "currency": "INR", "method": "upi", "vpa": "not-a-vpa"}))
        .unwrap();
        assert_eq!(
            p.create(&ctx(), "u", "x", upi).await.unwrap_err().0.code,
            "invalid_vpa"
        );
        let mut neg = pay_with("tok_x", -5);
        neg.tax_amount = None;
        assert_eq!(
            p.create(&ctx(), "u", "y", neg).await.unwrap_err().0.errors[0].field,
            "amount"
        );
        // Another user's token is not usable.
        let t = p
            .tokenize("owner", &card("4242424242424242"))
            .await
            .unwrap();
        assert_eq!(
            p.create(&ctx(), "thief", "z", pay_with(&t.id, 100))
                .await
                .unwrap_err()
                .0
                .code,
            "invalid_card"
        );
        assert!(events(&env).await.is_empty());
        let ok: NewPayment = serde_json::from_value(serde_json::json!({
            "amount": 100, "currency": "INR", "method": "upi", "vpa": "success@razorpay"}))
        .unwrap();
        assert_eq!(
            p.create(&ctx(), "u", "x", ok).await.unwrap().status,
            Status::Captured
        );
    }
}

#[tokio::test]
async fn reconcile_finishes_what_a_crash_left_pending() {
    let cfg = PaymentsConfig {
        provider_attempts: 1,
        ..Default::default()
    };
    for env in envs(cfg).await {
        let p = &env.pay;
        let t = p.tokenize("u", &card("4000000000000119")).await.unwrap();
        let mut req = pay_with(&t.id, 100);
        req.capture = Some(false);
        let paid = p.create(&ctx(), "u", "k", req).await.unwrap();
        // A single attempt still asks the provider after the timeout.
        assert_eq!(paid.status, Status::Authorized);
        assert_eq!(
            p.reconcile(Duration::ZERO, Duration::from_secs(3600))
                .await
                .unwrap(),
            0
        );
        let captured = p.capture(&ctx(), &paid.id).await.unwrap();
        assert_eq!(captured.status, Status::Captured);
        assert_eq!(env.sandbox.charges(&paid.id).await.unwrap(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_attempts_cannot_slip_past_the_velocity_rule() {
    let mut cfg = PaymentsConfig::default();
    cfg.fraud.max_per_card = 3;
    for env in envs(cfg).await {
        let t = env
            .pay
            .tokenize("u", &card("4242424242424242"))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let (pay, token) = (env.pay.clone(), t.id.clone());
                tokio::spawn(async move {
                    pay.create(&ctx(), "u", &format!("c{i}"), pay_with(&token, 100))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut captured = 0;
        for task in tasks {
            if task.await.unwrap().status == Status::Captured {
                captured += 1;
            }
        }
        assert_eq!(captured, 3, "{}", env.pay.db.backend_name());
    }
}

/// Keeps the message of every ERROR event (a storage error behind an
/// `internal_error` is only logged), so a failure can say what went wrong.
#[derive(Clone, Default)]
struct Errors(Arc<std::sync::Mutex<Vec<String>>>);

impl tracing::Subscriber for Errors {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() == tracing::Level::ERROR
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, e: &tracing::Event<'_>) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push_str(&format!(" {}={v:?}", f.name()));
            }
        }
        let mut fields = Fields(String::new());
        e.record(&mut fields);
        self.0.lock().unwrap().push(fields.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_paying_for_many_things_at_once_gets_no_errors() {
    use tracing::instrument::WithSubscriber;
    let mut cfg = PaymentsConfig::default();
    cfg.fraud.max_per_user = i64::MAX;
    cfg.fraud.max_per_card = i64::MAX;
    for env in envs(cfg).await {
        let backend = env.pay.db.backend_name();
        let errors = Errors::default();
        let token = env
            .pay
            .tokenize("busy", &card("4242424242424242"))
            .await
            .unwrap()
            .id;
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let (pay, token) = (env.pay.clone(), token.clone());
                let run = async move {
                    let mut failures = Vec::new();
                    for i in 0..20 {
                        let key = format!("alone-{t}-{i}");
                        // UPI and card payments interleave, as a user's would.
                        let req = if (t + i) % 2 == 0 {
                            serde_json::from_value(serde_json::json!({
                                "order_id": key, "amount": 2990, "currency": "BRL",
                                "method": "upi", "vpa": "success@razorpay",
                            }))
                            .unwrap()
                        } else {
                            pay_with(&token, 2990)
                        };
                        match pay.create(&ctx(), "busy", &key, req).await {
                            Ok(p) if p.status == Status::Captured => {}
                            Ok(p) => failures.push(format!("{key}: {:?}", p.status)),
                            Err(e) => failures.push(format!("{key}: {}", e.0.code)),
                        }
                    }
                    failures
                };
                tokio::spawn(run.with_subscriber(errors.clone()))
            })
            .collect();
        let mut failures = Vec::new();
        for task in tasks {
            failures.extend(task.await.unwrap());
        }
        let logged = errors.0.lock().unwrap().clone();
        assert!(
            failures.is_empty() && logged.is_empty(),
            "{backend}: {} failed: {failures:?}; logged: {logged:?}",
            failures.len()
        );
    }
}
