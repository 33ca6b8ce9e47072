//! The realtime gateway: `GET /api/v1/ws`.
//!
//! Each connection has a reader (this task: frames from the client,
//! authorization, rate limit) and a writer (a task that owns the socket's
//! sending half and a bounded queue). The bus consumer [`Fanout`] puts each
//! channel event into the queue of every local subscriber with `try_send`:
//! a full queue means the client is not keeping up, and it is told and
//! disconnected, so a slow reader costs at most `send_queue` frames.
//!
//! The writer remembers, per subscribed channel, the last sequence it
//! delivered: a duplicate is dropped and a gap is filled from the channel's
//! stored events before the frame that revealed it. A subscription with
//! `since` starts from there, so a reconnecting client gets exactly what it
//! missed, in order, then the live stream.

use crate::model::channel_frame;
use crate::{GatewayMetrics, Messaging, MESSAGES_TOPIC, PRESENCE_TOPIC, WORKSPACES_TOPIC};
use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use flowline_core::RecordedEvent;
use flowline_http::{ApiError, BoxFuture, Principal, RequestContext};
use flowline_store::{Handler, HandlerError};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Topics the fan-out consumer of every node reads.
pub const FANOUT_TOPICS: [&str; 4] = [
    MESSAGES_TOPIC,
    PRESENCE_TOPIC,
    WORKSPACES_TOPIC,
    "user.events",
];

/// The protocol version this server speaks.
pub const PROTOCOL_VERSION: u64 = 1;
/// Subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 1000;
/// The most changes one `subscribe` replays; further back is REST history.
pub const MAX_RESUME: i64 = 10_000;

/// Close codes (RFC 6455 and the 4000–4999 application range).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const UNAUTHENTICATED: u16 = 4001;
    pub const BANNED: u16 = 4003;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const IDLE: u16 = 4009;
}

/// Verifies an access token (the identity context, in the server).
pub trait TokenCheck: Send + Sync {
    fn check<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Principal, ApiError>>;
}

/// A channel event ready to write: one encoding shared by every subscriber.
struct ChannelFrame {
    channel_id: String,
    seq: i64,
    text: Utf8Bytes,
}

enum Out {
    Event(Arc<ChannelFrame>),
    /// Start delivering `channel_id` after `since` (backlog first).
    /// Without an explicit `since`, a channel already delivered here keeps
    /// its position (no frame is sent twice).
    Subscribe {
        channel_id: String,
        since: i64,
        explicit: bool,
    },
    Unsubscribe(String),
    Text(Utf8Bytes),
}

/// Why and how the writer ends the connection.
#[derive(Clone, Debug)]
struct Kick {
    code: u16,
    reason: &'static str,
    /// An error frame sent before the close frame.
    error: Option<Utf8Bytes>,
    /// Send what is already queued first (not for a slow consumer, whose
    /// queue is the problem, nor for a banned user).
    flush: bool,
}

struct Conn {
    id: u64,
    user_id: String,
    tx: mpsc::Sender<Out>,
    kick: watch::Sender<Option<Kick>>,
}

impl Conn {
    fn kick(&self, k: Kick) {
        self.kick.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(k);
                true
            } else {
                false
            }
        });
    }
}

#[derive(Default)]
struct Registry {
    conns: HashMap<u64, Arc<Conn>>,
    channels: HashMap<String, Vec<Arc<Conn>>>,
    /// Connections that asked for a workspace's presence. Opt-in: sent to
    /// every connection, a login storm of N users would cost N × N frames.
    workspaces: HashMap<String, Vec<Arc<Conn>>>,
    users: HashMap<String, Vec<u64>>,
}

/// This node's live connections.
pub struct Gateway {
    messaging: Arc<Messaging>,
    auth: Arc<dyn TokenCheck>,
    registry: Mutex<Registry>,
    next_id: AtomicU64,
    presence: mpsc::UnboundedSender<(String, bool)>,
    presence_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, bool)>>>,
    metrics: GatewayMetrics,
}

