//! The payment provider boundary, and the built-in sandbox provider.
//!
//! Every money-moving call carries our reference (the payment id, or the
//! refund id), and a provider answers a repeated reference with the outcome it
//! already gave: that is what makes retries after a timeout safe. When retries
//! run out, `status` asks the provider what happened instead of guessing.

use crate::card::Card;
use flowline_http::BoxFuture;
use flowline_store::{Db, StoreError};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Approved,
    Declined(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// No answer in time: the call may or may not have taken effect.
    Timeout,
    Unavailable(String),
}

/// What the provider knows of a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChargeStatus {
    Unknown,
    Authorized,
    Captured,
    Voided,
    Declined(String),
}

/// A tokenized card as the provider reports it.
#[derive(Debug, Clone)]
pub struct ProviderCard {
    pub token: String,
    pub country: String,
}

#[derive(Debug, Clone, Copy)]
pub enum Instrument<'a> {
    Card { token: &'a str },
    Upi { vpa: &'a str },
}

pub trait Provider: Send + Sync {
    fn tokenize<'a>(&'a self, card: &'a Card)
        -> BoxFuture<'a, Result<ProviderCard, ProviderError>>;
    fn authorize<'a>(
        &'a self,
        reference: &'a str,
        instrument: Instrument<'a>,
        amount: i64,
        currency: &'a str,
    ) -> BoxFuture<'a, Result<Outcome, ProviderError>>;
    fn capture<'a>(
        &'a self,
        reference: &'a str,
        amount: i64,
    ) -> BoxFuture<'a, Result<Outcome, ProviderError>>;
    fn void<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<Outcome, ProviderError>>;
    fn refund<'a>(
        &'a self,
        reference: &'a str,
        refund_id: &'a str,
        amount: i64,
    ) -> BoxFuture<'a, Result<Outcome, ProviderError>>;
    fn status<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<ChargeStatus, ProviderError>>;
}

/// How a sandbox card or VPA behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Approve,
    Decline(&'static str),
    /// Authorizes, but the answer never arrives in time.
    Timeout,
    /// Authorizes; the capture is then declined.
    CaptureFails,
}

impl Behaviour {
    fn code(self) -> &'static str {
        match self {
            Behaviour::Approve => "approve",
            Behaviour::Decline(r) => r,
            Behaviour::Timeout => "timeout",
            Behaviour::CaptureFails => "capture_fails",
        }
    }

    fn parse(s: &str) -> Behaviour {
        match s {
            "approve" => Behaviour::Approve,
            "timeout" => Behaviour::Timeout,
            "capture_fails" => Behaviour::CaptureFails,
            "insufficient_funds" => Behaviour::Decline("insufficient_funds"),
            "expired_card" => Behaviour::Decline("expired_card"),
            _ => Behaviour::Decline("card_declined"),
        }
    }
}

/// The test numbers (documented in README): the familiar ones from card
/// payment sandboxes. Any other valid number approves, issued in the US.
fn card_behaviour(digits: &str) -> (Behaviour, &'static str) {
    match digits {
        "4000000000000002" => (Behaviour::Decline("card_declined"), "US"),
        "4000000000009995" => (Behaviour::Decline("insufficient_funds"), "US"),
        "4000000000000069" => (Behaviour::Decline("expired_card"), "US"),
        "4000000000000119" => (Behaviour::Timeout, "US"),
        "4000000000000341" => (Behaviour::CaptureFails, "US"),
        "4000000760000002" => (Behaviour::Approve, "BR"),
        "4000003560000008" => (Behaviour::Approve, "IN"),
        _ => (Behaviour::Approve, "US"),
    }
}

/// Test VPAs by their name part: `failure@…` declines, `timeout@…` times
/// out, `capturefail@…` fails at capture; anything else approves.
fn vpa_behaviour(vpa: &str) -> Behaviour {
    match vpa.split('@').next().unwrap_or("") {
        "failure" => Behaviour::Decline("card_declined"),
        "timeout" => Behaviour::Timeout,
        "capturefail" => Behaviour::CaptureFails,
        _ => Behaviour::Approve,
    }
}

