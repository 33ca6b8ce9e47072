//! Typed settings: defaults < `flowline.toml` (or `--config FILE`) < environment
//! (`FLOWLINE__SECTION__KEY`) < command-line flags. Unknown keys and bad values
//! stop start-up with a message naming the key.

use anyhow::{anyhow, bail, Context};
use flowline_store::Durability;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where embedded backends keep their files.
    pub data_dir: PathBuf,
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub eventlog: EventLogSettings,
    pub bus: BusSettings,
    pub cache: CacheSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub audit: AuditSettings,
    pub analytics: AnalyticsSettings,
    pub probe: ProbeSettings,
    pub auth: AuthSettings,
    pub ratelimit: RateLimitSettings,
    pub inventory: InventorySettings,
    pub payments: PaymentSettings,
    pub orders: OrderSettings,
    pub notifications: NotificationSettings,
    pub messaging: MessagingSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagingSettings {
    /// Longest message body, in characters.
    pub max_message_chars: usize,
    /// Largest WebSocket frame accepted (bytes); larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Frames queued per connection before it is closed as a slow consumer.
    pub send_queue: usize,
    /// Frames a client may send per second, sustained and in a burst.
    pub client_rate_per_sec: f64,
    pub client_burst: u32,
    /// Time to send the `auth` frame when the upgrade had no token.
    pub auth_timeout: HumanDuration,
    pub ping_interval: HumanDuration,
    /// A connection that sends nothing (not even a pong) this long is closed.
    pub idle_timeout: HumanDuration,
    pub typing_ttl: HumanDuration,
    /// A node silent this long is dead: its users go offline.
    pub presence_ttl: HumanDuration,
    pub sse_heartbeat: HumanDuration,
    /// Create-workspace steps that fail on purpose, comma-separated (drills).
    pub failpoints: String,
}

