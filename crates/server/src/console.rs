//! The admin console: one page with its script and stylesheet compiled into
//! the binary (`GET /console`), and the two admin reads it needs that no
//! context offers: recent events across topics (`GET /admin/events`, pollable
//! with a cursor) and consumer-group positions (`GET /admin/consumer-groups`).

use crate::app::AppState;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use flowline_core::{ErrorCode, Problem, RecordedEvent};
use flowline_http::{ApiError, ApiQuery, ProblemDoc};
use flowline_store::ReplayFrom;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("../assets/console/index.html");
const APP_JS: &str = include_str!("../assets/console/app.js");
const APP_CSS: &str = include_str!("../assets/console/app.css");

/// The page may load its own assets and call its own API, nothing else.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The public page and its assets (the page itself asks for a login).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/console", get(index))
        .route("/console/", get(index))
        .route("/console/app.js", get(script))
        .route("/console/app.css", get(stylesheet))
}

/// The admin reads, mounted (under `/api/v1`) behind the admin gate.
pub fn admin_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/events", get(events))
        .route("/admin/consumer-groups", get(consumer_groups))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    /// Only this topic (exact name).
    pub topic: Option<String>,
    /// Only this event type; a trailing `*` matches a prefix (`order.*`).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// The `cursor` of a previous answer: only events appended since.
    pub after: Option<String>,
}

/// Where a reader stands: the next offset of every partition it has seen.
#[derive(Debug, Default, PartialEq)]
struct Cursor(BTreeMap<String, BTreeMap<i32, i64>>);

impl Cursor {
    fn get(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0.get(topic)?.get(&partition).copied()
    }

    /// `c1` + hex of `topic\tpartition:offset,…\n…`: opaque to clients, safe in a URL.
    fn encode(&self) -> String {
        let mut text = String::new();
        for (topic, parts) in &self.0 {
            text.push_str(topic);
            text.push('\t');
            let parts: Vec<String> = parts.iter().map(|(p, o)| format!("{p}:{o}")).collect();
            text.push_str(&parts.join(","));
            text.push('\n');
        }
        let mut out = String::with_capacity(2 + text.len() * 2);
        out.push_str("c1");
        for b in text.bytes() {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    fn decode(s: &str) -> Option<Cursor> {
        let hex = s.strip_prefix("c1")?;
        if hex.len() % 2 != 0 || hex.len() > 1 << 16 {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut c = Cursor::default();
        for line in text.lines() {
            let (topic, parts) = line.split_once('\t')?;
            let entry = c.0.entry(topic.to_owned()).or_default();
            for part in parts.split(',').filter(|p| !p.is_empty()) {
                let (p, o) = part.split_once(':')?;
                let (p, o): (i32, i64) = (p.parse().ok()?, o.parse().ok()?);
                if p < 0 || o < 0 {
                    return None;
                }
                entry.insert(p, o);
            }
        }
        Some(c)
    }
}

fn type_matches(filter: Option<&str>, event_type: &str) -> bool {
    match filter {
        None => true,
        Some(f) => match f.strip_suffix('*') {
            Some(prefix) => event_type.starts_with(prefix),
            None => event_type == f,
        },
    }
}

fn name_ok(s: &str) -> bool {
    !s.is_empty() && s.len() <= 200 && !s.chars().any(char::is_control)
}

#[utoipa::path(get, path = "/api/v1/admin/events", tag = "admin", security(("bearer" = [])), params(EventParams),
    responses((status = 200, description = "Recent events across topics, newest first: {items: [{topic, partition, offset, appended_at, id, type, key, occurred_at, correlation_id, causation_id, schema_version, payload}], cursor, truncated, topics: [{topic, partitions, events, bytes}]}. Pass `cursor` back as `after` to get only what was appended since; `truncated` says some were left out (more than `limit`). Secret-looking payload fields are redacted", body = Object),
        (status = 400, description = "Bad topic, type, limit or cursor", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<EventParams>,
) -> Result<Json<Value>, ApiError> {
    let mut bad = Problem::new(ErrorCode::MalformedRequest);
    if q.topic.as_deref().is_some_and(|t| !name_ok(t)) {
        bad = bad.with_field("topic", "1 to 200 printable characters");
    }
    if q.event_type.as_deref().is_some_and(|t| !name_ok(t)) {
        bad = bad.with_field("type", "1 to 200 printable characters");
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        bad = bad.with_field("limit", "1..=1000");
    }
    let after = match q.after.as_deref() {
        None => None,
        Some(s) => match Cursor::decode(s) {
            Some(c) => Some(c),
            None => {
                bad = bad.with_field("after", "the `cursor` of a previous answer");
                None
            }
        },
    };
    if !bad.errors.is_empty() {
        return Err(bad.into());
    }
    let type_filter = q.event_type.as_deref();
    // Per partition, how far back to look: a type filter skips events, so it
    // scans further for the same number of matches.
    let scan = if type_filter.is_some() {
        (limit * 4).clamp(200, 2000)
    } else {
        limit
    };
    let topics = cached_topics(&state.log).await?;
    let mut items: Vec<RecordedEvent> = Vec::new();
    let mut next = Cursor::default();
    let mut truncated = false;
    for t in &topics {
        if q.topic.as_deref().is_some_and(|want| want != t.topic) {
            continue;
        }
        for (partition, end) in state.log.resolve(&t.topic, ReplayFrom::Latest).await? {
            next.0
                .entry(t.topic.clone())
                .or_default()
                .insert(partition, end);
            let from = match &after {
                None => (end - scan).max(0),
                Some(c) => {
                    // A partition the cursor has not seen is new: from its start.
                    let seen = c.get(&t.topic, partition).unwrap_or(0).min(end);
                    if end - seen > scan {
                        truncated = true;
                        end - scan
                    } else {
                        seen
                    }
                }
            };
            if from >= end {
                continue;
            }
            let read = state
                .log
                .read(&t.topic, partition, from, end - from)
                .await?;
            // Events appended after `end` was resolved come with the next poll.
            items.extend(
                read.into_iter().filter(|e| {
                    e.offset < end && type_matches(type_filter, &e.envelope.event_type)
                }),
            );
        }
    }
    items.sort_by(|a, b| {
        b.appended_at
            .cmp(&a.appended_at)
            .then_with(|| a.envelope.topic.cmp(&b.envelope.topic))
            .then_with(|| b.partition.cmp(&a.partition))
            .then_with(|| b.offset.cmp(&a.offset))
    });
    if items.len() > limit as usize {
        if after.is_some() {
            truncated = true;
        }
        items.truncate(limit as usize);
    }
    let mut items = serde_json::to_value(items).map_err(flowline_store::StoreError::from)?;
    flowline_saga::redact(&mut items);
    Ok(Json(json!({
        "items": items,
        "cursor": next.encode(),
        "truncated": truncated,
        "topics": topics,
    })))
}

/// The topic list with its counts, at most 5 s old: counting a topic's
/// events scans it, and every open console polls this each second.
async fn cached_topics(
    log: &flowline_store::EventLog,
) -> Result<Vec<flowline_store::TopicStats>, flowline_store::StoreError> {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};
    type Cached = Option<(Instant, Vec<flowline_store::TopicStats>)>;
    static CACHE: Mutex<Cached> = Mutex::new(None);
    if let Some((at, t)) = &*CACHE.lock().unwrap_or_else(|e| e.into_inner()) {
        if at.elapsed() < Duration::from_secs(5) {
            return Ok(t.clone());
        }
    }
    let topics = log.topics().await?;
    *CACHE.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), topics.clone()));
    Ok(topics)
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct GroupParams {
    /// Only this consumer group (exact name).
    pub group: Option<String>,
    /// Only partitions at least this far behind (0 or more; default 0).
    pub min_lag: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/admin/consumer-groups", tag = "admin", security(("bearer" = [])), params(GroupParams),
    responses((status = 200, description = "Every consumer group's position per partition: {items: [{group, topic, partition, position, end, lag}], groups: [{group, topic, partitions, lag}]}; `position` is the next offset the group consumes, `end` the next the log assigns", body = Object),
        (status = 400, description = "Bad group or min_lag", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = ProblemDoc, content_type = "application/problem+json")))]
