//! The local trace store, and the request samples for analytics.
//!
//! Closed spans of request-driven flows are drained from the in-process
//! buffer every half second into the `traces` database (a SQLite file, or a
//! schema every instance shares on PostgreSQL, so a trace that crossed
//! instances is whole), pruned to `telemetry.max_spans`, and optionally
//! exported over OTLP. `flowline flows` and the admin routes read it.

use crate::app::AppState;
use crate::flows;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use flowline_core::{Envelope, ErrorCode, EventDraft, Problem, Timestamp};
use flowline_http::{ApiError, ApiQuery, ProblemDoc};
use flowline_store::{on_pool, on_tx, Db, EventLog, Migration, StoreError};
use flowline_telemetry::SpanRecord;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "traces",
    version: 1,
    name: "spans",
    sqlite: include_str!("../migrations/sqlite/traces_0001_spans.sql"),
    postgres: include_str!("../migrations/postgres/traces_0001_spans.sql"),
}];

/// Where `gateway.requests` samples go (consumed by analytics).
pub const REQUESTS_TOPIC: &str = "gateway.requests";

#[derive(Clone)]
pub struct TraceStore {
    db: Db,
    node: String,
    max_spans: i64,
}

/// A recent trace, for listings.
#[derive(Debug, Clone, Serialize)]
pub struct TraceSummary {
    pub trace_id: String,
    /// `POST /api/v1/orders`.
    pub root: String,
    pub status: Option<i64>,
    pub correlation_id: Option<String>,
    pub started_at: Timestamp,
    pub duration_ms: f64,
    pub spans: i64,
}

type SpanRow = (
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    String,
    i64,
    i64,
);

impl TraceStore {
    pub async fn open(db: Db, node: &str, max_spans: u64) -> Result<TraceStore, StoreError> {
        db.migrate(MIGRATIONS).await?;
        Ok(TraceStore {
            db,
            node: node.to_owned(),
            max_spans: max_spans.min(i64::MAX as u64) as i64,
        })
    }

