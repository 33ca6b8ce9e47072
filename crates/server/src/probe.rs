//! `probe`: a diagnostic context that exercises the whole kernel path a real
//! context uses — a write and its event commit in one transaction, the relay
//! moves the event to the log, and two consumer groups apply it through the
//! inbox. Mounted only when `probe.enabled = true`; the crash tests and the
//! demo drive it over HTTP.

use crate::app::AppState;
use crate::http::{ApiError, ApiJson, RequestContext};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use flowline_core::{Envelope, ErrorCode, EventDraft, Problem, RecordedEvent, Timestamp};
use flowline_store::outbox::{self, Relay};
use flowline_store::{inbox, ConsumerOptions, Db, EventLog, Handler, HandlerError, Migration};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const TOPIC: &str = "probe.events";
/// The consumer groups that apply probe events, each into its own rows.
pub const GROUPS: [&str; 2] = ["probe.applier", "probe.auditor"];

const MIGRATIONS: &[Migration] = &[Migration {
    scope: "probe",
    version: 1,
    name: "init",
    sqlite: "CREATE TABLE probe_writes (
            key TEXT NOT NULL, seq INTEGER NOT NULL, value TEXT NOT NULL, event_id TEXT NOT NULL,
            created_at INTEGER NOT NULL, PRIMARY KEY (key, seq));
        CREATE TABLE probe_applied (
            apply_no INTEGER PRIMARY KEY AUTOINCREMENT, consumer TEXT NOT NULL, key TEXT NOT NULL,
            seq INTEGER NOT NULL, event_id TEXT NOT NULL, applied_at INTEGER NOT NULL);
        CREATE INDEX probe_applied_key ON probe_applied (consumer, key, apply_no);",
    postgres: "CREATE TABLE probe_writes (
            key TEXT NOT NULL, seq BIGINT NOT NULL, value TEXT NOT NULL, event_id TEXT NOT NULL,
            created_at BIGINT NOT NULL, PRIMARY KEY (key, seq));
        CREATE TABLE probe_applied (
            apply_no BIGSERIAL PRIMARY KEY, consumer TEXT NOT NULL, key TEXT NOT NULL,
            seq BIGINT NOT NULL, event_id TEXT NOT NULL, applied_at BIGINT NOT NULL);
        CREATE INDEX probe_applied_key ON probe_applied (consumer, key, apply_no);",
}];

#[derive(Clone)]
pub struct Probe {
    db: Db,
    relay: Relay,
}

impl Probe {
    pub async fn start(
        db: Db,
        relay: Relay,
        log: &EventLog,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<(Probe, Vec<JoinHandle<()>>)> {
        migrate(&db).await?;
        let mut tasks = Vec::new();
        for group in GROUPS {
            let applier = Applier {
                db: db.clone(),
                group,
                failures: Mutex::default(),
            };
            let sub = log
                .subscribe(
                    ConsumerOptions::new(group, &[TOPIC]),
                    applier,
                    shutdown.clone(),
                )
                .await?;
            tasks.push(sub.task);
        }
        Ok((Probe { db, relay }, tasks))
    }
}

pub async fn migrate(db: &Db) -> anyhow::Result<()> {
    db.migrate(outbox::KERNEL_MIGRATIONS).await?;
    db.migrate(MIGRATIONS).await?;
    Ok(())
}

/// The probe context's part of the OpenAPI document.
#[derive(utoipa::OpenApi)]
#[openapi(paths(write, read))]
pub struct ProbeApi;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/probe/writes", post(write))
        .route("/probe/writes/{key}", get(read))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct WriteRequest {
    key: String,
    #[serde(default)]
    value: String,
    /// Makes the `probe.applier` group fail this many times before succeeding
    /// (exercises retries and dead letters).
    #[serde(default)]
    fail_times: u32,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct WriteResponse {
    key: String,
    seq: i64,
    #[schema(value_type = String, format = "uuid")]
    event_id: Uuid,
    correlation_id: String,
}

fn probe_of(state: &AppState) -> Result<&Probe, ApiError> {
    state
        .probe
        .as_ref()
        .ok_or_else(|| ApiError::from(Problem::new(ErrorCode::RouteNotFound)))
}

#[utoipa::path(post, path = "/api/v1/probe/writes", tag = "probe", request_body = WriteRequest,
    responses((status = 201, description = "Write and its `probe.written` event committed", body = WriteResponse),
        (status = 400, description = "Malformed JSON", body = flowline_http::ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "Probe context disabled", body = flowline_http::ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "Invalid key or value", body = flowline_http::ProblemDoc, content_type = "application/problem+json")))]