fn error_frame(code: &str, detail: &str, reference: Option<&Value>) -> Utf8Bytes {
    let mut v = json!({"v": PROTOCOL_VERSION, "type": "error", "code": code, "detail": detail});
    if let Some(r) = reference {
        v["ref"] = r.clone();
    }
    Utf8Bytes::from(v.to_string())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

impl Gateway {
    pub fn new(messaging: Arc<Messaging>, auth: Arc<dyn TokenCheck>) -> Arc<Gateway> {
        let (presence, rx) = mpsc::unbounded_channel();
        Arc::new(Gateway {
            messaging,
            auth,
            registry: Mutex::new(Registry::default()),
            next_id: AtomicU64::new(1),
            presence,
            presence_rx: Mutex::new(Some(rx)),
            metrics: GatewayMetrics::default(),
        })
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    pub fn messaging(&self) -> &Arc<Messaging> {
        &self.messaging
    }

    /// Open connections on this node.
    pub fn connections(&self) -> usize {
        self.registry.lock().expect("poisoned").conns.len()
    }

    /// Records presence transitions in order; at shutdown closes every
    /// connection (1001) and marks their users offline.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(mut rx) = self.presence_rx.lock().expect("poisoned").take() else {
            return;
        };
        if let Err(e) = self.messaging.presence_heartbeat().await {
            tracing::warn!(error = %e, "presence heartbeat failed");
        }
        if let Err(e) = self.messaging.presence_reset().await {
            tracing::warn!(error = %e, "could not clear this node's old presence");
        }
        let mut beat = tokio::time::interval(self.messaging.config().presence_ttl / 3);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                t = rx.recv() => match t {
                    Some((user, up)) => self.apply_presence(&user, up).await,
                    None => break,
                },
                _ = beat.tick() => self.presence_beat().await,
                _ = shutdown.changed() => break,
            }
        }
        let conns: Vec<Arc<Conn>> = {
            let r = self.registry.lock().expect("poisoned");
            r.conns.values().cloned().collect()
        };
        for c in conns {
            c.kick(Kick {
                code: close::GOING_AWAY,
                flush: true,
                reason: "server shutting down",
                error: None,
            });
        }
        while let Ok((user, up)) = rx.try_recv() {
            self.apply_presence(&user, up).await;
        }
        if let Err(e) = self.messaging.presence_reset().await {
            tracing::warn!(error = %e, "could not clear this node's presence at shutdown");
        }
    }

    /// Renews this node's heartbeat and expires dead nodes' presence. If our
    /// own heartbeat had lapsed, peers may have swept our users: announce the
    /// ones still connected here again.
    async fn presence_beat(&self) {
        match self.messaging.presence_heartbeat().await {
            Ok(true) => {
                let users: Vec<String> = {
                    let r = self.registry.lock().expect("poisoned");
                    let mut u: Vec<String> = r.conns.values().map(|c| c.user_id.clone()).collect();
                    u.sort();
                    u.dedup();
                    u
                };
                for u in users {
                    self.apply_presence(&u, true).await;
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "presence heartbeat failed"),
        }
        if let Err(e) = self.messaging.presence_sweep().await {
            tracing::warn!(error = %e, "presence sweep failed");
        }
    }

    async fn apply_presence(&self, user: &str, up: bool) {
        // In queue order; retried, since a lost `down` would leave the user
        // online (and unnotified) until this node restarts.
        for attempt in 1..=8u32 {
            let r = if up {
                self.messaging.presence_up(user).await
            } else {
                self.messaging.presence_down(user).await
            };
            match r {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(user_id = user, attempt, error = %e, "presence update failed");
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(6))).await;
                }
            }
        }
    }

    fn register(&self, conn: Arc<Conn>) {
        let mut r = self.registry.lock().expect("poisoned");
        let list = r.users.entry(conn.user_id.clone()).or_default();
        list.push(conn.id);
        if list.len() == 1 {
            let _ = self.presence.send((conn.user_id.clone(), true));
        }
        r.conns.insert(conn.id, conn);
        self.metrics.connections.inc();
    }

    fn unregister(&self, conn: &Conn) {
        let mut r = self.registry.lock().expect("poisoned");
        if r.conns.remove(&conn.id).is_none() {
            return;
        }
        self.metrics.connections.dec();
        r.channels.retain(|_, subs| {
            subs.retain(|c| c.id != conn.id);
            !subs.is_empty()
        });
        r.workspaces.retain(|_, subs| {
            subs.retain(|c| c.id != conn.id);
            !subs.is_empty()
        });
        if let Some(list) = r.users.get_mut(&conn.user_id) {
            list.retain(|id| *id != conn.id);
            if list.is_empty() {
                r.users.remove(&conn.user_id);
                let _ = self.presence.send((conn.user_id.clone(), false));
            }
        }
    }

    fn subscribe(&self, conn: &Arc<Conn>, channel_id: &str) -> bool {
        let mut r = self.registry.lock().expect("poisoned");
        let subs = r.channels.entry(channel_id.to_owned()).or_default();
        if subs.iter().any(|c| c.id == conn.id) {
            return false;
        }
        subs.push(conn.clone());
        true
    }

    fn watch_presence(&self, conn: &Arc<Conn>, workspace_id: &str, on: bool) {
        let mut r = self.registry.lock().expect("poisoned");
        let subs = r.workspaces.entry(workspace_id.to_owned()).or_default();
        subs.retain(|c| c.id != conn.id);
        if on {
            subs.push(conn.clone());
        } else if subs.is_empty() {
            r.workspaces.remove(workspace_id);
        }
    }

    fn unsubscribe(&self, conn: &Conn, channel_id: &str) {
        let mut r = self.registry.lock().expect("poisoned");
        if let Some(subs) = r.channels.get_mut(channel_id) {
            subs.retain(|c| c.id != conn.id);
            if subs.is_empty() {
                r.channels.remove(channel_id);
            }
        }
    }

    /// Queues a channel event for every local subscriber; a full queue is a
    /// slow consumer, disconnected.
    fn broadcast(&self, channel_id: &str, seq: i64, text: String) {
        let frame = Arc::new(ChannelFrame {
            channel_id: channel_id.to_owned(),
            seq,
            text: Utf8Bytes::from(text),
        });
        let r = self.registry.lock().expect("poisoned");
        let Some(subs) = r.channels.get(channel_id) else {
            return;
        };
        for c in subs {
            self.offer(c, Out::Event(frame.clone()));
        }
    }

    fn offer(&self, c: &Conn, out: Out) {
        if let Err(mpsc::error::TrySendError::Full(_)) = c.tx.try_send(out) {
            if c.kick.borrow().is_none() {
                self.metrics.closed("slow_consumer");
                tracing::info!(conn = c.id, user_id = %c.user_id, "slow consumer disconnected");
            }
            c.kick(Kick {
                code: close::SLOW_CONSUMER,
                flush: false,
                reason: "slow consumer",
                error: Some(error_frame(
                    "slow_consumer",
                    "too many frames queued for this connection; reconnect and subscribe with `since` your last seq",
                    None,
                )),
            });
        }
    }

    fn to_channel(&self, channel_id: &str, text: Utf8Bytes) {
        let r = self.registry.lock().expect("poisoned");
        if let Some(subs) = r.channels.get(channel_id) {
            for c in subs {
                self.offer(c, Out::Text(text.clone()));
            }
        }
    }

    fn to_workspaces(&self, workspaces: &[String], text: Utf8Bytes) {
        let r = self.registry.lock().expect("poisoned");
        let mut seen = HashSet::new();
        for w in workspaces {
            for c in r.workspaces.get(w).into_iter().flatten() {
                if seen.insert(c.id) {
                    self.offer(c, Out::Text(text.clone()));
                }
            }
        }
    }

    fn to_user(&self, user_id: &str, text: Utf8Bytes) {
        let r = self.registry.lock().expect("poisoned");
        for id in r.users.get(user_id).into_iter().flatten() {
            if let Some(c) = r.conns.get(id) {
                self.offer(c, Out::Text(text.clone()));
            }
        }
    }

    /// Ends `user_id`'s subscriptions to `channel_id` on this node.
    fn revoke(&self, user_id: &str, channel_id: &str) {
        let mut r = self.registry.lock().expect("poisoned");
        let Some(subs) = r.channels.get_mut(channel_id) else {
            return;
        };
        let frame = Utf8Bytes::from(
            json!({"v": PROTOCOL_VERSION, "type": "unsubscribed", "channel_id": channel_id,
                   "reason": "access_revoked"})
            .to_string(),
        );
        subs.retain(|c| {
            if c.user_id != user_id {
                return true;
            }
            // Forgotten by the writer first, so no later frame goes out.
            self.offer(c, Out::Unsubscribe(channel_id.to_owned()));
            self.offer(c, Out::Text(frame.clone()));
            false
        });
        if subs.is_empty() {
            r.channels.remove(channel_id);
        }
    }

    fn close_user(&self, user_id: &str, k: Kick) -> usize {
        let r = self.registry.lock().expect("poisoned");
        let ids = r.users.get(user_id).cloned().unwrap_or_default();
        for id in &ids {
            if let Some(c) = r.conns.get(id) {
                c.kick(k.clone());
            }
        }
        ids.len()
    }
}

