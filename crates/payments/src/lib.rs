//! flowline-payments: payment transactions.
//!
//! A transaction moves PENDING → AUTHORIZED → CAPTURED, or ends DECLINED /
//! FAILED; captured money can be REFUNDED in full or in parts
//! (PARTIALLY_REFUNDED on the way). Each step is a compare-and-set on the
//! status with its event on `commerce.payments` in the same transaction, and
//! each provider call is made with a reference the provider deduplicates, so
//! a retry, a crash or a replayed request never charges twice.
//!
//! Order of work for a new payment: validate → fraud rules → store PENDING →
//! authorize (timeouts retried; an unknown outcome resolved by asking the
//! provider) → capture. A crash at any point leaves a state [`Payments::reconcile`]
//! drives forward.

pub mod card;
pub mod fraud;
pub mod idempotency;
pub mod provider;
pub mod routes;

use flowline_core::{Currency, Envelope, ErrorCode, EventDraft, Problem, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_store::outbox::{self, Relay};
use flowline_store::{Db, Migration, StoreError, Tx};
use provider::{ChargeStatus, Instrument, Outcome, Provider, ProviderError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

pub const TOPIC: &str = "commerce.payments";

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "payments",
    version: 1,
    name: "transactions, refunds, idempotency keys, sandbox",
    sqlite: include_str!("../migrations/sqlite/0001_payments.sql"),
    postgres: include_str!("../migrations/postgres/0001_payments.sql"),
}];

