//! flowline-telemetry: what lets an operator see a data flow after the fact.
//!
//! - [`trace`]: every span gets a W3C trace id and span id. A span inherits
//!   them from its parent span, or from a `traceparent` field (an incoming
//!   request header, or the envelope of an event being handled), so a trace
//!   continues across the bus. Closed spans go to a bounded in-process buffer
//!   that the server drains into its trace store (and to OTLP when configured).
//! - [`redact`]: every log line passes through a redactor before it is written:
//!   emails are partially masked; passwords, tokens and card numbers never
//!   appear.
//! - `otlp` (cargo feature `otlp`): export of span batches as OTLP/HTTP JSON.

#[cfg(feature = "otlp")]
pub mod otlp;
pub mod redact;
pub mod trace;

pub use trace::{current_traceparent, SpanRecord, TraceContext, TraceLayer};