/// `GET /api/v1/ws`: upgrades to the messaging protocol (docs/realtime.md).
/// The token comes in the `Authorization` header or, for browsers, in an
/// `auth` frame within `auth_timeout`.
pub async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let principal = match bearer(&headers) {
        Some(token) => match gw.auth.check(token).await {
            Ok(p) => Some(p),
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    let cfg = gw.messaging.config();
    ws.max_message_size(cfg.max_frame_bytes)
        .max_frame_size(cfg.max_frame_bytes)
        // Small buffers: an idle connection should cost a few KiB.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        // Outgoing frames (a reaction list, a presence snapshot) may be larger
        // than incoming ones; the queue, not this buffer, bounds memory.
        .max_write_buffer_size(16 * 1024 * 1024)
        .on_upgrade(move |socket| serve(gw, socket, principal))
}

async fn serve(gw: Arc<Gateway>, socket: WebSocket, principal: Option<Principal>) {
    let cfg = gw.messaging.config().clone();
    let (mut sink, mut stream) = socket.split();
    let principal = match principal {
        Some(p) => p,
        None => match first_frame_auth(&gw, &mut stream, cfg.auth_timeout).await {
            Ok(p) => p,
            Err((code, detail)) => {
                gw.metrics.closed("unauthenticated");
                let _ = sink
                    .send(WsMessage::Text(error_frame(code, detail, None)))
                    .await;
                let _ = sink
                    .send(WsMessage::Close(Some(CloseFrame {
                        code: close::UNAUTHENTICATED,
                        reason: Utf8Bytes::from_static("unauthenticated"),
                    })))
                    .await;
                return;
            }
        },
    };
    let (tx, rx) = mpsc::channel(cfg.send_queue.max(1));
    let (kick, kick_rx) = watch::channel(None);
    let conn = Arc::new(Conn {
        id: gw.next_id.fetch_add(1, Ordering::Relaxed),
        user_id: principal.user_id.clone(),
        tx,
        kick,
    });
    let ready = json!({"v": PROTOCOL_VERSION, "type": "ready", "user_id": conn.user_id,
        "connection_id": conn.id, "limits": {
            "max_message_chars": cfg.max_message_chars, "max_frame_bytes": cfg.max_frame_bytes,
            "rate_per_sec": cfg.client_rate_per_sec, "burst": cfg.client_burst,
            "send_queue": cfg.send_queue, "typing_ttl_ms": cfg.typing_ttl.as_millis() as u64}});
    if sink
        .send(WsMessage::Text(Utf8Bytes::from(ready.to_string())))
        .await
        .is_err()
    {
        return;
    }
    // Subscribed before registering: a ban that lands in between is seen.
    let kicked = conn.kick.subscribe();
    gw.register(conn.clone());
    let mut writer = tokio::spawn(write_loop(gw.clone(), sink, rx, kick_rx, cfg.ping_interval));
    let mut reader = Reader {
        gw: gw.clone(),
        conn: conn.clone(),
        subscriptions: HashSet::new(),
        tokens: f64::from(cfg.client_burst),
        refilled: Instant::now(),
        limited: 0,
        last_limit_notice: None,
        typing: HashMap::new(),
    };
    // A writer that ended on its own (socket error, storage error in a gap
    // fill) ends the connection: no half-alive socket that reads but never
    // delivers.
    let writer_ended = tokio::select! {
        _ = reader.run(&mut stream, &cfg, kicked) => false,
        _ = &mut writer => true,
    };
    gw.unregister(&conn);
    conn.kick(Kick {
        code: close::NORMAL,
        flush: true,
        reason: "bye",
        error: None,
    });
    if !writer_ended {
        let _ = writer.await;
    }
    // Read until the client's close (or 2 s): closing with unread input would
    // reset the connection and lose the close frame and the error before it.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = stream.next().await {
            if matches!(m, WsMessage::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn first_frame_auth(
    gw: &Gateway,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    wait: Duration,
) -> Result<Principal, (&'static str, &'static str)> {
    let first = tokio::time::timeout(wait, async {
        loop {
            match stream.next().await {
                Some(Ok(WsMessage::Text(t))) => return Some(t),
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                _ => return None,
            }
        }
    })
    .await
    .map_err(|_| ("unauthenticated", "send an auth frame first"))?
    .ok_or(("unauthenticated", "send an auth frame first"))?;
    let v: Value = serde_json::from_str(&first).map_err(|_| ("bad_frame", "not JSON"))?;
    if v.get("type").and_then(Value::as_str) != Some("auth") {
        return Err(("unauthenticated", "the first frame must be auth"));
    }
    let token = v
        .get("token")
        .and_then(Value::as_str)
        .ok_or(("unauthenticated", "auth needs a token"))?;
    gw.auth
        .check(token)
        .await
        .map_err(|_| ("token_invalid", "the token is invalid or expired"))
}

struct Reader {
    gw: Arc<Gateway>,
    conn: Arc<Conn>,
    subscriptions: HashSet<String>,
    tokens: f64,
    refilled: Instant,
    /// Frames dropped by the rate limit since the last accepted one.
    limited: u32,
    last_limit_notice: Option<Instant>,
    /// Last typing event sent, per channel.
    typing: HashMap<String, Instant>,
}

/// Frames over the limit in a row before a flooding client is closed.
const FLOOD_CLOSE_AFTER: u32 = 200;

impl Reader {
    async fn run(
        &mut self,
        stream: &mut futures_util::stream::SplitStream<WebSocket>,
        cfg: &crate::MessagingConfig,
        mut kicked: watch::Receiver<Option<Kick>>,
    ) {
        loop {
            // A kick wins over frames already waiting: nothing more of a
            // closed connection is handled (or counted twice).
            let next = tokio::select! {
                biased;
                _ = kicked.changed() => return,
                n = tokio::time::timeout(cfg.idle_timeout, stream.next()) => n,
            };
            let msg = match next {
                Err(_) => {
                    self.gw.metrics.closed("idle");
                    self.conn.kick(Kick {
                        code: close::IDLE,
                        flush: true,
                        reason: "idle",
                        error: Some(error_frame("idle", "nothing received in time", None)),
                    });
                    return;
                }
                Ok(None) => return,
                Ok(Some(Err(e))) => {
                    let text = e.to_string();
                    if text.contains("too long")
                        || text.contains("Space limit")
                        || text.contains("size")
                    {
                        self.gw.metrics.closed("too_big");
                        self.conn.kick(Kick {
                            code: close::TOO_BIG,
                            flush: false,
                            reason: "frame too big",
                            error: Some(error_frame(
                                "frame_too_big",
                                "frame larger than max_frame_bytes",
                                None,
                            )),
                        });
                    }
                    return;
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                WsMessage::Text(t) => {
                    self.gw.metrics.frames_received.inc();
                    if !self.allow(cfg) {
                        continue;
                    }
                    if let Some(reply) = self.handle(&t).await {
                        // A client that sends but never reads fills its own
                        // queue with replies: a slow consumer like any other.
                        self.gw.offer(&self.conn, Out::Text(reply));
                    }
                }
                WsMessage::Binary(_) => {
                    self.gw.metrics.frames_received.inc();
                    if !self.allow(cfg) {
                        continue;
                    }
                    self.gw.metrics.rejected("binary_not_supported");
                    let e = error_frame("binary_not_supported", "frames are JSON text", None);
                    self.gw.offer(&self.conn, Out::Text(e));
                }
                WsMessage::Close(_) => return,
                WsMessage::Ping(_) | WsMessage::Pong(_) => {}
            }
        }
    }

    /// The per-connection token bucket. A refused frame gets one error
    /// frame per second at most; a client that keeps flooding is closed.
    fn allow(&mut self, cfg: &crate::MessagingConfig) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + dt * cfg.client_rate_per_sec).min(f64::from(cfg.client_burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.limited = 0;
            return true;
        }
        self.limited += 1;
        self.gw.metrics.rejected("rate_limited");
        if self.limited >= FLOOD_CLOSE_AFTER {
            if self.limited == FLOOD_CLOSE_AFTER {
                self.gw.metrics.closed("flood");
            }
            self.conn.kick(Kick {
                code: close::POLICY,
                flush: true,
                reason: "flood",
                error: Some(error_frame(
                    "flood",
                    "too many frames over the rate limit",
                    None,
                )),
            });
            return false;
        }
        let notice_due = self
            .last_limit_notice
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if notice_due {
            self.last_limit_notice = Some(now);
            let detail = format!(
                "at most {} frames per second (burst {}); frames over it are dropped",
                cfg.client_rate_per_sec, cfg.client_burst
            );
            let _ = self
                .conn
                .tx
                .try_send(Out::Text(error_frame("rate_limited", &detail, None)));
        }
        false
    }

    /// Handles one client frame; the reply (ack or error), if any.
    async fn handle(&mut self, text: &str) -> Option<Utf8Bytes> {
        let v: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                self.gw.metrics.rejected("bad_frame");
                return Some(error_frame("bad_frame", "a frame is a JSON object", None));
            }
        };
        let reference = v.get("ref").cloned();
        let r = reference.as_ref();
        if let Some(ver) = v.get("v") {
            if ver.as_u64() != Some(PROTOCOL_VERSION) {
                self.gw.metrics.rejected("unsupported_version");
                return Some(error_frame(
                    "unsupported_version",
                    "this server speaks v1",
                    r,
                ));
            }
        }
        let Some(kind) = v.get("type").and_then(Value::as_str) else {
            self.gw.metrics.rejected("bad_frame");
            return Some(error_frame("bad_frame", "`type` is required", r));
        };
        let result = match kind {
            "ping" => {
                Ok(json!({"type": "pong", "at": flowline_core::Timestamp::now().to_rfc3339()}))
            }
            "auth" => Err((
                "already_authenticated".to_owned(),
                "this connection is authenticated".to_owned(),
            )),
            "subscribe" => self.subscribe(&v).await,
            "presence_subscribe" => self.presence(&v, true).await,
            "presence_unsubscribe" => self.presence(&v, false).await,
            "unsubscribe" => self.unsubscribe(&v).await,
            "send" => self.send(&v).await,
            "edit" => self.edit(&v).await,
            "delete" => self.delete(&v).await,
            "react" => self.react(&v).await,
            "typing" => self.typing(&v).await,
            "ack" => self.ack(&v).await,
            _ => Err((
                "unknown_type".to_owned(),
                format!("unknown frame type `{kind}`"),
            )),
        };
        match result {
            Ok(Value::Null) => None,
            Ok(mut reply) => {
                reply["v"] = json!(PROTOCOL_VERSION);
                if let Some(r) = r {
                    reply["ref"] = r.clone();
                }
                Some(Utf8Bytes::from(reply.to_string()))
            }
            Err((code, detail)) => {
                self.gw.metrics.rejected(&code);
                Some(error_frame(&code, &detail, r))
            }
        }
    }

    async fn subscribe(&mut self, v: &Value) -> Result<Value, (String, String)> {
        let channel_id = str_field(v, "channel_id")?;
        let since = match v.get("since") {
            None | Some(Value::Null) => None,
            Some(s) => Some(
                s.as_i64()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| bad("since", "a sequence number (0 or more)"))?,
            ),
        };
        if !self.subscriptions.contains(channel_id) && self.subscriptions.len() >= MAX_SUBSCRIPTIONS
        {
            return Err((
                "too_many_subscriptions".into(),
                format!("at most {MAX_SUBSCRIPTIONS} channels per connection"),
            ));
        }
        let ch = self
            .gw
            .messaging
            .readable(channel_id, &self.conn.user_id)
            .await
            .map_err(problem)?;
        let explicit = since.is_some();
        let since = since.unwrap_or(ch.last_seq).min(ch.last_seq);
        if ch.last_seq - since > MAX_RESUME {
            return Err((
                "resync_required".into(),
                format!(
                    "more than {MAX_RESUME} changes since {since}: load history over REST, then subscribe without `since`"
                ),
            ));
        }
        self.gw.subscribe(&self.conn, channel_id);
        self.subscriptions.insert(channel_id.to_owned());
        let reply = json!({"v": PROTOCOL_VERSION, "type": "subscribed", "channel_id": channel_id,
            "last_seq": ch.last_seq, "since": since, "ref": v.get("ref")});
        // The confirmation first, then the backlog, then live frames.
        self.queue(Out::Text(Utf8Bytes::from(reply.to_string())));
        self.queue(Out::Subscribe {
            channel_id: channel_id.to_owned(),
            since,
            explicit,
        });
        Ok(Value::Null)
    }

    /// Presence of a workspace's members: who is online now, then changes.
    async fn presence(&mut self, v: &Value, on: bool) -> Result<Value, (String, String)> {
        let workspace_id = str_field(v, "workspace_id")?;
        if !on {
            self.gw.watch_presence(&self.conn, workspace_id, false);
            return Ok(json!({"type": "presence_unsubscribed", "workspace_id": workspace_id}));
        }
        // Watching first, then the snapshot: a change in between is sent
        // twice at worst, never missed. A non-member is refused by the
        // snapshot and stops watching.
        self.gw.watch_presence(&self.conn, workspace_id, true);
        let members = match self
            .gw
            .messaging
            .presence(workspace_id, &self.conn.user_id)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                self.gw.watch_presence(&self.conn, workspace_id, false);
                return Err(problem(e));
            }
        };
        Ok(
            json!({"type": "presence_subscribed", "workspace_id": workspace_id,
                  "members": members}),
        )
    }

    async fn unsubscribe(&mut self, v: &Value) -> Result<Value, (String, String)> {
        let channel_id = str_field(v, "channel_id")?;
        self.gw.unsubscribe(&self.conn, channel_id);
        self.subscriptions.remove(channel_id);
        self.queue(Out::Unsubscribe(channel_id.to_owned()));
        Ok(json!({"type": "unsubscribed", "channel_id": channel_id}))
    }

    /// Queues a control item or reply; a full queue is a slow consumer.
    fn queue(&self, out: Out) {
        self.gw.offer(&self.conn, out);
    }

    async fn send(&mut self, v: &Value) -> Result<Value, (String, String)> {
        let channel_id = str_field(v, "channel_id")?;
        let new = crate::service::NewMessage {
            body: str_field(v, "body")?.to_owned(),
            parent_id: opt_str(v, "parent_id")?,
            client_id: opt_str(v, "client_id")?,
        };
        let ctx = RequestContext::detached();
        let (m, _) = self
            .gw
            .messaging
            .post(&ctx, &self.conn.user_id, channel_id, new)
            .await
            .map_err(problem)?;
        Ok(
            json!({"type": "ack", "op": "send", "channel_id": m.channel_id, "message_id": m.id,
                  "seq": m.seq, "client_id": m.client_id}),
        )
    }

    async fn edit(&mut self, v: &Value) -> Result<Value, (String, String)> {
        let id = str_field(v, "message_id")?;
        let body = str_field(v, "body")?;
        let ctx = RequestContext::detached();
        let m = self
            .gw
            .messaging
            .edit(&ctx, &self.conn.user_id, id, body)
            .await
            .map_err(problem)?;
        Ok(json!({"type": "ack", "op": "edit", "channel_id": m.channel_id, "message_id": m.id}))
    }

    async fn delete(&mut self, v: &Value) -> Result<Value, (String, String)> {
        let id = str_field(v, "message_id")?;
        let ctx = RequestContext::detached();
        let m = self
            .gw
            .messaging
            .delete(&ctx, &self.conn.user_id, id)
            .await
            .map_err(problem)?;
        Ok(json!({"type": "ack", "op": "delete", "channel_id": m.channel_id, "message_id": m.id}))
    }

    async fn react(&mut self, v: &Value) -> Result<Value, (String, String)> {
        let id = str_field(v, "message_id")?;
        let emoji = str_field(v, "emoji")?;
        let add = match v.get("op").and_then(Value::as_str) {
            None | Some("add") => true,
            Some("remove") => false,
            Some(_) => return Err(bad("op", "add or remove")),
        };
        let ctx = RequestContext::detached();
        let m = self
            .gw
            .messaging
            .react(&ctx, &self.conn.user_id, id, emoji, add)
            .await
            .map_err(problem)?;
        Ok(json!({"type": "ack", "op": "react", "channel_id": m.channel_id, "message_id": m.id}))
    }

    async fn typing(&mut self, v: &Value) -> Result<Value, (String, String)> {
        let channel_id = str_field(v, "channel_id")?;
        // One indication per half TTL per channel is all a client needs.
        let ttl = self.gw.messaging.config().typing_ttl;
        let now = Instant::now();
        if self
            .typing
            .get(channel_id)
            .is_some_and(|t| now.duration_since(*t) < ttl / 2)
        {
            return Ok(Value::Null);
        }
        if self.typing.len() > MAX_SUBSCRIPTIONS {
            self.typing.clear();
        }
        self.typing.insert(channel_id.to_owned(), now);
        let ctx = RequestContext::detached();
        self.gw
            .messaging
            .typing(&ctx, &self.conn.user_id, channel_id)
            .await
            .map_err(problem)?;
        Ok(Value::Null)
    }

    async fn ack(&mut self, v: &Value) -> Result<Value, (String, String)> {
        let channel_id = str_field(v, "channel_id")?;
        let seq = v
            .get("seq")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad("seq", "a sequence number"))?;
        let ch = self
            .gw
            .messaging
            .mark_read(channel_id, &self.conn.user_id, seq)
            .await
            .map_err(problem)?;
        Ok(json!({"type": "ack", "op": "read", "channel_id": channel_id, "read_seq": ch.read_seq}))
    }
}