    /// Writes a batch in one transaction.
    pub async fn insert(&self, spans: &[SpanRecord]) -> Result<(), StoreError> {
        if spans.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin().await?;
        for s in spans {
            let attrs = serde_json::to_string(&s.attrs)?;
            on_tx!(&mut tx, |c| {
                sqlx::query(
                "INSERT INTO trace_spans (trace_id, span_id, parent_id, name, start_us, duration_us,
                    attrs, db_calls, db_us, node) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            )
            .bind(&s.trace_id)
            .bind(&s.span_id)
            .bind(s.parent_id.as_deref())
            .bind(&s.name)
            .bind(s.start_us)
            .bind(s.duration_us)
            .bind(&attrs)
            .bind(i64::from(s.db_calls))
            .bind(s.db_us)
            .bind(&self.node)
            .execute(c)
            .await
            .map(|_| ())
            })?;
        }
        tx.commit().await
    }

    pub async fn count(&self) -> Result<i64, StoreError> {
        Ok(on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT COUNT(*) FROM trace_spans"
        )
        .fetch_one(p)
        .await)?)
    }

    /// Deletes the oldest spans beyond `max_spans`. Returns how many went.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        let top: Option<i64> = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT MAX(seq) FROM trace_spans"
        )
        .fetch_one(p)
        .await)?;
        let Some(top) = top else { return Ok(0) };
        let keep_from = top - self.max_spans;
        if keep_from <= 0 {
            return Ok(0);
        }
        Ok(on_pool!(write & self.db, |p| sqlx::query(
            "DELETE FROM trace_spans WHERE seq <= $1"
        )
        .bind(keep_from)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?)
    }

    pub async fn spans(&self, trace_id: &str) -> Result<Vec<SpanRecord>, StoreError> {
        let rows: Vec<SpanRow> = on_pool!(&self.db, |p| {
            sqlx::query_as(
            "SELECT trace_id, span_id, parent_id, name, start_us, duration_us, attrs, db_calls, db_us
             FROM trace_spans WHERE trace_id = $1 ORDER BY start_us, seq"
        )
        .bind(trace_id)
        .fetch_all(p)
        .await
        })?;
        rows.into_iter().map(span_of).collect()
    }

    /// Recent traces that started at a request, newest first.
    pub async fn recent(
        &self,
        limit: i64,
        correlation_id: Option<&str>,
        route: Option<&str>,
    ) -> Result<Vec<TraceSummary>, StoreError> {
        let rows: Vec<SpanRow> = on_pool!(&self.db, |p| {
            sqlx::query_as(
            "SELECT trace_id, span_id, parent_id, name, start_us, duration_us, attrs, db_calls, db_us
             FROM trace_spans WHERE name = 'request'
             ORDER BY seq DESC LIMIT $1"
        )
        .bind(if correlation_id.is_some() || route.is_some() {
            limit.saturating_mul(20).min(20_000)
        } else {
            limit
        })
        .fetch_all(p)
        .await
        })?;
        let mut roots: Vec<SpanRecord> = Vec::new();
        for r in rows {
            let s = span_of(r)?;
            let attr = |k: &str| s.attrs.get(k).and_then(|v| v.as_str());
            if correlation_id.is_some_and(|c| attr("correlation_id") != Some(c))
                || route.is_some_and(|r| attr("route") != Some(r))
                || roots.iter().any(|t| t.trace_id == s.trace_id)
            {
                continue;
            }
            roots.push(s);
            if roots.len() as i64 >= limit {
                break;
            }
        }
        // Span counts and ends of all of them, a query per 500 traces.
        let ids: Vec<&str> = roots.iter().map(|s| s.trace_id.as_str()).collect();
        let mut sizes: HashMap<String, (i64, Option<i64>)> = HashMap::new();
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT trace_id, COUNT(*), MAX(start_us + duration_us) FROM trace_spans
                 WHERE trace_id IN ({}) GROUP BY trace_id",
                placeholders(chunk.len())
            );
            let rows: Vec<(String, i64, Option<i64>)> = on_pool!(&self.db, |p| {
                let mut q = sqlx::query_as(&sql);
                for id in chunk {
                    q = q.bind(*id);
                }
                q.fetch_all(p).await
            })?;
            sizes.extend(rows.into_iter().map(|(id, n, end)| (id, (n, end))));
        }
        Ok(roots
            .into_iter()
            .map(|s| {
                let attr = |k: &str| s.attrs.get(k).and_then(|v| v.as_str()).map(str::to_owned);
                let (n, end) = sizes.get(&s.trace_id).copied().unwrap_or((1, None));
                let end = end.unwrap_or(s.start_us + s.duration_us);
                TraceSummary {
                    root: format!(
                        "{} {}",
                        attr("method").unwrap_or_default(),
                        attr("route").unwrap_or_default()
                    ),
                    status: s.attrs.get("status").and_then(|v| v.as_i64()),
                    correlation_id: attr("correlation_id"),
                    started_at: Timestamp::from_micros(s.start_us),
                    duration_ms: ((end - s.start_us) as f64 / 10.0).round() / 100.0,
                    spans: n,
                    trace_id: s.trace_id,
                }
            })
            .collect())
    }

    /// The spans of the `limit` most recent request traces (for the summary),
    /// a query per 500 traces.
    pub async fn recent_traces(&self, limit: i64) -> Result<Vec<Vec<SpanRecord>>, StoreError> {
        let recent = self.recent(limit, None, None).await?;
        let ids: Vec<&str> = recent.iter().map(|t| t.trace_id.as_str()).collect();
        let mut by_trace: HashMap<String, Vec<SpanRecord>> = HashMap::new();
        for chunk in ids.chunks(500) {
            let sql = format!(
                "SELECT trace_id, span_id, parent_id, name, start_us, duration_us, attrs, db_calls, db_us
                 FROM trace_spans WHERE trace_id IN ({}) ORDER BY start_us, seq",
                placeholders(chunk.len())
            );
            let rows: Vec<SpanRow> = on_pool!(&self.db, |p| {
                let mut q = sqlx::query_as(&sql);
                for id in chunk {
                    q = q.bind(*id);
                }
                q.fetch_all(p).await
            })?;
            for r in rows {
                let s = span_of(r)?;
                by_trace.entry(s.trace_id.clone()).or_default().push(s);
            }
        }
        Ok(recent
            .iter()
            .filter_map(|t| by_trace.remove(&t.trace_id))
            .collect())
    }
}