#[derive(Debug, Clone)]
pub struct PaymentsConfig {
    pub fraud: fraud::FraudConfig,
    /// How long one provider call may take before it counts as timed out.
    pub provider_timeout: Duration,
    /// Attempts per provider call before asking the provider for the outcome.
    pub provider_attempts: u32,
    /// How long a duplicate request waits for the first one with its key.
    pub idempotency_wait: Duration,
    /// How long a claim on a key outlives its holder's last heartbeat before a
    /// retry may take it over (the holder died mid-request).
    pub idempotency_lease: Duration,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            fraud: fraud::FraudConfig::default(),
            provider_timeout: Duration::from_secs(5),
            provider_attempts: 3,
            idempotency_wait: Duration::from_secs(10),
            idempotency_lease: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Authorized,
    Captured,
    PartiallyRefunded,
    Refunded,
    Declined,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Authorized => "AUTHORIZED",
            Status::Captured => "CAPTURED",
            Status::PartiallyRefunded => "PARTIALLY_REFUNDED",
            Status::Refunded => "REFUNDED",
            Status::Declined => "DECLINED",
            Status::Failed => "FAILED",
        }
    }

    fn parse(s: &str) -> Result<Status, StoreError> {
        Ok(match s {
            "PENDING" => Status::Pending,
            "AUTHORIZED" => Status::Authorized,
            "CAPTURED" => Status::Captured,
            "PARTIALLY_REFUNDED" => Status::PartiallyRefunded,
            "REFUNDED" => Status::Refunded,
            "DECLINED" => Status::Declined,
            "FAILED" => Status::Failed,
            other => return Err(StoreError::CorruptEvent(format!("payment status {other}"))),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CardSummary {
    pub brand: String,
    pub last4: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FraudSummary {
    pub score: i64,
    pub reasons: Vec<String>,
}

/// A payment as the API shows it: never more of a card than brand and last 4.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Payment {
    pub id: String,
    pub user_id: String,
    pub order_id: Option<String>,
    pub status: Status,
    /// `card` or `upi`.
    pub method: String,
    pub card: Option<CardSummary>,
    pub vpa: Option<String>,
    /// Minor units.
    pub amount: i64,
    pub tax_amount: i64,
    pub currency: String,
    pub refunded_amount: i64,
    /// Refunds sent to the provider and not yet answered.
    pub refund_pending: i64,
    pub decline_reason: Option<String>,
    pub fraud: FraudSummary,
    pub created_at: String,
    pub updated_at: String,
    #[serde(skip)]
    card_token: Option<String>,
    #[serde(skip)]
    auto_capture: bool,
    #[serde(skip)]
    version: i64,
}

/// `POST /payments` (seed 003's payment command, plus UPI and options).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPayment {
    pub order_id: Option<String>,
    /// Minor units, e.g. 29990.
    pub amount: i64,
    /// ISO 4217, e.g. `BRL`.
    pub currency: String,
    /// `card` (or `credit_card`) or `upi`.
    pub method: String,
    /// From `POST /payments/tokens`, for cards.
    pub card_token: Option<String>,
    /// `name@bank`, for UPI.
    pub vpa: Option<String>,
    /// The tax included in `amount` (default 0).
    pub tax_amount: Option<i64>,
    /// ISO 3166 alpha-2; compared with the card's country by the fraud rules.
    pub billing_country: Option<String>,
    /// Capture right after authorizing (default true).
    pub capture: Option<bool>,
}

/// `POST /payments/{id}/refund`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundRequest {
    /// Minor units; default: everything not yet refunded.
    pub amount: Option<i64>,
    /// If given, must be the payment's currency.
    pub currency: Option<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CardToken {
    pub id: String,
    pub brand: String,
    pub last4: String,
    pub exp_month: u32,
    pub exp_year: u32,
    pub country: String,
    pub created_at: String,
}

pub struct Payments {
    pub db: Db,
    relay: Relay,
    provider: Arc<dyn Provider>,
    cfg: PaymentsConfig,
    /// Keys card and VPA fingerprints, so they can be compared but not reversed.
    secret: String,
}

const COLUMNS: &str = "id, user_id, order_id, status, method, card_token, card_brand, card_last4, vpa, amount,
    tax_amount, currency, refunded_amount, auto_capture, fraud_score, fraud_reasons, decline_reason, version,
    created_at, updated_at, refund_pending";

type Row = (
    String,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    (
        i64,
        String,
        i64,
        i64,
        i64,
        String,
        Option<String>,
        i64,
        i64,
        i64,
        i64,
    ),
);

fn payment(r: Row) -> Result<Payment, StoreError> {
    let (
        tax_amount,
        currency,
        refunded_amount,
        auto_capture,
        score,
        reasons,
        decline,
        version,
        created,
        updated,
        refund_pending,
    ) = r.10;
    Ok(Payment {
        status: Status::parse(&r.3)?,
        card: match (r.6, r.7) {
            (Some(brand), Some(last4)) => Some(CardSummary { brand, last4 }),
            _ => None,
        },
        id: r.0,
        user_id: r.1,
        order_id: r.2,
        method: r.4,
        card_token: r.5,
        vpa: r.8,
        amount: r.9,
        tax_amount,
        currency,
        refunded_amount,
        refund_pending,
        decline_reason: decline,
        fraud: FraudSummary {
            score,
            reasons: serde_json::from_str(&reasons)?,
        },
        created_at: Timestamp::from_micros(created).to_rfc3339(),
        updated_at: Timestamp::from_micros(updated).to_rfc3339(),
        auto_capture: auto_capture != 0,
        version,
    })
}

fn not_found() -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail("no such payment")
        .into()
}

fn invalid_state(p: &Payment, action: &str) -> ApiError {
    Problem::new(ErrorCode::InvalidState)
        .with_detail(format!(
            "a {} payment cannot be {action}",
            p.status.as_str()
        ))
        .into()
}

fn provider_down(e: &ProviderError) -> ApiError {
    tracing::warn!(error = ?e, "payment provider did not answer");
    Problem::new(ErrorCode::PaymentProviderUnavailable).into()
}

impl Payments {
    pub async fn open(
        db: Db,
        relay: Relay,
        provider: Arc<dyn Provider>,
        cfg: PaymentsConfig,
    ) -> Result<Payments, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        // 4 UUIDv7s carry 296 random bits; made once per installation.
        let fresh: String = (0..4)
            .map(|_| flowline_core::id::new_id().simple().to_string())
            .collect();
        flowline_store::on_pool!(write & db, |p| {
            sqlx::query(
            "INSERT INTO settings (name, value) VALUES ('fingerprint_secret', $1) ON CONFLICT (name) DO NOTHING"
        )
        .bind(&fresh)
        .execute(p)
        .await
        .map(|r| r.rows_affected())
        })?;
        let secret: String = flowline_store::on_pool!(write & db, |p| sqlx::query_scalar(
            "SELECT value FROM settings WHERE name = 'fingerprint_secret'"
        )
        .fetch_one(p)
        .await)?;
        Ok(Payments {
            db,
            relay,
            provider,
            cfg,
            secret,
        })
    }

    pub fn config(&self) -> &PaymentsConfig {
        &self.cfg
    }

    fn fingerprint(&self, what: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.secret.as_bytes());
        h.update([0]);
        h.update(what.as_bytes());
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Checks a card and has the provider tokenize it; only brand, last 4,
    /// expiry and a keyed fingerprint are kept.
    pub async fn tokenize(
        &self,
        user_id: &str,
        input: &card::CardInput,
    ) -> Result<CardToken, ApiError> {
        let now = Timestamp::now();
        let card = card::check(input, now)?;
        let issued = self
            .provider
            .tokenize(&card)
            .await
            .map_err(|e| provider_down(&e))?;
        let t = CardToken {
            id: issued.token,
            brand: card.brand.to_owned(),
            last4: card.last4(),
            exp_month: card.exp_month,
            exp_year: card.exp_year,
            country: issued.country,
            created_at: now.to_rfc3339(),
        };
        let fingerprint = self.fingerprint(&card.digits);
        flowline_store::on_pool!(write &self.db, |p| sqlx::query(
            "INSERT INTO card_tokens (id, user_id, brand, last4, exp_month, exp_year, country, fingerprint, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        )
        .bind(&t.id)
        .bind(user_id)
        .bind(&t.brand)
        .bind(&t.last4)
        .bind(i64::from(t.exp_month))
        .bind(i64::from(t.exp_year))
        .bind(&t.country)
        .bind(&fingerprint)
        .bind(now.as_micros())
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        Ok(t)
    }

    pub async fn get(&self, id: &str) -> Result<Payment, ApiError> {
        self.find(id).await?.ok_or_else(not_found)
    }

    async fn find(&self, id: &str) -> Result<Option<Payment>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM transactions WHERE id = $1");
        let row = flowline_store::on_pool!(write & self.db, |p| sqlx::query(&sql)
            .bind(id)
            .fetch_optional(p)
            .await
            .map(|r| r.as_ref().map(decode)))?;
        row.transpose()?.map(payment).transpose()
    }

    /// Checks an instrument before it is used: the card token exists and is
    /// `user_id`'s, or the VPA looks like `name@bank` (422 naming the field).
    pub async fn check_instrument(
        &self,
        user_id: &str,
        card_token: Option<&str>,
        vpa: Option<&str>,
    ) -> Result<(), ApiError> {
        if let Some(v) = vpa {
            card::check_vpa(v)?;
        }
        if let Some(token) = card_token {
            let found: Option<String> = flowline_store::on_pool!(&self.db, |p| sqlx::query_scalar(
                "SELECT id FROM card_tokens WHERE id = $1 AND user_id = $2"
            )
            .bind(token)
            .bind(user_id)
            .fetch_optional(p)
            .await)
            .map_err(StoreError::from)?;
            if found.is_none() {
                return Err(Problem::new(ErrorCode::InvalidCard)
                    .with_detail("no such card token")
                    .with_field("card_token", "unknown")
                    .into());
            }
        }
        Ok(())
    }

    /// The payment `user_id` made with `key`, whatever its request was (a
    /// compensation looks up what its step may have done).
    pub async fn made_with_key(
        &self,
        user_id: &str,
        key: &str,
    ) -> Result<Option<Payment>, ApiError> {
        let id: Option<String> = flowline_store::on_pool!(write & self.db, |p| sqlx::query_scalar(
            "SELECT id FROM transactions WHERE user_id = $1 AND idempotency_key = $2"
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(p)
        .await)
        .map_err(StoreError::from)?;
        match id {
            None => Ok(None),
            Some(id) => Ok(Some(self.get(&id).await?)),
        }
    }

    /// The payment `user_id` made with `key`; the same key with another
    /// request is refused, whenever it comes.
    async fn by_key(
        &self,
        user_id: &str,
        key: &str,
        hash: &str,
    ) -> Result<Option<Payment>, ApiError> {
        let found: Option<(String, String)> = flowline_store::on_pool!(write & self.db, |p| {
            sqlx::query_as(
            "SELECT id, request_hash FROM transactions WHERE user_id = $1 AND idempotency_key = $2"
        )
        .bind(user_id)
        .bind(key)
        .fetch_optional(p)
        .await
        })
        .map_err(StoreError::from)?;
        match found {
            None => Ok(None),
            Some((_, h)) if h != hash => Err(Problem::new(ErrorCode::IdempotencyKeyReused)
                .with_detail("this Idempotency-Key already made a payment with a different request")
                .into()),
            Some((id, _)) => Ok(Some(self.get(&id).await?)),
        }
    }

    /// Creates and runs a payment for `user_id`. A payment already made with
    /// this idempotency key is resumed and returned instead.
    pub async fn create(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        key: &str,
        req: NewPayment,
    ) -> Result<Payment, ApiError> {
        let hash = request_hash(&req);
        if let Some(p) = self.by_key(user_id, key, &hash).await? {
            return self.advance(ctx, p).await;
        }
        let v = self.validate(user_id, &req).await?;
        let now = Timestamp::now();
        let since = now
            .saturating_sub(self.cfg.fraud.velocity_window)
            .as_micros();
        let mut tx = self.db.begin().await?;
        // The velocity rules count inside the write transaction, so concurrent
        // attempts are counted one after another: on SQLite the transaction
        // holds the write lock; on PostgreSQL these locks queue same-user and
        // same-card attempts.
        if let Tx::Postgres(t) = &mut tx {
            for k in [user_id, v.fingerprint.as_str()] {
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(k)
                    .execute(&mut **t)
                    .await
                    .map_err(StoreError::from)?;
            }
        }
        let user_attempts: i64 = flowline_store::on_tx!(&mut tx, |c| sqlx::query_scalar(
            "SELECT count(*) FROM transactions WHERE user_id = $1 AND created_at >= $2"
        )
        .bind(user_id)
        .bind(since)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?;
        let card_attempts: i64 = flowline_store::on_tx!(&mut tx, |c| sqlx::query_scalar(
            "SELECT count(*) FROM transactions WHERE fingerprint = $1 AND created_at >= $2"
        )
        .bind(&v.fingerprint)
        .bind(since)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?;
        let verdict = fraud::assess(
            &self.cfg.fraud,
            &fraud::Signals {
                amount: req.amount,
                user_attempts,
                card_attempts,
                card_country: v.country.clone(),
                billing_country: req.billing_country.clone(),
            },
        );
        let id = flowline_core::id::new_id().to_string();
        let status = if verdict.rejected {
            Status::Declined
        } else {
            Status::Pending
        };
        let inserted = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO transactions (id, user_id, order_id, idempotency_key, status, method, card_token, card_brand,
                card_last4, fingerprint, vpa, amount, tax_amount, currency, refunded_amount, refund_pending, auto_capture,
                billing_country, fraud_score, fraud_reasons, decline_reason, version, created_at, updated_at, request_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, 0, 0, $15, $16, $17, $18, $19, 1, $20, $20, $21)
             ON CONFLICT (user_id, idempotency_key) DO NOTHING"
        )
        .bind(&id)
        .bind(user_id)
        .bind(&req.order_id)
        .bind(key)
        .bind(status.as_str())
        .bind(v.method)
        .bind(&req.card_token)
        .bind(&v.brand)
        .bind(&v.last4)
        .bind(&v.fingerprint)
        .bind(&v.vpa)
        .bind(req.amount)
        .bind(v.tax)
        .bind(v.currency.as_str())
        .bind(i64::from(req.capture.unwrap_or(true)))
        .bind(&req.billing_country)
        .bind(i64::from(verdict.score))
        .bind(serde_json::to_string(&verdict.reasons).map_err(StoreError::from)?)
        .bind(verdict.rejected.then_some("fraud_suspected"))
        .bind(now.as_micros())
        .bind(&hash)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if inserted == 0 {
            // A concurrent attempt with this key got there first: resume it.
            tx.rollback().await?;
            let p = self
                .by_key(user_id, key, &hash)
                .await?
                .ok_or_else(not_found)?;
            return self.advance(ctx, p).await;
        }
        let p = self.find_in(&mut tx, &id).await?;
        if verdict.rejected {
            tracing::info!(payment_id = %id, score = verdict.score, reasons = ?verdict.reasons, "payment declined by fraud rules");
            self.emit(&mut tx, ctx, "payment.declined", &p).await?;
        }
        tx.commit().await?;
        self.relay.notify();
        self.advance(ctx, p).await
    }

    async fn find_in(&self, tx: &mut Tx, id: &str) -> Result<Payment, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM transactions WHERE id = $1");
        let row = flowline_store::on_tx!(tx, |c| sqlx::query(&sql)
            .bind(id)
            .fetch_one(c)
            .await
            .map(|r| decode(&r)))?;
        payment(row?)
    }

    async fn validate(&self, user_id: &str, req: &NewPayment) -> Result<Validated, ApiError> {
        let mut errors: Vec<(&str, String)> = Vec::new();
        let currency = Currency::parse(&req.currency);
        if currency.is_err() {
            errors.push(("currency", "an ISO 4217 code, e.g. BRL".into()));
        }
        if !(1..=100_000_000_000).contains(&req.amount) {
            errors.push(("amount", "1 to 100000000000 minor units".into()));
        }
        let tax = req.tax_amount.unwrap_or(0);
        if tax < 0 || tax > req.amount.max(0) {
            errors.push(("tax_amount", "0 to amount".into()));
        }
        if let Some(o) = &req.order_id {
            if o.is_empty() || o.len() > 100 || !o.bytes().all(|b| b.is_ascii_graphic()) {
                errors.push(("order_id", "1 to 100 visible ASCII characters".into()));
            }
        }
        if let Some(c) = &req.billing_country {
            if c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
                errors.push(("billing_country", "ISO 3166 alpha-2, e.g. BR".into()));
            }
        }
        let method = match req.method.as_str() {
            "card" | "credit_card" => "card",
            "upi" => "upi",
            _ => {
                errors.push(("method", "card or upi".into()));
                "card"
            }
        };
        if !errors.is_empty() {
            let mut p =
                Problem::new(ErrorCode::ValidationFailed).with_detail("the payment is not valid");
            for (f, m) in errors {
                p = p.with_field(f, m);
            }
            return Err(p.into());
        }
        let currency = currency.expect("checked");
        if method == "upi" {
            if req.card_token.is_some() {
                return Err(Problem::new(ErrorCode::ValidationFailed)
                    .with_field("card_token", "not with method upi")
                    .into());
            }
            let vpa = card::check_vpa(req.vpa.as_deref().unwrap_or(""))?;
            return Ok(Validated {
                method: "upi",
                currency,
                tax,
                brand: None,
                last4: None,
                fingerprint: self.fingerprint(&vpa),
                country: Some("IN".into()),
                vpa: Some(vpa),
            });
        }
        let Some(token) = &req.card_token else {
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_detail("a card payment needs card_token (from POST /api/v1/payments/tokens)")
                .with_field("card_token", "required for method card")
                .into());
        };
        let row: Option<(String, String, String, String)> = flowline_store::on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT brand, last4, fingerprint, country FROM card_tokens WHERE id = $1 AND user_id = $2"
        )
        .bind(token)
        .bind(user_id)
        .fetch_optional(p)
        .await)
        .map_err(StoreError::from)?;
        let Some((brand, last4, fingerprint, country)) = row else {
            return Err(Problem::new(ErrorCode::InvalidCard)
                .with_detail("no such card token")
                .with_field("card_token", "unknown")
                .into());
        };
        Ok(Validated {
            method: "card",
            currency,
            tax,
            brand: Some(brand),
            last4: Some(last4),
            fingerprint,
            country: Some(country),
            vpa: None,
        })
    }

    /// Drives a payment as far as it can go now: authorize a PENDING one,
    /// capture an AUTHORIZED one that asked for it. Anything else is returned
    /// as it is.
    async fn advance(&self, ctx: &RequestContext, mut p: Payment) -> Result<Payment, ApiError> {
        if p.status == Status::Pending {
            let instrument = match (&p.card_token, &p.vpa) {
                (Some(token), _) => Instrument::Card { token },
                (None, Some(vpa)) => Instrument::Upi { vpa },
                _ => return Err(Problem::new(ErrorCode::Internal).into()),
            };
            let outcome = self
                .call(|| {
                    self.provider
                        .authorize(&p.id, instrument, p.amount, &p.currency)
                })
                .await;
            let outcome = match outcome {
                Ok(o) => Some(o),
                Err(_) => self.ask(&p.id).await?,
            };
            p = match outcome {
                Some(Outcome::Approved) => {
                    self.transition(ctx, &p, Status::Authorized, None, "payment.authorized")
                        .await?
                }
                Some(Outcome::Declined(r)) => {
                    self.transition(ctx, &p, Status::Declined, Some(&r), "payment.declined")
                        .await?
                }
                // Still unknown: stays PENDING for the reconciler.
                None => return Ok(p),
            };
        }
        if p.status == Status::Authorized && p.auto_capture {
            p = self.capture_authorized(ctx, p).await?;
        }
        Ok(p)
    }

    /// The provider's own account of a reference, after our calls ran out.
    async fn ask(&self, reference: &str) -> Result<Option<Outcome>, ApiError> {
        let status = self.call(|| self.provider.status(reference)).await;
        Ok(match status {
            Ok(ChargeStatus::Authorized | ChargeStatus::Captured) => Some(Outcome::Approved),
            Ok(ChargeStatus::Declined(r)) => Some(Outcome::Declined(r)),
            Ok(ChargeStatus::Voided) => Some(Outcome::Declined("voided".into())),
            Ok(ChargeStatus::Unknown) | Err(_) => None,
        })
    }

    /// One provider call with a deadline, retried on timeouts and outages.
    /// Safe because every call is keyed by our reference.
    async fn call<'a, T, F>(&'a self, f: F) -> Result<T, ProviderError>
    where
        F: Fn() -> flowline_http::BoxFuture<'a, Result<T, ProviderError>>,
    {
        let mut last = ProviderError::Timeout;
        for attempt in 0..self.cfg.provider_attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(25 << attempt.min(6))).await;
            }
            match tokio::time::timeout(self.cfg.provider_timeout, f()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => last = e,
                Err(_) => last = ProviderError::Timeout,
            }
        }
        Err(last)
    }

    async fn capture_authorized(
        &self,
        ctx: &RequestContext,
        p: Payment,
    ) -> Result<Payment, ApiError> {
        let outcome = match self.call(|| self.provider.capture(&p.id, p.amount)).await {
            Ok(o) => o,
            Err(e) => match self.call(|| self.provider.status(&p.id)).await {
                Ok(ChargeStatus::Captured) => Outcome::Approved,
                // Still authorized: a later capture (or the reconciler) finishes it.
                _ => return Err(provider_down(&e)),
            },
        };
        match outcome {
            Outcome::Approved => {
                self.transition(ctx, &p, Status::Captured, None, "payment.captured")
                    .await
            }
            Outcome::Declined(reason) => {
                // The authorization is released so the customer's funds are not held.
                if let Err(e) = self.call(|| self.provider.void(&p.id)).await {
                    tracing::warn!(payment_id = %p.id, error = ?e, "void after a failed capture did not go through");
                }
                self.transition(ctx, &p, Status::Failed, Some(&reason), "payment.failed")
                    .await
            }
        }
    }

    /// Compare-and-set from the payment's current status and version, with its event.
    async fn transition(
        &self,
        ctx: &RequestContext,
        p: &Payment,
        to: Status,
        reason: Option<&str>,
        event: &str,
    ) -> Result<Payment, ApiError> {
        let mut tx = self.db.begin().await?;
        let n = flowline_store::on_tx!(&mut tx, |c| {
            sqlx::query(
            "UPDATE transactions SET status = $3, decline_reason = COALESCE($4, decline_reason),
                version = version + 1, updated_at = $5
             WHERE id = $1 AND version = $2"
        )
        .bind(&p.id)
        .bind(p.version)
        .bind(to.as_str())
        .bind(reason)
        .bind(Timestamp::now().as_micros())
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        })
        .map_err(StoreError::from)?;
        if n == 0 {
            // Someone else moved it on: report what it is now.
            tx.rollback().await?;
            return self.get(&p.id).await;
        }
        let next = self.find_in(&mut tx, &p.id).await?;
        self.emit(&mut tx, ctx, event, &next).await?;
        tx.commit().await?;
        self.relay.notify();
        Ok(next)
    }

    async fn emit(
        &self,
        tx: &mut Tx,
        ctx: &RequestContext,
        kind: &str,
        p: &Payment,
    ) -> Result<(), StoreError> {
        let mut payload = serde_json::json!({
            "payment_id": p.id, "order_id": p.order_id, "user_id": p.user_id, "status": p.status,
            "amount": p.amount, "tax_amount": p.tax_amount, "currency": p.currency, "method": p.method,
            "reason": p.decline_reason, "fraud_score": p.fraud.score,
        });
        if kind == "payment.captured" {
            payload["captured_at"] = p.updated_at.clone().into();
        }
        self.emit_raw(tx, ctx, kind, p, payload).await
    }

    async fn emit_raw(
        &self,
        tx: &mut Tx,
        ctx: &RequestContext,
        kind: &str,
        p: &Payment,
        payload: serde_json::Value,
    ) -> Result<(), StoreError> {
        // Keyed by order, so one order's payment events stay in order.
        let key = p.order_id.as_deref().unwrap_or(&p.id);
        let ev = Envelope::stamp(
            EventDraft::new(TOPIC, kind, key, payload),
            &ctx.correlation_id,
            Some(&ctx.request_id),
        );
        outbox::enqueue(tx, &ev).await
    }

    /// Captures an authorized payment; capturing a captured one is a no-op.
    pub async fn capture(&self, ctx: &RequestContext, id: &str) -> Result<Payment, ApiError> {
        let p = self.get(id).await?;
        match p.status {
            Status::Authorized => self.capture_authorized(ctx, p).await,
            Status::Captured | Status::PartiallyRefunded | Status::Refunded => Ok(p),
            _ => Err(invalid_state(&p, "captured")),
        }
    }

    /// Refunds part or all of what remains captured. `key` names this
    /// refund: a retry with it resumes the same refund (the provider
    /// deduplicates by refund id) and never makes a second one.
    pub async fn refund(
        &self,
        ctx: &RequestContext,
        id: &str,
        key: &str,
        req: RefundRequest,
    ) -> Result<Payment, ApiError> {
        // Twice at most: a concurrent request with the same key may win the insert.
        for _ in 0..2 {
            let existing: Option<(String, i64, i64, String)> =
                flowline_store::on_pool!(write &self.db, |p| sqlx::query_as(
                    "SELECT id, amount, tax_amount, status FROM refunds WHERE payment_id = $1 AND idempotency_key = $2"
                )
                .bind(id)
                .bind(key)
                .fetch_optional(p)
                .await)
                .map_err(StoreError::from)?;
            if let Some((refund_id, amount, tax, status)) = existing {
                if req.amount.is_some_and(|a| a != amount) {
                    return Err(Problem::new(ErrorCode::IdempotencyKeyReused)
                        .with_detail("this key already refunded another amount")
                        .into());
                }
                return match status.as_str() {
                    "PENDING" => self.settle_refund(ctx, id, &refund_id, amount, tax).await,
                    "SUCCEEDED" => self.get(id).await,
                    _ => Err(Problem::new(ErrorCode::InvalidState)
                        .with_detail("the provider refused this refund; use a new key to try again")
                        .into()),
                };
            }
            if let Some(held) = self.hold_refund(id, key, &req).await? {
                return self.settle_refund(ctx, id, &held.0, held.1, held.2).await;
            }
        }
        Err(Problem::new(ErrorCode::IdempotencyKeyInProgress).into())
    }

    /// Holds a refund's amount on the payment and records it PENDING, in one
    /// transaction. `None` when another request with the key got there first.
    async fn hold_refund(
        &self,
        id: &str,
        key: &str,
        req: &RefundRequest,
    ) -> Result<Option<(String, i64, i64)>, ApiError> {
        let p = self.get(id).await?;
        if !matches!(p.status, Status::Captured | Status::PartiallyRefunded) {
            return Err(invalid_state(&p, "refunded"));
        }
        if let Some(c) = &req.currency {
            if c != &p.currency {
                return Err(Problem::new(ErrorCode::CurrencyMismatch)
                    .with_detail(format!("the payment is in {}", p.currency))
                    .with_field("currency", format!("must be {}", p.currency))
                    .into());
            }
        }
        let remaining = p.amount - p.refunded_amount - p.refund_pending;
        let amount = req.amount.unwrap_or(remaining);
        if amount <= 0 {
            return Err(Problem::new(ErrorCode::ValidationFailed)
                .with_field("amount", "a positive number of minor units")
                .into());
        }
        let exceeds = |remaining: i64| -> ApiError {
            Problem::new(ErrorCode::RefundExceedsCapture)
                .with_detail(format!("{remaining} remains refundable"))
                .with_field("amount", format!("at most {remaining}"))
                .into()
        };
        if amount > remaining {
            return Err(exceeds(remaining));
        }
        let refund_id = flowline_core::id::new_id().to_string();
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        // The hold takes the payment's row lock: concurrent refunds queue here,
        // so the check and the tax share below see every earlier hold.
        let n = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE transactions SET refund_pending = refund_pending + $2, version = version + 1, updated_at = $3
             WHERE id = $1 AND refunded_amount + refund_pending + $2 <= amount
               AND status IN ('CAPTURED', 'PARTIALLY_REFUNDED')"
        )
        .bind(id)
        .bind(amount)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if n == 0 {
            tx.rollback().await?;
            return Err(exceeds(
                self.get(id)
                    .await
                    .map(|p| p.amount - p.refunded_amount - p.refund_pending)
                    .unwrap_or(0),
            ));
        }
        let (total, tax_total, active): (i64, i64, i64) = flowline_store::on_tx!(&mut tx, |c| sqlx::query_as(
            "SELECT amount, tax_amount, refunded_amount + refund_pending FROM transactions WHERE id = $1"
        )
        .bind(id)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?;
        let taxed: Option<i64> = flowline_store::on_tx!(&mut tx, |c| sqlx::query_scalar(
            "SELECT CAST(SUM(tax_amount) AS BIGINT) FROM refunds WHERE payment_id = $1 AND status <> 'FAILED'"
        )
        .bind(id)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?;
        // Cut cumulatively: the shares of all refunds add up to the payment's tax.
        let share = (i128::from(tax_total) * i128::from(active) / i128::from(total)) as i64;
        let tax = (share - taxed.unwrap_or(0)).clamp(0, amount);
        let inserted = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO refunds (id, payment_id, idempotency_key, amount, tax_amount, status, created_at)
             VALUES ($1, $2, $3, $4, $5, 'PENDING', $6) ON CONFLICT (payment_id, idempotency_key) DO NOTHING"
        )
        .bind(&refund_id)
        .bind(id)
        .bind(key)
        .bind(amount)
        .bind(tax)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some((refund_id, amount, tax)))
    }

    /// Sends a held refund to the provider and records the outcome.
    async fn settle_refund(
        &self,
        ctx: &RequestContext,
        id: &str,
        refund_id: &str,
        amount: i64,
        tax: i64,
    ) -> Result<Payment, ApiError> {
        let outcome = self
            .call(|| self.provider.refund(id, refund_id, amount))
            .await;
        let (ok, err) = match outcome {
            Ok(Outcome::Approved) => (true, None),
            Ok(Outcome::Declined(r)) => (
                false,
                Some(ApiError::from(
                    Problem::new(ErrorCode::InvalidState)
                        .with_detail(format!("the provider refused the refund: {r}")),
                )),
            ),
            // Unknown: stays PENDING (held) for the reconciler, which resends it by its id.
            Err(e) => return Err(provider_down(&e)),
        };
        let now = Timestamp::now();
        let mut tx = self.db.begin().await?;
        let n = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE refunds SET status = $2 WHERE id = $1 AND status = 'PENDING'"
        )
        .bind(refund_id)
        .bind(if ok { "SUCCEEDED" } else { "FAILED" })
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if n == 0 {
            // Settled by someone else already.
            tx.rollback().await?;
            return self.get(id).await;
        }
        // Success moves the hold to refunded money; failure releases it.
        let sql = if ok {
            "UPDATE transactions SET refunded_amount = refunded_amount + $2, refund_pending = refund_pending - $2,
                status = CASE WHEN refunded_amount + $2 = amount THEN 'REFUNDED' ELSE 'PARTIALLY_REFUNDED' END,
                version = version + 1, updated_at = $3 WHERE id = $1"
        } else {
            "UPDATE transactions SET refund_pending = refund_pending - $2, version = version + 1, updated_at = $3
             WHERE id = $1"
        };
        flowline_store::on_tx!(&mut tx, |c| sqlx::query(sql)
            .bind(id)
            .bind(amount)
            .bind(now.as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        let p = self.find_in(&mut tx, id).await?;
        if ok {
            let payload = serde_json::json!({
                "payment_id": p.id, "refund_id": refund_id, "order_id": p.order_id, "user_id": p.user_id,
                "amount": amount, "tax_amount": tax, "currency": p.currency, "refunded_total": p.refunded_amount,
                "status": p.status, "refunded_at": now.to_rfc3339(),
            });
            self.emit_raw(&mut tx, ctx, "payment.refunded", &p, payload)
                .await?;
        }
        tx.commit().await?;
        self.relay.notify();
        match err {
            Some(e) => Err(e),
            None => Ok(p),
        }
    }

    /// Drives work a crash or an unanswered provider left behind: PENDING
    /// payments and refunds older than `min_age`, and AUTHORIZED payments
    /// that asked to be captured. A PENDING payment the provider says it
    /// never saw, `give_up` after it was made, is FAILED (and voided, in case
    /// the authorization lands late). Returns how many it moved.
    pub async fn reconcile(&self, min_age: Duration, give_up: Duration) -> Result<usize, ApiError> {
        let now = Timestamp::now();
        let before = now.saturating_sub(min_age).as_micros();
        let sql = format!(
            "SELECT {COLUMNS} FROM transactions
             WHERE (status = 'PENDING' OR (status = 'AUTHORIZED' AND auto_capture = 1)) AND updated_at < $1
             ORDER BY updated_at LIMIT 100"
        );
        let rows = flowline_store::on_pool!(&self.db, |p| sqlx::query(&sql)
            .bind(before)
            .fetch_all(p)
            .await
            .map(|rows| rows.iter().map(decode).collect::<Vec<_>>()))
        .map_err(StoreError::from)?;
        let mut moved = 0;
        for row in rows {
            let p = payment(row?)?;
            // Marks the attempt, so one stuck payment does not head every pass.
            flowline_store::on_pool!(write & self.db, |c| sqlx::query(
                "UPDATE transactions SET updated_at = $2 WHERE id = $1"
            )
            .bind(&p.id)
            .bind(Timestamp::now().as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?;
            let ctx = RequestContext::detached();
            let was = p.status;
            let stale = Timestamp::parse_rfc3339(&p.created_at)
                .map(|t| t < now.saturating_sub(give_up))
                .unwrap_or(false);
            // The touch above left the version alone, so `p` is still current.
            let q = match self.advance(&ctx, p.clone()).await {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(payment_id = %p.id, code = %e.0.code, "reconcile could not advance a payment");
                    continue;
                }
            };
            if q.status == Status::Pending && stale {
                // Only an explicit "never heard of it" fails the payment; no answer waits.
                if let Ok(ChargeStatus::Unknown) = self.call(|| self.provider.status(&q.id)).await {
                    let _ = self.call(|| self.provider.void(&q.id)).await;
                    if let Err(e) = self
                        .transition(
                            &ctx,
                            &q,
                            Status::Failed,
                            Some("provider_unreachable"),
                            "payment.failed",
                        )
                        .await
                    {
                        tracing::warn!(payment_id = %q.id, code = %e.0.code, "cannot fail a lost payment");
                    }
                    moved += 1;
                    continue;
                }
            }
            if q.status != was {
                moved += 1;
            }
        }
        let refunds: Vec<(String, String, i64, i64)> =
            flowline_store::on_pool!(&self.db, |p| sqlx::query_as(
                "SELECT id, payment_id, amount, tax_amount FROM refunds
             WHERE status = 'PENDING' AND created_at < $1 ORDER BY created_at LIMIT 100"
            )
            .bind(before)
            .fetch_all(p)
            .await)
            .map_err(StoreError::from)?;
        for (refund_id, payment_id, amount, tax) in refunds {
            let ctx = RequestContext::detached();
            match self
                .settle_refund(&ctx, &payment_id, &refund_id, amount, tax)
                .await
            {
                Ok(_) => moved += 1,
                Err(e) => {
                    tracing::warn!(%refund_id, code = %e.0.code, "reconcile could not settle a refund")
                }
            }
        }
        Ok(moved)
    }
}

/// A payment request's fingerprint (its canonical JSON).
fn request_hash(req: &NewPayment) -> String {
    let bytes = serde_json::to_vec(req).unwrap_or_default();
    Sha256::digest(&bytes)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Validated {
    method: &'static str,
    currency: Currency,
    tax: i64,
    brand: Option<String>,
    last4: Option<String>,
    fingerprint: String,
    country: Option<String>,
    vpa: Option<String>,
}

/// Reads a transactions row by column name (one decoder for both drivers).
fn decode<R>(row: &R) -> Result<Row, StoreError>
where
    R: sqlx::Row,
    for<'c> &'c str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    Ok((
        row.try_get("id")?,
        row.try_get("user_id")?,
        row.try_get("order_id")?,
        row.try_get("status")?,
        row.try_get("method")?,
        row.try_get("card_token")?,
        row.try_get("card_brand")?,
        row.try_get("card_last4")?,
        row.try_get("vpa")?,
        row.try_get("amount")?,
        (
            row.try_get("tax_amount")?,
            row.try_get("currency")?,
            row.try_get("refunded_amount")?,
            row.try_get("auto_capture")?,
            row.try_get("fraud_score")?,
            row.try_get("fraud_reasons")?,
            row.try_get("decline_reason")?,
            row.try_get("version")?,
            row.try_get("created_at")?,
            row.try_get("updated_at")?,
            row.try_get("refund_pending")?,
        ),
    ))
}
