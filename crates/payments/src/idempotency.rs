//! Idempotency keys for requests that move money.
//!
//! The first request with a key claims it (a row insert: the database decides
//! between concurrent duplicates), runs, and stores its response. A repeat
//! with the same request gets that response again; with a different request,
//! 422 `idempotency_key_reused`; while the first is still running, it waits,
//! then gets 409 `idempotency_key_in_progress`. Keys live 24 hours. A claim
//! whose holder died (no answer for a lease) may be taken over: the handlers
//! resume from the state the first attempt left, so nothing happens twice.

use flowline_core::{ErrorCode, Problem, Timestamp};
use flowline_http::ApiError;
use flowline_store::{Db, StoreError};
use sha2::{Digest, Sha256};
use std::time::Duration;

pub const TTL: Duration = Duration::from_secs(24 * 3600);
/// How often a running holder refreshes its claim; the lease (how long an
/// unrefreshed claim is believed) must be well above it.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(20);

/// A response to keep and replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub status: u16,
    pub body: serde_json::Value,
}

pub enum Claim {
    /// This request runs, as the holder named here: keep the claim alive
    /// with [`heartbeat`], then [`finish`] or [`abandon`] it.
    Run(String),
    Replay(Stored),
}

/// The fingerprint of a request: its route and exact body.
pub fn request_hash(route: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update([0]);
    h.update(body);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks the header value: 1 to 255 visible ASCII characters.
pub fn parse_key(v: Option<&http::HeaderValue>) -> Result<String, ApiError> {
    let Some(v) = v else {
        return Err(Problem::new(ErrorCode::IdempotencyKeyRequired)
            .with_detail("send an Idempotency-Key header (e.g. a UUID) so a retry cannot pay twice")
            .into());
    };
    match v.to_str() {
        Ok(s) if !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(s.to_owned())
        }
        _ => Err(Problem::new(ErrorCode::MalformedRequest)
            .with_detail("Idempotency-Key must be 1 to 255 visible ASCII characters")
            .with_field("Idempotency-Key", "1 to 255 visible ASCII characters")
            .into()),
    }
}

type Row = (String, Option<i64>, Option<String>, i64, i64);

pub async fn claim(
    db: &Db,
    user: &str,
    key: &str,
    hash: &str,
    wait: Duration,
    lease: Duration,
) -> Result<Claim, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    let owner = flowline_core::id::new_id().to_string();
    loop {
        let now = Timestamp::now();
        let inserted = flowline_store::on_pool!(write db, |p| sqlx::query(
            "INSERT INTO idempotency_keys (user_id, idem_key, request_hash, created_at, locked_at, owner)
             VALUES ($1, $2, $3, $4, $4, $5) ON CONFLICT (user_id, idem_key) DO NOTHING"
        )
        .bind(user)
        .bind(key)
        .bind(hash)
        .bind(now.as_micros())
        .bind(&owner)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if inserted == 1 {
            return Ok(Claim::Run(owner));
        }
        let row: Option<Row> = flowline_store::on_pool!(write db, |p| sqlx::query_as(
            "SELECT request_hash, response_status, response_body, created_at, locked_at
             FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2"
        )
        .bind(user)
        .bind(key)
        .fetch_optional(p)
        .await)
        .map_err(StoreError::from)?;
        let Some((stored_hash, status, body, created, locked)) = row else {
            continue; // expired and pruned between the two statements
        };
        if created < now.saturating_sub(TTL).as_micros() {
            // Expired: the key is free again.
            delete_if(db, user, key, created).await?;
            continue;
        }
        if stored_hash != hash {
            return Err(Problem::new(ErrorCode::IdempotencyKeyReused)
                .with_detail(
                    "this Idempotency-Key was first used with a different request; use a new key",
                )
                .into());
        }
        if let (Some(status), Some(body)) = (status, body) {
            let body = serde_json::from_str(&body).map_err(StoreError::from)?;
            return Ok(Claim::Replay(Stored {
                status: status as u16,
                body,
            }));
        }
        if locked < now.saturating_sub(lease).as_micros() {
            // The first attempt's holder is gone: take the claim over.
            let took = flowline_store::on_pool!(write db, |p| sqlx::query(
                "UPDATE idempotency_keys SET locked_at = $4, owner = $5
                 WHERE user_id = $1 AND idem_key = $2 AND locked_at = $3 AND response_status IS NULL"
            )
            .bind(user)
            .bind(key)
            .bind(locked)
            .bind(now.as_micros())
            .bind(&owner)
            .execute(p)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?;
            if took == 1 {
                return Ok(Claim::Run(owner));
            }
            continue;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Problem::new(ErrorCode::IdempotencyKeyInProgress)
                .with_detail("the first request with this key is still running; retry shortly")
                .into());
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn delete_if(db: &Db, user: &str, key: &str, created: i64) -> Result<(), StoreError> {
    flowline_store::on_pool!(write db, |p| sqlx::query(
        "DELETE FROM idempotency_keys WHERE user_id = $1 AND idem_key = $2 AND created_at = $3"
    )
    .bind(user)
    .bind(key)
    .bind(created)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Refreshes a running holder's claim so it is not taken over.
pub async fn heartbeat(db: &Db, user: &str, key: &str, owner: &str) -> Result<(), StoreError> {
    flowline_store::on_pool!(write db, |p| sqlx::query(
        "UPDATE idempotency_keys SET locked_at = $4 WHERE user_id = $1 AND idem_key = $2 AND owner = $3"
    )
    .bind(user)
    .bind(key)
    .bind(owner)
    .bind(Timestamp::now().as_micros())
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Keeps the response for replays (only while `owner` still holds the claim).
pub async fn finish(
    db: &Db,
    user: &str,
    key: &str,
    owner: &str,
    r: &Stored,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(&r.body)?;
    flowline_store::on_pool!(write db, |p| sqlx::query(
        "UPDATE idempotency_keys SET response_status = $3, response_body = $4
         WHERE user_id = $1 AND idem_key = $2 AND owner = $5"
    )
    .bind(user)
    .bind(key)
    .bind(i64::from(r.status))
    .bind(&body)
    .bind(owner)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Frees the key after a server-side failure, so the client's retry runs again.
pub async fn abandon(db: &Db, user: &str, key: &str, owner: &str) -> Result<(), StoreError> {
    flowline_store::on_pool!(write db, |p| sqlx::query(
        "DELETE FROM idempotency_keys
         WHERE user_id = $1 AND idem_key = $2 AND owner = $3 AND response_status IS NULL"
    )
    .bind(user)
    .bind(key)
    .bind(owner)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?;
    Ok(())
}

/// Drops keys older than the TTL.
pub async fn prune(db: &Db) -> Result<u64, StoreError> {
    let before = Timestamp::now().saturating_sub(TTL).as_micros();
    Ok(flowline_store::on_pool!(write db, |p| sqlx::query(
        "DELETE FROM idempotency_keys WHERE created_at < $1"
    )
    .bind(before)
    .execute(p)
    .await
    .map(|r| r.rows_affected()))?)
}