fn bad(field: &str, what: &str) -> (String, String) {
    ("bad_frame".to_owned(), format!("`{field}`: {what}"))
}

fn str_field<'v>(v: &'v Value, field: &str) -> Result<&'v str, (String, String)> {
    v.get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| bad(field, "a string is required"))
}

fn opt_str(v: &Value, field: &str) -> Result<Option<String>, (String, String)> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(field, "a string")),
    }
}

/// An API error as an error frame's (code, detail): the same stable codes
/// as the REST API.
fn problem(e: ApiError) -> (String, String) {
    let p = e.0;
    let detail = p
        .detail
        .clone()
        .or_else(|| {
            p.errors
                .first()
                .map(|f| format!("{}: {}", f.field, f.message))
        })
        .unwrap_or_else(|| p.title.to_string());
    (p.code.to_string(), detail)
}

type Sink = SplitSink<WebSocket, WsMessage>;

/// What one writer pass ended with.
enum Step {
    Continue,
    Kicked,
    Failed,
}

async fn write_loop(
    gw: Arc<Gateway>,
    mut sink: Sink,
    mut rx: mpsc::Receiver<Out>,
    mut kick: watch::Receiver<Option<Kick>>,
    ping_every: Duration,
) {
    let mut delivered: HashMap<String, i64> = HashMap::new();
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    loop {
        let step = {
            let work = async {
                tokio::select! {
                    item = rx.recv() => match item {
                        None => Step::Kicked,
                        Some(out) => {
                            let mut n = 0;
                            let mut ok = write_out(&gw, &mut sink, &mut delivered, out, &mut n).await;
                            // Whatever else is queued goes out in the same flush.
                            while ok && n < 256 {
                                match rx.try_recv() {
                                    Ok(out) => ok = write_out(&gw, &mut sink, &mut delivered, out, &mut n).await,
                                    Err(_) => break,
                                }
                            }
                            ok = ok && sink.flush().await.is_ok();
                            gw.metrics.frames_sent.inc_by(n);
                            if ok { Step::Continue } else { Step::Failed }
                        }
                    },
                    _ = ping.tick() => {
                        if sink.send(WsMessage::Ping(Default::default())).await.is_ok() {
                            Step::Continue
                        } else {
                            Step::Failed
                        }
                    }
                }
            };
            tokio::select! {
                biased;
                _ = kick.changed() => Step::Kicked,
                s = work => s,
            }
        };
        match step {
            Step::Continue => continue,
            Step::Failed => break,
            Step::Kicked => {
                let k = kick.borrow().clone();
                if let Some(k) = k {
                    // Best effort: a client that stopped reading may never
                    // take these, and the socket closes anyway.
                    // A slow consumer gets longer: its farewell waits behind
                    // everything already in its socket.
                    let grace = Duration::from_secs(if k.flush { 2 } else { 10 });
                    let _ = tokio::time::timeout(grace, async {
                        if k.flush {
                            let mut n = 0;
                            while let Ok(out) = rx.try_recv() {
                                if !write_out(&gw, &mut sink, &mut delivered, out, &mut n).await {
                                    break;
                                }
                            }
                            gw.metrics.frames_sent.inc_by(n);
                        }
                        if let Some(e) = k.error {
                            sink.feed(WsMessage::Text(e)).await?;
                        }
                        sink.send(WsMessage::Close(Some(CloseFrame {
                            code: k.code,
                            reason: Utf8Bytes::from_static(k.reason),
                        })))
                        .await
                    })
                    .await;
                }
                break;
            }
        }
    }
}