impl Default for MessagingSettings {
    fn default() -> Self {
        let d = flowline_messaging::MessagingConfig::default();
        MessagingSettings {
            max_message_chars: d.max_message_chars,
            max_frame_bytes: d.max_frame_bytes,
            send_queue: d.send_queue,
            client_rate_per_sec: d.client_rate_per_sec,
            client_burst: d.client_burst,
            auth_timeout: HumanDuration(d.auth_timeout),
            ping_interval: HumanDuration(d.ping_interval),
            idle_timeout: HumanDuration(d.idle_timeout),
            typing_ttl: HumanDuration(d.typing_ttl),
            presence_ttl: HumanDuration(d.presence_ttl),
            sse_heartbeat: HumanDuration(d.sse_heartbeat),
            failpoints: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrderSettings {
    /// How long an unpaid order holds its stock (seed 003: 15 minutes).
    pub reservation_ttl_minutes: i64,
    /// Saga lease margin: how long after a crash another runner takes over.
    pub saga_lease: HumanDuration,
    /// Failed attempts of one compensation before `saga.stuck` is raised.
    pub saga_stuck_after: u32,
    /// Sagas one runner executes at once.
    pub saga_max_in_flight: usize,
    /// How often an idle runner looks for due work it was not told about.
    pub saga_poll: HumanDuration,
    /// Fault injection for drills, e.g. `confirm_stock:do=fatal` (empty: off).
    pub failpoints: String,
}

impl Default for OrderSettings {
    fn default() -> Self {
        OrderSettings {
            reservation_ttl_minutes: 15,
            saga_lease: HumanDuration(Duration::from_secs(5)),
            saga_stuck_after: 5,
            saga_max_in_flight: 64,
            saga_poll: HumanDuration(Duration::from_millis(200)),
            failpoints: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationSettings {
    /// Where emails go when no SMTP server is set (default: DATA_DIR/mailbox).
    pub mailbox_dir: Option<PathBuf>,
    /// `smtp://[user:password@]host[:port]`; empty: the local mailbox.
    pub smtp_url: String,
    /// The From header.
    pub from: String,
    /// Attempts per message before it is dead-lettered.
    pub max_attempts: u32,
    pub retry_base: HumanDuration,
    pub retry_max: HumanDuration,
    /// How long a claimed delivery is held before another dispatcher (another
    /// instance, if this one died) may send it; twice the longest send.
    pub send_lease: HumanDuration,
}

/// `smtp://[user[:password]@]host[:port]` (port 25 by default).
fn parse_smtp_url(url: &str) -> anyhow::Result<flowline_notifications::SmtpConfig> {
    let bad = || {
        anyhow!(
            "invalid configuration key `notifications.smtp_url`: `{}` is not smtp://[user:password@]host[:port]",
            flowline_store::redact_url(url)
        )
    };
    let rest = url.strip_prefix("smtp://").ok_or_else(bad)?;
    let rest = rest.trim_end_matches('/');
    let (creds, hostport) = match rest.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, rest),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
        None => (hostport, 25),
    };
    if host.is_empty() {
        return Err(bad());
    }
    let (username, password) = match creds {
        None => (None, None),
        Some(c) => match c.split_once(':') {
            Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
            None => (Some(c.to_owned()), None),
        },
    };
    Ok(flowline_notifications::SmtpConfig {
        host: host.to_owned(),
        port,
        username,
        password,
        ..Default::default()
    })
}

impl Default for NotificationSettings {
    fn default() -> Self {
        NotificationSettings {
            mailbox_dir: None,
            smtp_url: String::new(),
            from: "flowline <no-reply@flowline.local>".into(),
            max_attempts: 5,
            retry_base: HumanDuration(Duration::from_secs(1)),
            retry_max: HumanDuration(Duration::from_secs(300)),
            send_lease: HumanDuration(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InventorySettings {
    /// How often held reservations past their TTL are released.
    pub sweep_interval: HumanDuration,
}

impl Default for InventorySettings {
    fn default() -> Self {
        InventorySettings {
            sweep_interval: HumanDuration(Duration::from_secs(5)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentSettings {
    /// Added to every call of the built-in sandbox provider.
    pub sandbox_latency: HumanDuration,
    /// One provider call's deadline; a call past it counts as timed out.
    pub provider_timeout: HumanDuration,
    /// Attempts per provider call before the provider is asked for the outcome.
    pub provider_attempts: u32,
    /// How long a request waits for an earlier one with its idempotency key.
    pub idempotency_wait: HumanDuration,
    /// How long a key's claim outlives its holder's last heartbeat (a crash
    /// mid-request) before a retry may take it over.
    pub idempotency_lease: HumanDuration,
    /// How often payments and refunds left unresolved are driven forward.
    pub reconcile_interval: HumanDuration,
    /// How old an unresolved payment or refund must be before the reconciler
    /// touches it (younger ones may still be in their request).
    pub reconcile_min_age: HumanDuration,
    /// A payment the provider never saw is FAILED after this long.
    pub reconcile_give_up: HumanDuration,
    /// Fraud rules: the sliding window of the velocity rules.
    pub fraud_velocity_window: HumanDuration,
    pub fraud_max_per_user: i64,
    pub fraud_max_per_card: i64,
    /// Minor units at or above which a payment is refused.
    pub fraud_decline_amount: i64,
    /// Minor units at or above which a payment scores as high.
    pub fraud_review_amount: i64,
    /// Score at or above which a payment is declined (`fraud_suspected`).
    pub fraud_threshold: u32,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        let f = flowline_payments::fraud::FraudConfig::default();
        let c = flowline_payments::PaymentsConfig::default();
        PaymentSettings {
            sandbox_latency: HumanDuration(Duration::ZERO),
            provider_timeout: HumanDuration(c.provider_timeout),
            provider_attempts: c.provider_attempts,
            idempotency_wait: HumanDuration(c.idempotency_wait),
            idempotency_lease: HumanDuration(c.idempotency_lease),
            reconcile_interval: HumanDuration(Duration::from_secs(30)),
            reconcile_min_age: HumanDuration(Duration::from_secs(30)),
            reconcile_give_up: HumanDuration(Duration::from_secs(600)),
            fraud_velocity_window: HumanDuration(f.velocity_window),
            fraud_max_per_user: f.max_per_user,
            fraud_max_per_card: f.max_per_card,
            fraud_decline_amount: f.decline_amount,
            fraud_review_amount: f.review_amount,
            fraud_threshold: f.threshold,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// `iss` of access tokens.
    pub issuer: String,
    /// `aud` of access tokens.
    pub audience: String,
    pub access_ttl: HumanDuration,
    pub session_ttl: HumanDuration,
    /// Concurrent Argon2id hashes (each holds ~19 MiB and a core).
    pub hash_concurrency: usize,
    /// Failed logins for one account before each further attempt must wait.
    pub lockout_threshold: u32,
    /// The longest wait an account's failures can impose (never a permanent lock).
    pub lockout_max_delay: HumanDuration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            issuer: "flowline".into(),
            audience: "flowline-api".into(),
            access_ttl: HumanDuration(Duration::from_secs(15 * 60)),
            session_ttl: HumanDuration(Duration::from_secs(7 * 24 * 3600)),
            hash_concurrency: 2,
            lockout_threshold: 5,
            lockout_max_delay: HumanDuration(Duration::from_secs(60)),
        }
    }
}

/// Requests per minute (sustained) and burst, per client IP or per user.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Every route, per client IP.
    pub ip_per_minute: u32,
    pub ip_burst: u32,
    /// Login, register and refresh, per client IP (stricter).
    pub auth_per_minute: u32,
    pub auth_burst: u32,
    /// Authenticated routes, per user.
    pub user_per_minute: u32,
    pub user_burst: u32,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            enabled: true,
            ip_per_minute: 6000,
            ip_burst: 500,
            auth_per_minute: 30,
            auth_burst: 10,
            user_per_minute: 3000,
            user_burst: 300,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// Names this instance (per-node consumer groups such as cache invalidation).
    pub node_id: String,
    /// Reverse proxies whose `X-Forwarded-For` is believed (exact addresses).
    pub trusted_proxies: Vec<std::net::IpAddr>,
    pub request_timeout: HumanDuration,
    pub body_limit_bytes: usize,
    /// How long in-flight requests get to finish after SIGTERM.
    pub shutdown_grace: HumanDuration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://` (files under data_dir), `sqlite://DIR`, or `postgres://…`.
    pub url: String,
    pub durability: Durability,
    /// Prefix for per-service PostgreSQL schemas (lets several deployments share a database).
    pub schema_prefix: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventLogSettings {
    pub partitions: u32,
    pub max_attempts: u32,
    pub backoff_base: HumanDuration,
    pub backoff_max: HumanDuration,
    pub fetch_batch: i64,
    /// Events older than this are dropped. `0s` keeps them forever.
    pub retention_max_age: HumanDuration,
    /// Per topic; the oldest events beyond it are dropped. 0 means no limit.
    pub retention_max_bytes: u64,
    pub retention_interval: HumanDuration,
    /// How long a consumer-group partition stays with an instance that
    /// stopped renewing it (it died) before another instance takes it.
    pub lease: HumanDuration,
}

/// Where the event log's events travel: `embedded` keeps them in the
/// database (the SQLite file, or the shared PostgreSQL), `nats://…` uses NATS
/// JetStream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusSettings {
    pub url: String,
    /// Subject and stream-name prefix (several deployments can share a server).
    pub prefix: String,
    /// Deliveries of one event (each after a node died holding it) before it
    /// is dead-lettered.
    pub max_deliver: u32,
    /// Replicas of each stream (a NATS cluster of 3 with 3 replicas survives
    /// the loss of a server with no acknowledged event lost).
    pub replicas: u32,
}

impl Default for BusSettings {
    fn default() -> Self {
        BusSettings {
            url: "embedded".into(),
            prefix: "flowline".into(),
            max_deliver: 10,
            replicas: 1,
        }
    }
}

/// Sessions, rate-limit counters and cache invalidation: `memory` (this
/// process) or `redis://…` (shared by every instance).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    pub url: String,
    /// Prepended to every key (several deployments can share a server).
    pub key_prefix: String,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            url: "memory".into(),
            key_prefix: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal, pretty otherwise.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info,flowline_store=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// Keep the spans of recent requests and the events they caused in the
    /// local trace store (`flowline flows`, the console).
    pub traces: bool,
    /// The trace store keeps at most this many spans (oldest go first).
    pub max_spans: u64,
    /// OTLP/HTTP traces URL (`http://collector:4318/v1/traces`); empty = off.
    /// Needs a binary built with `--features otlp`.
    pub otlp_endpoint: String,
    /// Publish per-request latency samples to `gateway.requests` (once a
    /// second, batched) for the analytics context.
    pub request_samples: bool,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            traces: true,
            max_spans: 200_000,
            otlp_endpoint: String::new(),
            request_samples: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Failed logins for one account or one client address, within
    /// `failed_login_window`, that raise an `audit.alert_raised`; 0 = off.
    pub failed_login_threshold: u32,
    pub failed_login_window: HumanDuration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            failed_login_threshold: 5,
            failed_login_window: HumanDuration(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsSettings {
    /// How far the watermark trails the newest event time.
    pub out_of_orderness: HumanDuration,
    /// How long a window still takes late events after the watermark passed it.
    pub allowed_lateness: HumanDuration,
    /// Inactivity that ends a user session (the session-duration job).
    pub session_gap: HumanDuration,
    /// Final windows older than this are deleted.
    pub retention: HumanDuration,
    /// A partition with no event for this long (wall clock) stops holding
    /// the watermark back; `0s` = one watermark over all partitions.
    pub idle_timeout: HumanDuration,
}

impl Default for AnalyticsSettings {
    fn default() -> Self {
        AnalyticsSettings {
            out_of_orderness: HumanDuration(Duration::from_secs(5)),
            allowed_lateness: HumanDuration(Duration::from_secs(60)),
            session_gap: HumanDuration(Duration::from_secs(30 * 60)),
            retention: HumanDuration(Duration::from_secs(7 * 24 * 3600)),
            idle_timeout: HumanDuration(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSettings {
    /// Mounts the diagnostic `probe` context (`/api/v1/probe/…`).
    pub enabled: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("./data"),
            server: ServerSettings::default(),
            database: DatabaseSettings::default(),
            eventlog: EventLogSettings::default(),
            bus: BusSettings::default(),
            cache: CacheSettings::default(),
            log: LogSettings::default(),
            telemetry: TelemetrySettings::default(),
            audit: AuditSettings::default(),
            analytics: AnalyticsSettings::default(),
            probe: ProbeSettings::default(),
            auth: AuthSettings::default(),
            ratelimit: RateLimitSettings::default(),
            inventory: InventorySettings::default(),
            payments: PaymentSettings::default(),
            orders: OrderSettings::default(),
            notifications: NotificationSettings::default(),
            messaging: MessagingSettings::default(),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            node_id: "local".into(),
            trusted_proxies: Vec::new(),
            request_timeout: HumanDuration(Duration::from_secs(30)),
            body_limit_bytes: 1024 * 1024,
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: "sqlite://".into(),
            durability: Durability::Full,
            schema_prefix: String::new(),
            max_connections: 16,
        }
    }
}

impl Default for EventLogSettings {
    fn default() -> Self {
        EventLogSettings {
            partitions: 4,
            max_attempts: 5,
            backoff_base: HumanDuration(Duration::from_millis(100)),
            backoff_max: HumanDuration(Duration::from_secs(10)),
            fetch_batch: 1000,
            retention_max_age: HumanDuration(Duration::from_secs(7 * 24 * 3600)),
            retention_max_bytes: 1 << 30,
            retention_interval: HumanDuration(Duration::from_secs(60)),
            lease: HumanDuration(Duration::from_secs(10)),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

/// A duration written `250ms`, `30s`, `15m`, `24h` or `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration like 30s, 15m, 7d"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            _ => return Err(format!("`{s}` has no unit: use ms, s, m, h or d")),
        };
        Ok(HumanDuration(d))
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        for (unit, size) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms > 0 && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HumanDuration::parse(&s).map_err(serde::de::Error::custom)
    }
}

const ENV_PREFIX: &str = "FLOWLINE__";

/// Loads settings. `file` is `--config`; without it `./flowline.toml` is read
/// if present. `env` is the process environment (a parameter for tests).
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Settings> {
    let mut root = toml::Table::new();
    let path = match file {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from("flowline.toml")).filter(|p| p.exists()),
    };
    if let Some(path) = &path {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        root = text.parse::<toml::Table>().map_err(|e| {
            anyhow!(
                "config file {} is not valid TOML: {}",
                path.display(),
                e.message()
            )
        })?;
    }
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = rest.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            bail!("environment variable {name}: empty key segment");
        }
        set_path(&mut root, &keys, env_value(&value))
            .map_err(|e| anyhow!("environment variable {name}: {e}"))?;
    }
    let settings: Settings =
        serde_path_to_error::deserialize(toml::Value::Table(root)).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().message().to_owned();
            if path == "." {
                anyhow!("invalid configuration: {inner}")
            } else {
                anyhow!("invalid configuration key `{path}`: {inner}")
            }
        })?;
    settings.validate()?;
    Ok(settings)
}

/// An environment value is read as a TOML scalar when it is one (`8`, `true`),
/// otherwise as a string (URLs, durations, paths).
fn env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(root: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = keys.split_last().expect("at least one key");
    let mut table = root;
    for k in parents {
        let entry = table
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{k}` is not a section"))?;
    }
    table.insert(last.clone(), value);
    Ok(())
}

impl Settings {
    fn validate(&self) -> anyhow::Result<()> {
        let e = &self.eventlog;
        if !(1..=1024).contains(&e.partitions) {
            bail!(
                "invalid configuration key `eventlog.partitions`: must be 1..=1024, got {}",
                e.partitions
            );
        }
        if e.max_attempts == 0 {
            bail!("invalid configuration key `eventlog.max_attempts`: must be at least 1");
        }
        if !(1..=100_000).contains(&e.fetch_batch) {
            bail!("invalid configuration key `eventlog.fetch_batch`: must be 1..=100000");
        }
        if self.analytics.session_gap.0.is_zero() || self.audit.failed_login_window.0.is_zero() {
            bail!("invalid configuration key `analytics.session_gap`/`audit.failed_login_window`: must be positive");
        }
        if self.telemetry.max_spans < 1000 {
            bail!("invalid configuration key `telemetry.max_spans`: must be at least 1000");
        }
        let otlp = &self.telemetry.otlp_endpoint;
        if !otlp.is_empty() {
            if !(otlp.starts_with("http://") || otlp.starts_with("https://")) {
                bail!("invalid configuration key `telemetry.otlp_endpoint`: must be an http(s) URL, got `{otlp}`");
            }
            if !cfg!(feature = "otlp") {
                bail!("invalid configuration key `telemetry.otlp_endpoint`: this binary was built without OTLP export (build with `--features otlp`)");
            }
        }
        if self.server.body_limit_bytes == 0 {
            bail!("invalid configuration key `server.body_limit_bytes`: must be positive");
        }
        let r = &self.ratelimit;
        for (k, v) in [
            ("ip_per_minute", r.ip_per_minute),
            ("ip_burst", r.ip_burst),
            ("auth_per_minute", r.auth_per_minute),
            ("auth_burst", r.auth_burst),
            ("user_per_minute", r.user_per_minute),
            ("user_burst", r.user_burst),
        ] {
            if v == 0 {
                bail!("invalid configuration key `ratelimit.{k}`: must be positive");
            }
        }
        if self.payments.provider_attempts == 0 {
            bail!("invalid configuration key `payments.provider_attempts`: must be at least 1");
        }
        if self.payments.idempotency_lease.0 < Duration::from_secs(1) {
            bail!("invalid configuration key `payments.idempotency_lease`: at least 1s (claims are refreshed every 500ms)");
        }
        if self.payments.provider_timeout.0.is_zero() {
            bail!("invalid configuration key `payments.provider_timeout`: must be positive");
        }
        if !(1..=1440).contains(&self.orders.reservation_ttl_minutes) {
            bail!("invalid configuration key `orders.reservation_ttl_minutes`: 1 to 1440");
        }
        if self.orders.saga_stuck_after == 0 || self.orders.saga_max_in_flight == 0 {
            bail!("invalid configuration key `orders.saga_stuck_after`/`orders.saga_max_in_flight`: must be positive");
        }
        if self.orders.saga_lease.0 < Duration::from_millis(100)
            || self.orders.saga_poll.0.is_zero()
        {
            bail!("invalid configuration key `orders.saga_lease`/`orders.saga_poll`: lease at least 100ms, poll positive");
        }
        let m = &self.messaging;
        if m.max_message_chars == 0 || m.send_queue == 0 || m.client_burst == 0 {
            bail!("invalid configuration key `messaging.max_message_chars`/`send_queue`/`client_burst`: must be positive");
        }
        if m.client_rate_per_sec.is_nan()
            || m.client_rate_per_sec <= 0.0
            || m.max_frame_bytes < 1024
        {
            bail!("invalid configuration key `messaging.client_rate_per_sec`/`max_frame_bytes`: rate positive, frames at least 1024 bytes");
        }
        if m.ping_interval.0.is_zero() || m.idle_timeout.0 <= m.ping_interval.0 {
            bail!("invalid configuration key `messaging.idle_timeout`: must be longer than `messaging.ping_interval` (a live client answers pings)");
        }
        if m.auth_timeout.0.is_zero()
            || m.typing_ttl.0.is_zero()
            || m.sse_heartbeat.0.is_zero()
            || m.presence_ttl.0 < Duration::from_millis(300)
        {
            bail!("invalid configuration key `messaging.auth_timeout`/`typing_ttl`/`sse_heartbeat`/`presence_ttl`: positive (presence_ttl at least 300ms)");
        }
        for f in m
            .failpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if ![
                "create_workspace",
                "create_default_channel",
                "add_creator_admin",
                "welcome_notification",
            ]
            .contains(&f)
            {
                bail!("invalid configuration key `messaging.failpoints`: unknown step `{f}`");
            }
        }
        if let Err(e) = flowline_orders::Failpoints::parse(&self.orders.failpoints) {
            bail!("invalid configuration key `orders.failpoints`: {e}");
        }
        if self.notifications.max_attempts == 0 || self.notifications.retry_base.0.is_zero() {
            bail!("invalid configuration key `notifications.max_attempts`/`notifications.retry_base`: must be positive");
        }
        if self.notifications.send_lease.0 < Duration::from_secs(1) {
            bail!("invalid configuration key `notifications.send_lease`: at least 1s");
        }
        if !self.notifications.smtp_url.is_empty() {
            parse_smtp_url(&self.notifications.smtp_url)?;
        }
        if self.inventory.sweep_interval.0.is_zero() {
            bail!("invalid configuration key `inventory.sweep_interval`: must be positive");
        }
        if self.auth.hash_concurrency == 0 {
            bail!("invalid configuration key `auth.hash_concurrency`: must be positive");
        }
        if self.database.max_connections == 0 {
            bail!("invalid configuration key `database.max_connections`: must be positive");
        }
        let bus = &self.bus.url;
        if !(bus == "embedded" || bus.starts_with("nats://")) {
            bail!(
                "invalid configuration key `bus.url`: `{}` is not `embedded` or nats://host:port",
                flowline_store::redact_url(bus)
            );
        }
        if self.bus.prefix.is_empty()
            || !self
                .bus
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("invalid configuration key `bus.prefix`: letters, digits, `-` or `_`");
        }
        if self.bus.max_deliver == 0 {
            bail!("invalid configuration key `bus.max_deliver`: must be at least 1");
        }
        let cache = &self.cache.url;
        if !(cache == "memory" || cache.starts_with("redis://")) {
            bail!(
                "invalid configuration key `cache.url`: `{}` is not `memory` or redis://host:port",
                flowline_store::redact_url(cache)
            );
        }
        if self.eventlog.lease.0 < Duration::from_millis(300) {
            bail!(
                "invalid configuration key `eventlog.lease`: at least 300ms (renewed every third)"
            );
        }
        let url = &self.database.url;
        // Instances share state only through their backends: a node-local
        // database under a shared bus or cache would split the data.
        if url.starts_with("sqlite:")
            && (bus.starts_with("nats://") || cache.starts_with("redis://"))
        {
            bail!(
                "invalid configuration: `database.url` is SQLite (one node's files) but `bus.url`/`cache.url` \
                 are shared services; several instances would each keep their own orders, users and \
                 balances while sharing events and sessions. Use database.url = postgres://… with them, \
                 or keep bus.url = \"embedded\" and cache.url = \"memory\" for one node"
            );
        }
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            bail!(
                "invalid configuration key `database.url`: `{}` is not sqlite://… or postgres://…",
                flowline_store::redact_url(url)
            );
        }
        Ok(())
    }

    pub fn audit_config(&self) -> flowline_audit::AuditConfig {
        flowline_audit::AuditConfig {
            failed_login_threshold: self.audit.failed_login_threshold,
            failed_login_window: self.audit.failed_login_window.0,
        }
    }

    pub fn analytics_config(&self) -> flowline_analytics::AnalyticsConfig {
        flowline_analytics::AnalyticsConfig {
            out_of_orderness: self.analytics.out_of_orderness.0,
            allowed_lateness: self.analytics.allowed_lateness.0,
            session_gap: self.analytics.session_gap.0,
            idle_timeout: self.analytics.idle_timeout.0,
        }
    }

    /// The effective settings as TOML, with secrets redacted.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = flowline_store::redact_url(&shown.database.url);
        shown.notifications.smtp_url = flowline_store::redact_url(&shown.notifications.smtp_url);
        shown.bus.url = flowline_store::redact_url(&shown.bus.url);
        shown.cache.url = flowline_store::redact_url(&shown.cache.url);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

    pub fn backend(&self) -> anyhow::Result<flowline_store::Backend> {
        let mut b = flowline_store::Backend::from_url(
            &self.database.url,
            &self.data_dir,
            self.database.durability,
            &self.database.schema_prefix,
        )?;
        if let flowline_store::Backend::Postgres {
            max_connections, ..
        } = &mut b
        {
            *max_connections = self.database.max_connections;
        }
        Ok(b)
    }

    pub fn identity_config(&self) -> flowline_identity::IdentityConfig {
        let a = &self.auth;
        flowline_identity::IdentityConfig {
            issuer: a.issuer.clone(),
            audience: a.audience.clone(),
            access_ttl: a.access_ttl.0,
            session_ttl: a.session_ttl.0,
            hash_concurrency: a.hash_concurrency,
            lockout_threshold: a.lockout_threshold,
            lockout_max_delay: a.lockout_max_delay.0,
        }
    }

    pub fn notify_config(&self) -> anyhow::Result<flowline_notifications::NotifyConfig> {
        let n = &self.notifications;
        let smtp = if n.smtp_url.is_empty() {
            None
        } else {
            Some(parse_smtp_url(&n.smtp_url)?)
        };
        Ok(flowline_notifications::NotifyConfig {
            mailbox_dir: n
                .mailbox_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("mailbox")),
            smtp,
            from: n.from.clone(),
            max_attempts: n.max_attempts,
            backoff_base: n.retry_base.0,
            backoff_max: n.retry_max.0.max(n.retry_base.0),
            lease: n.send_lease.0,
            ..Default::default()
        })
    }

    pub fn orders_config(&self) -> flowline_orders::OrdersConfig {
        let o = &self.orders;
        flowline_orders::OrdersConfig {
            reservation_ttl_minutes: o.reservation_ttl_minutes,
            saga: flowline_saga::SagaOptions {
                max_in_flight: o.saga_max_in_flight,
                idle_poll: o.saga_poll.0,
                lease: o.saga_lease.0,
                stuck_after: o.saga_stuck_after,
            },
            // Checked by `validate`.
            failpoints: flowline_orders::Failpoints::parse(&o.failpoints).unwrap_or_default(),
        }
    }

    pub fn messaging_config(&self) -> flowline_messaging::MessagingConfig {
        let m = &self.messaging;
        flowline_messaging::MessagingConfig {
            node_id: self.server.node_id.clone(),
            max_message_chars: m.max_message_chars,
            max_frame_bytes: m.max_frame_bytes,
            send_queue: m.send_queue,
            client_rate_per_sec: m.client_rate_per_sec,
            client_burst: m.client_burst,
            auth_timeout: m.auth_timeout.0,
            ping_interval: m.ping_interval.0,
            idle_timeout: m.idle_timeout.0,
            typing_ttl: m.typing_ttl.0,
            presence_ttl: m.presence_ttl.0,
            sse_heartbeat: m.sse_heartbeat.0,
            saga: self.orders_config().saga,
            failpoints: m
                .failpoints
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
        }
    }

    pub fn payments_config(&self) -> flowline_payments::PaymentsConfig {
        let p = &self.payments;
        flowline_payments::PaymentsConfig {
            fraud: flowline_payments::fraud::FraudConfig {
                velocity_window: p.fraud_velocity_window.0,
                max_per_user: p.fraud_max_per_user,
                max_per_card: p.fraud_max_per_card,
                decline_amount: p.fraud_decline_amount,
                review_amount: p.fraud_review_amount,
                threshold: p.fraud_threshold,
            },
            provider_timeout: p.provider_timeout.0,
            provider_attempts: p.provider_attempts,
            idempotency_wait: p.idempotency_wait.0,
            idempotency_lease: p.idempotency_lease.0,
        }
    }

    pub fn log_options(&self) -> flowline_store::LogOptions {
        let e = &self.eventlog;
        flowline_store::LogOptions {
            partitions: e.partitions,
            max_attempts: e.max_attempts,
            backoff_base: e.backoff_base.0,
            backoff_max: e.backoff_max.0,
            fetch_batch: e.fetch_batch,
            lease: e.lease.0,
            // Unique per process: a restarted node is a new owner.
            owner: format!(
                "{}-{}",
                self.server.node_id,
                &uuid::Uuid::now_v7().simple().to_string()[20..]
            ),
            ..Default::default()
        }
    }

    /// The NATS bus, when `bus.url` names one.
    pub fn nats_config(&self) -> Option<flowline_store::NatsConfig> {
        if !self.bus.url.starts_with("nats://") {
            return None;
        }
        let mut c = flowline_store::NatsConfig::new(&self.bus.url);
        c.prefix = self.bus.prefix.clone();
        c.max_deliver = i64::from(self.bus.max_deliver);
        c.replicas = self.bus.replicas.clamp(1, 5) as usize;
        c.max_age = self.eventlog.retention_max_age.0;
        Some(c)
    }

    /// Opens the event log on the configured database and bus.
    pub async fn open_log(
        &self,
        backend: &flowline_store::Backend,
    ) -> anyhow::Result<flowline_store::EventLog> {
        flowline_store::EventLog::open_with(backend, self.log_options(), self.nats_config())
            .await
            .with_context(|| {
                format!(
                    "opening the event log (bus `{}`)",
                    flowline_store::redact_url(&self.bus.url)
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_and_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.toml");
        std::fs::write(
            &file,
            "[eventlog]\npartitions = 8\nmax_attempts = 3\n[server]\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let s = load(
            Some(&file),
            env(&[("FLOWLINE__EVENTLOG__PARTITIONS", "16"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(s.eventlog.partitions, 16, "env beats file");
        assert_eq!(s.eventlog.max_attempts, 3, "file beats default");
        assert_eq!(s.server.listen.port(), 9000);
        assert_eq!(s.eventlog.fetch_batch, 1000, "default kept");

        let s = load(
            Some(&file),
            env(&[("FLOWLINE__DATABASE__URL", "postgres://u:pw@localhost/x")]),
        )
        .unwrap();
        assert!(s.redacted_toml().contains("postgres://u:***@localhost/x"));
        assert!(!s.redacted_toml().contains("pw@"));

        let e = load(Some(&file), env(&[("FLOWLINE__DATABASE__URLL", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("database") && e.contains("urll"), "{e}");
        let e = load(
            Some(&file),
            env(&[("FLOWLINE__EVENTLOG__PARTITIONS", "many")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("eventlog.partitions"), "{e}");
        let e = load(
            Some(&file),
            env(&[("FLOWLINE__SERVER__REQUEST_TIMEOUT", "10 parsecs")]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("server.request_timeout"), "{e}");

        std::fs::write(&file, "[server\nlisten=").unwrap();
        let e = load(Some(&file), env(&[])).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(HumanDuration::parse("7d").unwrap().to_string(), "7d");
        assert_eq!(HumanDuration::parse("90s").unwrap().to_string(), "90s");
        assert!(HumanDuration::parse("7").is_err());
        assert!(HumanDuration::parse("-1s").is_err());
    }
}
