//! flowline-core: the vocabulary every context shares.
//!
//! Pure data and pure functions: ids, timestamps, the event envelope and the
//! problem+json error catalogue. This crate does no I/O and pulls in no runtime,
//! so domain code can depend on it without dragging in tokio, sqlx or axum.

pub mod event;
pub mod id;
pub mod money;
pub mod problem;
pub mod time;

pub use event::{Envelope, EventDraft, RecordedEvent};
pub use money::{Currency, Money};
pub use problem::{ErrorCode, Problem};
pub use time::Timestamp;
