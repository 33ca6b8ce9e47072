//! flowline-store: the SQL kernel every context is built on.
//!
//! - [`Db`]: one database per service, SQLite (file per service, WAL) or
//!   PostgreSQL (schema per service), with per-backend migrations.
//! - [`outbox`]: events commit in the same transaction as the state change that
//!   causes them; a [`outbox::Relay`] moves them to the log.
//! - [`EventLog`]: durable topics, partitions by key, consumer groups with
//!   committed offsets, retries, dead letters, retention and replay.
//! - [`NatsConfig`]: in distributed mode the log's events live in NATS
//!   JetStream instead (groups, leases and dead letters stay in SQL).
//! - [`inbox`]: a consumer records the event ids it applied in the transaction of
//!   its effect, so redelivery has no second effect.
//!
//! Every query is written once with `$n` placeholders and runs on both drivers;
//! the [`on_tx!`] / [`on_pool!`] macros expand it once per driver so each is type
//! checked against its own backend (sqlx's `Any` driver cannot do that).

#[macro_use]
mod db;
mod bus;
mod consumer;
mod error;
pub mod inbox;
mod log;
mod metrics;
mod migrate;
pub mod outbox;

pub use bus::NatsConfig;
pub use consumer::{ConsumerOptions, Handler, HandlerError, Subscription};
pub use db::{redact_url, Backend, Db, Durability, Tx};
pub use error::StoreError;
pub use log::{
    DeadLetter, EventLog, GroupPosition, LogOptions, ReplayFrom, TopicStats, DLQ_TOPIC_PREFIX,
};
pub use metrics::LogMetrics;
pub use migrate::Migration;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