async fn write(
    State(state): State<Arc<AppState>>,
    Extension(ctx): Extension<RequestContext>,
    ApiJson(req): ApiJson<WriteRequest>,
) -> Result<(StatusCode, Json<WriteResponse>), ApiError> {
    let probe = probe_of(&state)?;
    if req.key.is_empty() || req.key.len() > 128 || req.key.chars().any(char::is_control) {
        return Err(Problem::new(ErrorCode::ValidationFailed)
            .with_detail("key must be 1 to 128 printable characters")
            .with_field("key", "length 1..=128, no control characters")
            .into());
    }
    if req.value.len() > 4096 {
        return Err(Problem::new(ErrorCode::ValidationFailed)
            .with_field("value", "at most 4096 bytes")
            .into());
    }
    let mut tx = probe.db.begin().await?;
    if let flowline_store::Tx::Postgres(t) = &mut tx {
        // SQLite's BEGIN IMMEDIATE already serialises writers; PostgreSQL needs
        // a per-key lock so two writes to one key cannot take the same seq.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&req.key)
            .execute(&mut **t)
            .await
            .map_err(flowline_store::StoreError::from)?;
    }
    let seq: i64 = flowline_store::on_tx!(&mut tx, |c| sqlx::query_scalar(
        "SELECT coalesce(max(seq), 0) + 1 FROM probe_writes WHERE key = $1"
    )
    .bind(&req.key)
    .fetch_one(c)
    .await)
    .map_err(flowline_store::StoreError::from)?;
    let event = Envelope::stamp(
        EventDraft::new(
            TOPIC,
            "probe.written",
            &req.key,
            serde_json::json!({ "key": req.key, "seq": seq, "value": req.value, "fail_times": req.fail_times }),
        ),
        &ctx.correlation_id,
        Some(&ctx.request_id),
    );
    flowline_store::on_tx!(&mut tx, |c| sqlx::query(
        "INSERT INTO probe_writes (key, seq, value, event_id, created_at) VALUES ($1, $2, $3, $4, $5)"
    )
    .bind(&req.key)
    .bind(seq)
    .bind(&req.value)
    .bind(event.id.to_string())
    .bind(Timestamp::now().as_micros())
    .execute(c)
    .await
    .map(|_| ()))
    .map_err(flowline_store::StoreError::from)?;
    outbox::enqueue(&mut tx, &event).await?;
    tx.commit().await?;
    probe.relay.notify();
    tracing::info!(key = %req.key, seq, event_id = %event.id, "probe write committed");
    Ok((
        StatusCode::CREATED,
        Json(WriteResponse {
            key: req.key,
            seq,
            event_id: event.id,
            correlation_id: ctx.correlation_id,
        }),
    ))
}

#[utoipa::path(get, path = "/api/v1/probe/writes/{key}", tag = "probe",
    params(("key" = String, Path, description = "Write key")),
    responses((status = 200, description = "Writes and how many each consumer group applied", body = serde_json::Value),
        (status = 404, description = "No writes for the key", body = flowline_http::ProblemDoc, content_type = "application/problem+json")))]
async fn read(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let probe = probe_of(&state)?;
    let writes: i64 = flowline_store::on_pool!(&probe.db, |p| sqlx::query_scalar(
        "SELECT count(*) FROM probe_writes WHERE key = $1"
    )
    .bind(&key)
    .fetch_one(p)
    .await)
    .map_err(flowline_store::StoreError::from)?;
    if writes == 0 {
        return Err(Problem::new(ErrorCode::NotFound)
            .with_detail(format!("no writes for key `{key}`"))
            .into());
    }
    let mut applied = serde_json::Map::new();
    for group in GROUPS {
        let n: i64 = flowline_store::on_pool!(&probe.db, |p| sqlx::query_scalar(
            "SELECT count(*) FROM probe_applied WHERE consumer = $1 AND key = $2"
        )
        .bind(group)
        .bind(&key)
        .fetch_one(p)
        .await)
        .map_err(flowline_store::StoreError::from)?;
        applied.insert(group.to_owned(), n.into());
    }
    Ok(Json(
        serde_json::json!({ "key": key, "writes": writes, "applied": applied }),
    ))
}

/// Applies probe events exactly once per group, via the inbox.
struct Applier {
    db: Db,
    group: &'static str,
    /// Injected failures so far, per event (only for `probe.applier`).
    failures: Mutex<HashMap<Uuid, u32>>,
}

impl Handler for Applier {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let e = &ev.envelope;
        let key = e.payload["key"]
            .as_str()
            .ok_or_else(|| HandlerError::permanent("payload has no key"))?;
        let seq = e.payload["seq"]
            .as_i64()
            .ok_or_else(|| HandlerError::permanent("payload has no seq"))?;
        let fail_times = e.payload["fail_times"].as_u64().unwrap_or(0) as u32;
        if self.group == GROUPS[0] && fail_times > 0 {
            let mut f = self.failures.lock().expect("poisoned");
            let n = f.entry(e.id).or_default();
            if *n < fail_times {
                *n += 1;
                return Err(HandlerError::transient(format!(
                    "injected failure {n} of {fail_times}"
                )));
            }
        }
        let mut tx = self.db.begin().await?;
        if !inbox::claim(&mut tx, self.group, e.id).await? {
            tx.rollback().await?;
            return Ok(());
        }
        flowline_store::on_tx!(&mut tx, |c| {
            sqlx::query(
            "INSERT INTO probe_applied (consumer, key, seq, event_id, applied_at) VALUES ($1, $2, $3, $4, $5)"
        )
        .bind(self.group)
        .bind(key)
        .bind(seq)
        .bind(e.id.to_string())
        .bind(Timestamp::now().as_micros())
        .execute(c)
        .await
        .map(|_| ())
        })?;
        tx.commit().await?;
        Ok(())
    }
}