/// Writes one queued item (without flushing); `false` when the socket failed.
async fn write_out(
    gw: &Gateway,
    sink: &mut Sink,
    delivered: &mut HashMap<String, i64>,
    out: Out,
    n: &mut u64,
) -> bool {
    match out {
        Out::Text(t) => {
            *n += 1;
            sink.feed(WsMessage::Text(t)).await.is_ok()
        }
        Out::Event(f) => {
            let Some(last) = delivered.get(&f.channel_id).copied() else {
                // Not (yet, or any longer) subscribed here.
                return true;
            };
            if f.seq <= last {
                return true;
            }
            if f.seq > last + 1
                && !fill(gw, sink, delivered, &f.channel_id, last, Some(f.seq - 1), n).await
            {
                return false;
            }
            *n += 1;
            delivered.insert(f.channel_id.clone(), f.seq);
            sink.feed(WsMessage::Text(f.text.clone())).await.is_ok()
        }
        Out::Subscribe {
            channel_id,
            since,
            explicit,
        } => {
            let since = match delivered.get(&channel_id) {
                Some(d) if !explicit => since.max(*d),
                _ => since,
            };
            delivered.insert(channel_id.clone(), since);
            fill(gw, sink, delivered, &channel_id, since, None, n).await
        }
        Out::Unsubscribe(channel_id) => {
            delivered.remove(&channel_id);
            true
        }
    }
}