/// A deterministic provider with durable state (its own `sandbox_*` tables),
/// so "ask the provider" works across restarts like a real one.
pub struct Sandbox {
    db: Db,
    latency: Duration,
}

impl Sandbox {
    pub fn new(db: Db, latency: Duration) -> Sandbox {
        Sandbox { db, latency }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    async fn behaviour(&self, instrument: &Instrument<'_>) -> Result<Behaviour, StoreError> {
        Ok(match instrument {
            Instrument::Upi { vpa } => vpa_behaviour(vpa),
            Instrument::Card { token } => {
                let b: Option<String> =
                    flowline_store::on_pool!(&self.db, |p| sqlx::query_scalar(
                        "SELECT behaviour FROM sandbox_cards WHERE token = $1"
                    )
                    .bind(*token)
                    .fetch_optional(p)
                    .await)?;
                b.map(|b| Behaviour::parse(&b))
                    .unwrap_or(Behaviour::Decline("card_declined"))
            }
        })
    }

    async fn charge(&self, reference: &str) -> Result<Option<(String, String, i64)>, StoreError> {
        Ok(flowline_store::on_pool!(write & self.db, |p| {
            sqlx::query_as(
                "SELECT status, behaviour, amount FROM sandbox_charges WHERE reference = $1",
            )
            .bind(reference)
            .fetch_optional(p)
            .await
        })?)
    }

    async fn set_status(&self, reference: &str, status: &str) -> Result<(), StoreError> {
        flowline_store::on_pool!(write & self.db, |p| sqlx::query(
            "UPDATE sandbox_charges SET status = $2 WHERE reference = $1"
        )
        .bind(reference)
        .bind(status)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// How many charges the sandbox holds for a reference (0 or 1): what
    /// "never charged twice" is checked against.
    pub async fn charges(&self, reference: &str) -> Result<i64, StoreError> {
        Ok(flowline_store::on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT count(*) FROM sandbox_charges WHERE reference = $1"
        )
        .bind(reference)
        .fetch_one(p)
        .await)?)
    }
}

fn unavailable(e: StoreError) -> ProviderError {
    ProviderError::Unavailable(e.to_string())
}

impl Provider for Sandbox {
    fn tokenize<'a>(
        &'a self,
        card: &'a Card,
    ) -> BoxFuture<'a, Result<ProviderCard, ProviderError>> {
        Box::pin(async move {
            self.delay().await;
            let (behaviour, country) = card_behaviour(&card.digits);
            let token = format!("tok_{}", flowline_core::id::new_id().simple());
            flowline_store::on_pool!(write & self.db, |p| sqlx::query(
                "INSERT INTO sandbox_cards (token, behaviour, country) VALUES ($1, $2, $3)"
            )
            .bind(&token)
            .bind(behaviour.code())
            .bind(country)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
            .map_err(|e| unavailable(e.into()))?;
            Ok(ProviderCard {
                token,
                country: country.to_owned(),
            })
        })
    }