/// `$1, $2, …` (both drivers accept `$n`).
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn span_of(r: SpanRow) -> Result<SpanRecord, StoreError> {
    Ok(SpanRecord {
        trace_id: r.0,
        span_id: r.1,
        parent_id: r.2,
        name: r.3,
        start_us: r.4,
        duration_us: r.5,
        attrs: serde_json::from_str(&r.6)?,
        db_calls: r.7.clamp(0, u32::MAX as i64) as u32,
        db_us: r.8,
    })
}

/// Drains the span buffer into the store every half second until shutdown
/// (and once more after it), pruning now and then.
pub async fn run_flusher(
    store: TraceStore,
    #[cfg_attr(not(feature = "otlp"), allow(unused_variables))] otlp_endpoint: String,
    mut shutdown: watch::Receiver<bool>,
) {
    #[cfg(feature = "otlp")]
    let exporter = (!otlp_endpoint.is_empty()).then(|| {
        Arc::new(flowline_telemetry::otlp::OtlpExporter::new(
            otlp_endpoint,
            "flowline",
        ))
    });
    let mut passes = 0u64;
    loop {
        let stopping = *shutdown.borrow();
        let batch = flowline_telemetry::trace::drain();
        #[cfg(feature = "otlp")]
        if let Some(exp) = exporter.clone().filter(|_| !batch.is_empty()) {
            let copy = batch.clone();
            let sent = tokio::task::spawn_blocking(move || exp.export(&copy)).await;
            if let Ok(Err(e)) = sent {
                tracing::warn!(error = %e, "OTLP export failed; spans kept locally only");
            }
        }
        for chunk in batch.chunks(500) {
            if let Err(e) = store.insert(chunk).await {
                tracing::warn!(error = %e, spans = chunk.len(), "trace store write failed; spans dropped");
            }
        }
        passes += 1;
        if passes.is_multiple_of(20) {
            if let Err(e) = store.prune().await {
                tracing::warn!(error = %e, "trace store prune failed");
            }
        }
        if stopping {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

/// Per-request latency samples, published once a second as one event.
#[derive(Default)]
pub struct RequestSamples {
    buf: Mutex<Vec<serde_json::Value>>,
}

/// At most this many samples wait for a flush; beyond it they are dropped,
/// so a stalled log never grows memory.
const MAX_SAMPLES: usize = 10_000;

impl RequestSamples {
    pub fn push(&self, method: &str, route: &str, status: u16, elapsed: Duration, at: Timestamp) {
        let mut b = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() < MAX_SAMPLES {
            b.push(serde_json::json!({
                "method": method, "route": route, "status": status,
                "duration_ms": (elapsed.as_secs_f64() * 1e6).round() / 1e3,
                "at": at,
            }));
        }
    }

    fn take(&self) -> Vec<serde_json::Value> {
        std::mem::take(&mut *self.buf.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Publishes the samples to [`REQUESTS_TOPIC`] every second until shutdown.
pub async fn run_sampler(
    samples: Arc<RequestSamples>,
    log: EventLog,
    node: String,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stopping = *shutdown.borrow();
        let batch = samples.take();
        if !batch.is_empty() {
            let draft = EventDraft::new(
                REQUESTS_TOPIC,
                "http.requests_sampled",
                node.clone(),
                serde_json::json!({ "node": node, "samples": batch }),
            );
            let ev = Envelope::stamp(draft, &flowline_core::id::new_correlation_id(), None);
            if let Err(e) = log.append(&[ev]).await {
                tracing::warn!(error = %e, "request samples not published");
            }
        }
        if stopping {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
        }
    }
}

// --- admin routes ---

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/traces", get(list))
        .route("/admin/traces/{id}", get(show))
        .route("/admin/flows/summary", get(summary))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TraceParams {
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
    /// Only the trace of this correlation id (`X-Request-Id`).
    pub correlation_id: Option<String>,
    /// Only traces of this route template (`/api/v1/orders`).
    pub route: Option<String>,
}

fn store(state: &AppState) -> Result<&TraceStore, ApiError> {
    state.traces.as_ref().ok_or_else(|| {
        Problem::new(ErrorCode::NotFound)
            .with_detail("the trace store is off (telemetry.traces = false)")
            .into()
    })
}

fn check_limit(limit: Option<i64>, default: i64, max: i64) -> Result<i64, ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(Problem::new(ErrorCode::MalformedRequest)
            .with_field("limit", format!("1..={max}"))
            .into())
    }
}

#[utoipa::path(get, path = "/api/v1/admin/traces", tag = "admin", security(("bearer" = [])), params(TraceParams),
    responses((status = 200, description = "Recent request traces, newest first: {items: [{trace_id, root, status, correlation_id, started_at, duration_ms, spans}]}", body = Object),
        (status = 400, description = "Bad limit", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<TraceParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = check_limit(q.limit, 50, 500)?;
    let items = store(&state)?
        .recent(limit, q.correlation_id.as_deref(), q.route.as_deref())
        .await?;
    Ok(Json(serde_json::json!({ "items": items })))
}

#[utoipa::path(get, path = "/api/v1/admin/traces/{id}", tag = "admin", security(("bearer" = [])),
    params(("id" = String, Path, description = "Trace id (32 hex; the `x-trace-id` response header)")),
    responses((status = 200, description = "The trace: {trace_id, spans, diagram: {participants, messages}, mermaid}", body = Object),
        (status = 400, description = "Not a trace id", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "No such trace (or pruned)", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn show(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id = id.to_ascii_lowercase();
    if flowline_telemetry::trace::parse_trace_id(&id).is_none() {
        return Err(Problem::new(ErrorCode::MalformedRequest)
            .with_field("id", "32 hex digits, not all zero")
            .into());
    }
    let spans = store(&state)?.spans(&id).await?;
    if spans.is_empty() {
        return Err(Problem::new(ErrorCode::NotFound)
            .with_detail(format!("no trace {id} (unknown, or pruned)"))
            .into());
    }
    let diagram = flows::sequence(&spans);
    let mermaid = flows::mermaid(&diagram);
    Ok(Json(serde_json::json!({
        "trace_id": id, "spans": spans, "diagram": diagram, "mermaid": mermaid,
    })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SummaryParams {
    /// How many recent traces to aggregate: 1 to 2000 (default 200).
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/admin/flows/summary", tag = "admin", security(("bearer" = [])), params(SummaryParams),
    responses((status = 200, description = "The data-flow graph per endpoint from recent traces: {endpoints: [{endpoint, traces, hops: [{from, to, label, count, p50_ms, p99_ms}], mermaid}]}", body = Object),
        (status = 400, description = "Bad limit", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn summary(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<SummaryParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = check_limit(q.limit, 200, 2000)?;
    let traces = store(&state)?.recent_traces(limit).await?;
    Ok(Json(
        serde_json::json!({ "endpoints": flows::summary(&traces) }),
    ))
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(list, show, summary))]
pub struct TracesApi;

#[cfg(test)]
mod tests {
    use super::*;

    fn span(i: i64) -> SpanRecord {
        SpanRecord {
            trace_id: format!("{:032x}", i / 10 + 1),
            span_id: format!("{:016x}", i + 1),
            parent_id: None,
            name: if i % 10 == 0 { "request" } else { "publish" }.into(),
            start_us: 1_700_000_000_000_000 + i,
            duration_us: 10,
            attrs: serde_json::Map::new(),
            db_calls: 0,
            db_us: 0,
        }
    }

    #[tokio::test]
    async fn the_store_keeps_the_newest_spans_up_to_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let backend = flowline_store::Backend::Sqlite {
            dir: dir.path().to_path_buf(),
            durability: flowline_store::Durability::Full,
        };
        let store = TraceStore::open(Db::open(&backend, "traces").await.unwrap(), "n", 100)
            .await
            .unwrap();
        let spans: Vec<SpanRecord> = (0..250).map(span).collect();
        store.insert(&spans).await.unwrap();
        assert_eq!(store.prune().await.unwrap(), 150);
        assert_eq!(store.count().await.unwrap(), 100);
        // The oldest traces went; the newest are whole.
        assert!(store
            .spans(&format!("{:032x}", 1))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            store.spans(&format!("{:032x}", 25)).await.unwrap().len(),
            10
        );
        let recent = store.recent(3, None, None).await.unwrap();
        let ids: Vec<&str> = recent.iter().map(|t| t.trace_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                format!("{:032x}", 25),
                format!("{:032x}", 24),
                format!("{:032x}", 23)
            ]
        );
        assert_eq!(recent[0].spans, 10);
        assert_eq!(store.prune().await.unwrap(), 0);
    }
}