/// Sends the stored events of a channel after `after` (up to `to`).
async fn fill(
    gw: &Gateway,
    sink: &mut Sink,
    delivered: &mut HashMap<String, i64>,
    channel_id: &str,
    mut after: i64,
    to: Option<i64>,
    n: &mut u64,
) -> bool {
    const PAGE: i64 = 500;
    loop {
        let limit = to.map_or(PAGE, |t| (t - after).clamp(0, PAGE));
        if limit == 0 {
            return true;
        }
        let events = match gw.messaging.events_after(channel_id, after, limit).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(channel_id, error = %e, "could not read a channel's backlog");
                return false;
            }
        };
        let got = events.len() as i64;
        for e in events {
            if let Some(text) = channel_frame(&e.kind, &e.payload) {
                *n += 1;
                if sink
                    .feed(WsMessage::Text(Utf8Bytes::from(text)))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
            after = e.seq;
            delivered.insert(channel_id.to_owned(), e.seq);
        }
        if got < limit {
            return true;
        }
    }
}

/// The fan-out consumer of one node (group `messaging.fanout.<node>`, from
/// the log's end): channel events to subscribers, presence and typing to
/// those who share a workspace or channel, bans close sockets.
pub struct Fanout(pub Arc<Gateway>);

impl Handler for Fanout {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let e = &ev.envelope;
        let gw = &self.0;
        match e.event_type.as_str() {
            kind @ ("message.sent" | "message.edited" | "message.deleted" | "reaction.added"
            | "reaction.removed") => {
                let channel_id = e.payload.get("channel_id").and_then(Value::as_str);
                let seq = e.payload.get("seq").and_then(Value::as_i64);
                let (Some(channel_id), Some(seq)) = (channel_id, seq) else {
                    return Err(HandlerError::permanent(format!(
                        "{kind} {}: no channel_id/seq",
                        e.id
                    )));
                };
                if let Some(text) = channel_frame(kind, &e.payload) {
                    gw.broadcast(channel_id, seq, text);
                }
                // A mention or direct message reaches every connection of its
                // recipient, subscribed to the channel or not.
                if kind == "message.sent" {
                    let recipients = e.payload.get("recipients").and_then(Value::as_array);
                    for u in recipients.into_iter().flatten().filter_map(Value::as_str) {
                        let direct = e.payload.get("direct").and_then(Value::as_bool) == Some(true);
                        let frame = json!({"v": PROTOCOL_VERSION,
                            "type": if direct { "direct" } else { "mention" },
                            "channel_id": channel_id, "seq": seq,
                            "workspace_id": e.payload.get("workspace_id"),
                            "message": e.payload.get("message")});
                        gw.to_user(u, Utf8Bytes::from(frame.to_string()));
                    }
                }
            }
            "presence.typing" => {
                if let Some(channel_id) = e.payload.get("channel_id").and_then(Value::as_str) {
                    let frame = json!({"v": PROTOCOL_VERSION, "type": "typing",
                        "channel_id": channel_id, "user_id": e.payload.get("user_id"),
                        "expires_in_ms": e.payload.get("expires_in_ms")});
                    gw.to_channel(channel_id, Utf8Bytes::from(frame.to_string()));
                }
            }
            t @ ("presence.user_online" | "presence.user_offline") => {
                let Some(user_id) = e.payload.get("user_id").and_then(Value::as_str) else {
                    return Ok(());
                };
                let status = if t == "presence.user_online" {
                    "online"
                } else {
                    "offline"
                };
                if gw.registry.lock().expect("poisoned").workspaces.is_empty() {
                    // Nobody here watches presence: skip the lookup.
                    return Ok(());
                }
                let workspaces = gw.messaging.workspace_ids(user_id).await?;
                let frame = json!({"v": PROTOCOL_VERSION, "type": "presence", "user_id": user_id,
                    "status": status, "at": e.payload.get("at"),
                    "last_seen_at": e.payload.get("last_seen_at")});
                gw.to_workspaces(&workspaces, Utf8Bytes::from(frame.to_string()));
            }
            "channel.left" => {
                let channel_id = e.payload.get("channel_id").and_then(Value::as_str);
                let user_id = e.payload.get("user_id").and_then(Value::as_str);
                if let (Some(channel_id), Some(user_id)) = (channel_id, user_id) {
                    // A public channel stays readable after leaving it.
                    if gw.messaging.readable(channel_id, user_id).await.is_err() {
                        gw.revoke(user_id, channel_id);
                    }
                }
            }
            "user.banned" => {
                if let Some(user_id) = e.payload.get("user_id").and_then(Value::as_str) {
                    let n = gw.close_user(
                        user_id,
                        Kick {
                            code: close::BANNED,
                            flush: false,
                            reason: "banned",
                            error: Some(error_frame(
                                "account_banned",
                                "this account was banned",
                                None,
                            )),
                        },
                    );
                    if n > 0 {
                        gw.metrics.closed("banned");
                        tracing::info!(user_id, connections = n, "closed a banned user's sockets");
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}
