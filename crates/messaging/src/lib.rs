//! Messaging context: workspaces, channels and messages, delivered live over
//! a WebSocket gateway and, for a user's own events, Server-Sent Events.
//!
//! - Every change of a channel (message, edit, delete, reaction) takes the
//!   channel's next sequence number under the channel row's write lock, is
//!   stored in `channel_events`, and its event enters the outbox, all in one
//!   transaction. Only then is it broadcast: the gateway of every node reads
//!   `messaging.messages` from the bus (never from the writer's memory), so
//!   fan-out across nodes takes the same path as fan-out within one.
//! - A connection remembers the last sequence it delivered per channel. A
//!   duplicate is dropped, a gap is filled from `channel_events`, and a client
//!   that resubscribes with its last seen sequence gets exactly what it
//!   missed.
//! - Presence counts a user's connections per node in the database, so
//!   several connections (or nodes) count once; the transitions are events on
//!   `messaging.presence`.
//! - A mention or direct message to a user with no live connection becomes a
//!   `message.missed` event, which the notifications context turns into an
//!   in-app and a push notification, once.
//! - Creating a workspace is the create-workspace saga (see [`saga`]).

pub mod consumers;
pub mod gateway;
mod metrics;
pub mod model;
pub mod routes;
pub mod saga;
mod service;
mod typing;

pub use consumers::{Directory, FeedWriter, DIRECTORY_GROUP, FEED_GROUP, FEED_TOPICS};
pub use gateway::{Fanout, Gateway, TokenCheck, FANOUT_TOPICS};
pub use metrics::GatewayMetrics;
pub use model::*;
pub use saga::{WelcomeSender, WORKSPACE_SAGA};
pub use service::{Access, FeedEntry, MessagePage, NewMessage, Presence, Typing, MAX_PAGE};

use flowline_saga::{Orchestrator, SagaOptions};
use flowline_store::outbox::{self, Relay};
use flowline_store::{Db, Migration, StoreError};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Channel changes: message.sent, message.edited, message.deleted,
/// reaction.added, reaction.removed. Key: the channel id.
pub const MESSAGES_TOPIC: &str = "messaging.messages";
/// message.missed: one per offline recipient of a mention or direct message
/// (key: the recipient). A topic of its own, so the notifier does not read
/// every message to find the few it must act on.
pub const NOTICES_TOPIC: &str = "messaging.notices";
/// presence.user_online, presence.user_offline (key: user id) and
/// presence.typing (key: channel id).
pub const PRESENCE_TOPIC: &str = "messaging.presence";
/// workspace.created, workspace.failed, channel.created, member.joined,
/// member.left (key: workspace id).
pub const WORKSPACES_TOPIC: &str = "messaging.workspaces";

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        scope: "messaging",
        version: 1,
        name: "workspaces, channels, messages, channel events, presence, feed",
        sqlite: include_str!("../migrations/sqlite/0001_messaging.sql"),
        postgres: include_str!("../migrations/postgres/0001_messaging.sql"),
    },
    Migration {
        scope: "messaging",
        version: 2,
        name: "presence node heartbeats",
        sqlite: include_str!("../migrations/sqlite/0002_presence_nodes.sql"),
        postgres: include_str!("../migrations/postgres/0002_presence_nodes.sql"),
    },
];

#[derive(Debug, Clone)]
pub struct MessagingConfig {
    /// This node's name: its presence rows and its fan-out group carry it.
    pub node_id: String,
    /// Longest message body, in characters.
    pub max_message_chars: usize,
    /// Largest WebSocket frame accepted, in bytes (larger: close 1009).
    pub max_frame_bytes: usize,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub send_queue: usize,
    /// Frames a client may send per second, sustained, and in a burst.
    pub client_rate_per_sec: f64,
    pub client_burst: u32,
    /// A connection without a token in its upgrade request must send
    /// `auth` within this.
    pub auth_timeout: Duration,
    /// How often the server pings; a connection silent for `idle_timeout`
    /// is closed.
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// How long a `typing` indication lasts on clients.
    pub typing_ttl: Duration,
    /// A node that has not renewed its presence heartbeat for this long is
    /// taken for dead: its users go offline (renewed every third of it).
    pub presence_ttl: Duration,
    /// Comment lines on idle SSE streams.
    pub sse_heartbeat: Duration,
    /// Saga options of the create-workspace saga.
    pub saga: SagaOptions,
    /// Create-workspace steps that fail on purpose (drills and tests).
    pub failpoints: Vec<String>,
}

impl Default for MessagingConfig {
    fn default() -> Self {
        MessagingConfig {
            node_id: "local".into(),
            max_message_chars: 4000,
            max_frame_bytes: 64 * 1024,
            send_queue: 512,
            client_rate_per_sec: 20.0,
            client_burst: 40,
            auth_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(60),
            typing_ttl: Duration::from_secs(5),
            presence_ttl: Duration::from_secs(15),
            sse_heartbeat: Duration::from_secs(15),
            saga: SagaOptions::default(),
            failpoints: Vec::new(),
        }
    }
}

/// The messaging context. Cheap to share behind an `Arc`.
pub struct Messaging {
    pub db: Db,
    relay: Relay,
    cfg: MessagingConfig,
    orchestrator: Arc<Orchestrator>,
    /// Ticks when the feed gains rows (SSE streams on this node wait on it).
    feed_added: watch::Sender<u64>,
    /// Who is typing: in memory, or in Redis once [`Messaging::share_typing`] ran.
    typing: std::sync::OnceLock<typing::Board>,
}

impl Messaging {
    /// Applies migrations; `welcome` sends the saga's welcome notification.
    pub async fn open(
        db: Db,
        relay: Relay,
        welcome: Arc<dyn WelcomeSender>,
        cfg: MessagingConfig,
    ) -> Result<Arc<Messaging>, StoreError> {
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        let defs = vec![saga::definition(db.clone(), welcome, &cfg.failpoints)];
        let orchestrator =
            Arc::new(Orchestrator::new(db.clone(), relay.clone(), defs, cfg.saga.clone()).await?);
        Ok(Arc::new(Messaging {
            db,
            relay,
            cfg,
            orchestrator,
            feed_added: watch::channel(0).0,
            typing: std::sync::OnceLock::new(),
        }))
    }

    /// Keeps the typing board in Redis (distributed mode), so every instance
    /// sees who is typing. Call before serving; later calls change nothing.
    pub fn share_typing(&self, conn: redis::aio::ConnectionManager, key_prefix: &str) {
        let _ = self.typing.set(typing::Board::Redis {
            conn,
            prefix: key_prefix.to_owned(),
        });
    }

    fn typing_board(&self) -> &typing::Board {
        self.typing
            .get_or_init(|| typing::Board::Memory(Default::default()))
    }

    pub fn config(&self) -> &MessagingConfig {
        &self.cfg
    }

    /// The create-workspace saga runner (the server runs it).
    pub fn orchestrator(&self) -> &Arc<Orchestrator> {
        &self.orchestrator
    }
}