    fn authorize<'a>(
        &'a self,
        reference: &'a str,
        instrument: Instrument<'a>,
        amount: i64,
        _currency: &'a str,
    ) -> BoxFuture<'a, Result<Outcome, ProviderError>> {
        Box::pin(async move {
            self.delay().await;
            let behaviour = self.behaviour(&instrument).await.map_err(unavailable)?;
            let status = match behaviour {
                Behaviour::Decline(r) => format!("declined:{r}"),
                _ => "authorized".to_owned(),
            };
            // A repeated reference finds its first outcome: one charge per reference.
            flowline_store::on_pool!(write & self.db, |p| sqlx::query(
                "INSERT INTO sandbox_charges (reference, status, behaviour, amount, refunded)
                 VALUES ($1, $2, $3, $4, 0) ON CONFLICT (reference) DO NOTHING"
            )
            .bind(reference)
            .bind(&status)
            .bind(behaviour.code())
            .bind(amount)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
            .map_err(|e| unavailable(e.into()))?;
            let (status, behaviour, _) = self
                .charge(reference)
                .await
                .map_err(unavailable)?
                .ok_or(ProviderError::Unavailable("charge vanished".into()))?;
            if behaviour == "timeout" {
                return Err(ProviderError::Timeout);
            }
            Ok(match status.strip_prefix("declined:") {
                Some(r) => Outcome::Declined(r.to_owned()),
                None => Outcome::Approved,
            })
        })
    }

    fn capture<'a>(
        &'a self,
        reference: &'a str,
        amount: i64,
    ) -> BoxFuture<'a, Result<Outcome, ProviderError>> {
        Box::pin(async move {
            self.delay().await;
            let Some((status, behaviour, authorized)) =
                self.charge(reference).await.map_err(unavailable)?
            else {
                return Ok(Outcome::Declined("no_authorization".into()));
            };
            match status.as_str() {
                "captured" => return Ok(Outcome::Approved),
                "authorized" => {}
                _ => return Ok(Outcome::Declined(format!("charge_{status}"))),
            }
            if behaviour == "capture_fails" {
                return Ok(Outcome::Declined("capture_failed".into()));
            }
            if amount > authorized {
                return Ok(Outcome::Declined("amount_too_large".into()));
            }
            self.set_status(reference, "captured")
                .await
                .map_err(unavailable)?;
            Ok(Outcome::Approved)
        })
    }

    fn void<'a>(&'a self, reference: &'a str) -> BoxFuture<'a, Result<Outcome, ProviderError>> {
        Box::pin(async move {
            self.delay().await;
            match self.charge(reference).await.map_err(unavailable)? {
                Some((s, _, _)) if s == "authorized" || s == "voided" => {
                    self.set_status(reference, "voided")
                        .await
                        .map_err(unavailable)?;
                    Ok(Outcome::Approved)
                }
                Some((s, _, _)) => Ok(Outcome::Declined(format!("charge_{s}"))),
                None => Ok(Outcome::Approved),
            }
        })
    }

    fn refund<'a>(
        &'a self,
        reference: &'a str,
        refund_id: &'a str,
        amount: i64,
    ) -> BoxFuture<'a, Result<Outcome, ProviderError>> {
        Box::pin(async move {
            self.delay().await;
            let Some((status, _, captured)) = self.charge(reference).await.map_err(unavailable)?
            else {
                return Ok(Outcome::Declined("no_charge".into()));
            };
            if status != "captured" {
                return Ok(Outcome::Declined(format!("charge_{status}")));
            }
            // Refunds are idempotent by refund id, and never exceed the capture.
            let mut tx = self.db.begin().await.map_err(unavailable)?;
            let new = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
                "INSERT INTO sandbox_refunds (refund_id, reference, amount) VALUES ($1, $2, $3)
                 ON CONFLICT (refund_id) DO NOTHING"
            )
            .bind(refund_id)
            .bind(reference)
            .bind(amount)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(|e| unavailable(e.into()))?;
            if new == 1 {
                let n = flowline_store::on_tx!(&mut tx, |c| sqlx::query(
                    "UPDATE sandbox_charges SET refunded = refunded + $2
                     WHERE reference = $1 AND refunded + $2 <= $3"
                )
                .bind(reference)
                .bind(amount)
                .bind(captured)
                .execute(c)
                .await
                .map(|r| r.rows_affected()))
                .map_err(|e| unavailable(e.into()))?;
                if n == 0 {
                    tx.rollback().await.map_err(unavailable)?;
                    return Ok(Outcome::Declined("refund_exceeds_charge".into()));
                }
            }
            tx.commit().await.map_err(unavailable)?;
            Ok(Outcome::Approved)
        })
    }

    fn status<'a>(
        &'a self,
        reference: &'a str,
    ) -> BoxFuture<'a, Result<ChargeStatus, ProviderError>> {
        Box::pin(async move {
            self.delay().await;
            Ok(match self.charge(reference).await.map_err(unavailable)? {
                None => ChargeStatus::Unknown,
                Some((s, _, _)) => match s.as_str() {
                    "authorized" => ChargeStatus::Authorized,
                    "captured" => ChargeStatus::Captured,
                    "voided" => ChargeStatus::Voided,
                    other => ChargeStatus::Declined(
                        other.strip_prefix("declined:").unwrap_or(other).to_owned(),
                    ),
                },
            })
        })
    }
}
