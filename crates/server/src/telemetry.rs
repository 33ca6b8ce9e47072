//! Logging and tracing. Logs are structured JSON for machines or compact for
//! terminals, redacted line by line (PII and secrets never reach the sink),
//! and carry the span fields (the correlation id) on every line. Beside them
//! the trace layer gives every span a W3C trace context and keeps the closed
//! spans of request-driven flows for the trace store.

use crate::config::{LogFormat, LogSettings};
use flowline_telemetry::redact::RedactingWriter;
use flowline_telemetry::TraceLayer;
use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// `traces`: whether spans are kept (`telemetry.traces`); only then does the
/// trace layer ask sqlx for its per-statement events, which sqlx formats on
/// every statement once anyone listens.
pub fn init(settings: &LogSettings, traces: bool) {
    let filter = EnvFilter::try_from_env("FLOWLINE_LOG")
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let writer = RedactingWriter::new(std::io::stderr);
    // No ANSI colours: escape codes between a field's name and its value
    // would hide `password=…` from the redactor.
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer);
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed()
    } else {
        fmt.compact().with_filter(filter).boxed()
    };
    // The trace layer sees every info span whatever the log level, and
    // sqlx's per-statement events (debug) to count database calls.
    let statements = if traces {
        LevelFilter::DEBUG
    } else {
        LevelFilter::OFF
    };
    let traces = Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("sqlx::query", statements);
    let result = tracing_subscriber::registry()
        .with(fmt)
        .with(TraceLayer.with_filter(traces))
        .try_init();
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
