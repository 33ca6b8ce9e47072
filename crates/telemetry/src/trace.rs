//! Trace context on `tracing` spans, without an OpenTelemetry SDK.
//!
//! [`TraceLayer`] gives every span a trace id and a span id. The trace id
//! comes, in order of preference, from a `traceparent` field on the span (W3C
//! `00-<trace>-<parent span>-<flags>`: a request header or an event's
//! envelope, which is how a trace crosses the bus), a `trace_id` field (a
//! fresh request whose correlation id is a valid trace id), the parent span,
//! or a new random id. When a span closes, a [`SpanRecord`] goes to a bounded
//! buffer; [`drain`] empties it. Nothing is buffered until [`enable`] is
//! called, so CLI commands and libraries pay only for the id bookkeeping.
//!
//! Database work is not one span per statement (an order touches a hundred
//! rows): sqlx's per-statement events are counted into the enclosing span as
//! `db_calls` and `db_ms`.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// How many closed spans wait for the server's flusher at most; beyond it the
/// oldest are dropped (counted), so a stalled store never grows memory.
pub const BUFFER_CAPACITY: usize = 65_536;

static ENABLED: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static BUFFER: Mutex<VecDeque<SpanRecord>> = Mutex::new(VecDeque::new());

/// Starts buffering closed spans (the server calls this once its store is open).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Turns buffering on or off (benchmarks compare the two).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Takes every buffered span record.
pub fn drain() -> Vec<SpanRecord> {
    let mut b = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    b.drain(..).collect()
}

/// Spans dropped because the buffer was full.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Adds a record built outside a span (an event's time in the outbox).
pub fn record(r: SpanRecord) {
    if !enabled() {
        return;
    }
    let mut b = BUFFER.lock().unwrap_or_else(|e| e.into_inner());
    if b.len() >= BUFFER_CAPACITY {
        b.pop_front();
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
    b.push_back(r);
}

/// A W3C trace context: the trace and the span that is the parent of whatever
/// continues it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
}

impl TraceContext {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids and version `ff`
    /// are invalid, as the spec says.
    pub fn parse(s: &str) -> Option<TraceContext> {
        let mut parts = s.trim().split('-');
        let (v, t, p, f) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !(hex(v, 2) && v != "ff" && hex(t, 32) && hex(p, 16) && hex(f, 2)) {
            return None;
        }
        // Version 00 has exactly four fields; later versions may add more.
        if v == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = u128::from_str_radix(t, 16).ok()?;
        let span_id = u64::from_str_radix(p, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(TraceContext { trace_id, span_id })
    }

    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-01", self.trace_id, self.span_id)
    }
}

/// Parses a 32-hex trace id (a correlation id that is one).
pub fn parse_trace_id(s: &str) -> Option<u128> {
    (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u128::from_str_radix(s, 16).ok())
        .flatten()
        .filter(|t| *t != 0)
}

pub fn new_span_id() -> u64 {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

fn new_trace_id() -> u128 {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id;
        }
    }
}

/// A closed span, as the trace store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpanRecord {
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: Option<String>,
    /// `request`, `publish`, `event`, `saga.step`, ...
    pub name: String,
    /// Start, microseconds since the Unix epoch.
    pub start_us: i64,
    pub duration_us: i64,
    /// The span's fields (method, route, topic, group, step, status...).
    pub attrs: serde_json::Map<String, serde_json::Value>,
    /// Statements run while the span was current, and their total time.
    pub db_calls: u32,
    pub db_us: i64,
}

/// Span-local state kept in the registry's extensions.
struct SpanState {
    ctx: TraceContext,
    /// Only flows that start at a request (or continue one) are kept: a
    /// background loop's root span is not a trace anyone asked for.
    recorded: bool,
    parent: Option<u64>,
    start_us: i64,
    started: Instant,
    attrs: serde_json::Map<String, serde_json::Value>,
    db_calls: u32,
    db_us: i64,
}

/// The trace context of the current span, as a `traceparent` value to hand
/// to whatever continues the work (an event's envelope, an outgoing call).
pub fn current_traceparent() -> Option<String> {
    current_context().map(|c| c.to_string())
}

/// The current span's trace context, if a [`TraceLayer`] is installed and
/// the span belongs to a recorded trace.
pub fn current_context() -> Option<TraceContext> {
    tracing::Span::current().with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = registry.span(id)?;
        let ext = span.extensions();
        ext.get::<SpanState>().filter(|s| s.recorded).map(|s| s.ctx)
    })?
}

/// The layer that assigns trace contexts and records closed spans.
#[derive(Debug, Default, Clone, Copy)]
pub struct TraceLayer;