pub async fn consumer_groups(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<GroupParams>,
) -> Result<Json<Value>, ApiError> {
    let mut bad = Problem::new(ErrorCode::MalformedRequest);
    if q.group.as_deref().is_some_and(|g| !name_ok(g)) {
        bad = bad.with_field("group", "1 to 200 printable characters");
    }
    let min_lag = q.min_lag.unwrap_or(0);
    if min_lag < 0 {
        bad = bad.with_field("min_lag", "0 or more");
    }
    if !bad.errors.is_empty() {
        return Err(bad.into());
    }
    let rows: Vec<_> = state
        .log
        .groups()
        .await?
        .into_iter()
        .filter(|g| q.group.as_deref().is_none_or(|want| want == g.group) && g.lag >= min_lag)
        .collect();
    let mut totals: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
    for g in &rows {
        let t = totals.entry((&g.group, &g.topic)).or_default();
        t.0 += 1;
        t.1 += g.lag;
    }
    let groups: Vec<Value> = totals
        .iter()
        .map(|((group, topic), (partitions, lag))| {
            json!({ "group": group, "topic": topic, "partitions": partitions, "lag": lag })
        })
        .collect();
    let items: Vec<Value> = rows
        .iter()
        .map(|g| {
            json!({ "group": g.group, "topic": g.topic, "partition": g.partition,
                "position": g.next_offset, "end": g.end_offset, "lag": g.lag })
        })
        .collect();
    Ok(Json(json!({ "items": items, "groups": groups })))
}

/// The console's part of the OpenAPI document (its admin reads; the page
/// itself is not an API).
#[derive(utoipa::OpenApi)]
#[openapi(paths(events, consumer_groups))]
pub struct ConsoleApi;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_and_garbage_is_refused() {
        let mut c = Cursor::default();
        c.0.entry("orders.events".into()).or_default().insert(0, 12);
        c.0.entry("orders.events".into()).or_default().insert(3, 0);
        c.0.entry("odd\u{e9} topic,:".into())
            .or_default()
            .insert(1, 7);
        let s = c.encode();
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
        assert_eq!(Cursor::decode(&s), Some(c));
        assert_eq!(
            Cursor::decode(&Cursor::default().encode()),
            Some(Cursor::default())
        );
        for bad in ["", "c1z", "c1abc", "x1", "c1746f70696309303a2d31"] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn type_filters_match_exactly_or_by_prefix() {
        assert!(type_matches(None, "order.created"));
        assert!(type_matches(Some("order.created"), "order.created"));
        assert!(!type_matches(Some("order"), "order.created"));
        assert!(type_matches(Some("order.*"), "order.created"));
        assert!(!type_matches(Some("order.*"), "orders.x"));
    }
}