impl<S> Layer<S> for TraceLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        let inherited = || {
            let parent = if attrs.is_root() {
                None
            } else if let Some(p) = attrs.parent() {
                ctx.span(p)
            } else {
                ctx.lookup_current()
            };
            parent.and_then(|p| {
                p.extensions()
                    .get::<SpanState>()
                    .map(|s| (s.ctx, s.recorded))
            })
        };
        let (trace_id, parent, recorded) =
            match fields.traceparent.as_deref().and_then(TraceContext::parse) {
                Some(remote) => (remote.trace_id, Some(remote.span_id), true),
                None => match fields.trace_id.as_deref().and_then(parse_trace_id) {
                    Some(t) => (t, None, true),
                    None => match inherited() {
                        Some((p, recorded)) => (p.trace_id, Some(p.span_id), recorded),
                        None => (new_trace_id(), None, attrs.metadata().name() == "request"),
                    },
                },
            };
        let state = SpanState {
            recorded: recorded && !fields.untraced,
            ctx: TraceContext {
                trace_id,
                span_id: new_span_id(),
            },
            parent,
            start_us: now_us(),
            started: Instant::now(),
            attrs: fields.values,
            db_calls: 0,
            db_us: 0,
        };
        span.extensions_mut().insert(state);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Fields::default();
        values.record(&mut fields);
        let mut ext = span.extensions_mut();
        if let Some(state) = ext.get_mut::<SpanState>() {
            state.attrs.extend(fields.values);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        // sqlx reports each statement with its elapsed time on `sqlx::query`.
        if !enabled() || event.metadata().target() != "sqlx::query" {
            return;
        }
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut elapsed = Elapsed(0.0);
        event.record(&mut elapsed);
        let mut ext = span.extensions_mut();
        if let Some(state) = ext.get_mut::<SpanState>() {
            state.db_calls += 1;
            state.db_us += (elapsed.0 * 1e6) as i64;
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if !enabled() {
            return;
        }
        let Some(span) = ctx.span(&id) else { return };
        let Some(state) = span.extensions_mut().remove::<SpanState>() else {
            return;
        };
        if !state.recorded {
            return;
        }
        record(SpanRecord {
            trace_id: format!("{:032x}", state.ctx.trace_id),
            span_id: format!("{:016x}", state.ctx.span_id),
            parent_id: state.parent.map(|p| format!("{p:016x}")),
            name: span.name().to_owned(),
            start_us: state.start_us,
            duration_us: state.started.elapsed().as_micros() as i64,
            attrs: state.attrs,
            db_calls: state.db_calls,
            db_us: state.db_us,
        });
    }
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Fields {
    traceparent: Option<String>,
    trace_id: Option<String>,
    /// `untraced = true` on a root span: ids still flow, nothing is kept.
    untraced: bool,
    values: serde_json::Map<String, serde_json::Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        match field.name() {
            "traceparent" => self.traceparent = value.as_str().map(str::to_owned),
            "trace_id" => self.trace_id = value.as_str().map(str::to_owned),
            "untraced" => self.untraced = value.as_bool().unwrap_or(false),
            name => {
                self.values.insert(name.to_owned(), value);
            }
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

struct Elapsed(f64);

impl Visit for Elapsed {
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.0 = value;
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn traceparent_parses_per_spec() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(tp).expect("valid");
        assert_eq!(c.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.to_string(), tp);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        // A later version may carry more fields.
        assert!(TraceContext::parse(&format!("01{}-extra", &tp[2..])).is_some());
    }

    #[test]
    fn spans_inherit_and_continue_remote_contexts() {
        let subscriber = tracing_subscriber::registry().with(TraceLayer);
        tracing::subscriber::with_default(subscriber, || {
            enable();
            let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let outer = tracing::info_span!("request", traceparent = remote, route = "/x");
            let (outer_ctx, inner_ctx) = outer.in_scope(|| {
                let outer_ctx = current_context().expect("context");
                let inner = tracing::info_span!("inner", step = 3);
                let inner_ctx = inner.in_scope(|| current_context().expect("context"));
                (outer_ctx, inner_ctx)
            });
            assert_eq!(outer_ctx.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_eq!(inner_ctx.trace_id, outer_ctx.trace_id);
            assert_ne!(inner_ctx.span_id, outer_ctx.span_id);
            // A fresh root span other than a request is no trace anyone asked for.
            let other = tracing::info_span!("other");
            assert_eq!(other.in_scope(current_context), None);
            let fresh = tracing::info_span!("request");
            let fresh_ctx = fresh.in_scope(|| current_context().expect("context"));
            assert_ne!(fresh_ctx.trace_id, outer_ctx.trace_id);
            drop(fresh);
            // A request marked untraced keeps nothing (the console's polling).
            let quiet = tracing::info_span!("request", untraced = true);
            assert_eq!(quiet.in_scope(current_context), None);
            drop(quiet);
            drop(outer);
            drop(other);
            let recs: Vec<SpanRecord> = drain()
                .into_iter()
                .filter(|r| r.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736")
                .collect();
            let inner = recs.iter().find(|r| r.name == "inner").expect("inner");
            let req = recs.iter().find(|r| r.name == "request").expect("request");
            assert_eq!(req.parent_id.as_deref(), Some("00f067aa0ba902b7"));
            assert_eq!(inner.parent_id.as_deref(), Some(req.span_id.as_str()));
            assert_eq!(req.attrs["route"], "/x");
            assert_eq!(inner.attrs["step"], 3);
            assert!(!req.attrs.contains_key("traceparent"));
        });
    }
}
