//! flowline-notifications: templated email, in-app and push messages.
//!
//! The [`Notifier`] follows `user.events` (filling a recipients directory, the
//! only way this context learns an address: contexts never read each other's
//! tables), `orders.events` and `shipping.events`. For each event it applies
//! the user's preferences and queues one delivery per channel, in the same
//! transaction as the inbox claim of the event, so a redelivered event never
//! queues (and so never sends) a second email.
//!
//! A dispatcher ([`Notifications::run`]) then leases due deliveries with a
//! conditional update (several dispatchers may share a database), renders the
//! latest template version for the recipient's locale, sends through the
//! channel and records the outcome together with a `notification.sent` or
//! `notification.dead_lettered` event on [`TOPIC`]. Failures are retried with
//! exponential backoff up to `max_attempts`, then the delivery is DEAD (the
//! dead letter). Sending is made idempotent where the channel allows: the
//! mailbox file and the in-app row are keyed by the delivery id, and the
//! email's Message-ID derives from it.

mod consumer;
mod dispatch;
pub mod routes;
pub mod template;

pub use consumer::{
    Notifier, DIRECTORY_GROUP, DIRECTORY_TOPICS, GROUP, ORDERS_TOPIC, SHIPPING_TOPIC, TOPICS,
    USER_TOPIC,
};
pub use dispatch::{LogPush, PushMessage, PushProvider, SendError};

use flowline_core::{ErrorCode, Problem, Timestamp};
use flowline_http::ApiError;
use flowline_store::outbox::{self, Relay};
use flowline_store::{on_pool, on_tx, Db, Migration, StoreError};
use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Where this context publishes `notification.sent` / `notification.dead_lettered`.
pub const TOPIC: &str = "notifications.events";

pub const MIGRATIONS: &[Migration] = &[Migration {
    scope: "notifications",
    version: 1,
    name: "recipients, templates, deliveries",
    sqlite: include_str!("../migrations/sqlite/0001_notifications.sql"),
    postgres: include_str!("../migrations/postgres/0001_notifications.sql"),
}];

/// A way of reaching a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    InApp,
    Push,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Email, Channel::InApp, Channel::Push];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::InApp => "in_app",
            Channel::Push => "push",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Where a delivery stands. QUEUED and RETRY are due work; SENT and DEAD are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DeliveryStatus {
    Queued,
    Retry,
    Sent,
    Dead,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Queued => "QUEUED",
            DeliveryStatus::Retry => "RETRY",
            DeliveryStatus::Sent => "SENT",
            DeliveryStatus::Dead => "DEAD",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        [
            DeliveryStatus::Queued,
            DeliveryStatus::Retry,
            DeliveryStatus::Sent,
            DeliveryStatus::Dead,
        ]
        .into_iter()
        .find(|d| d.as_str().eq_ignore_ascii_case(s))
    }
}

/// An SMTP relay. Plaintext: point it at a local relay or a submission
/// port on a trusted network.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per SMTP command (connect, EHLO, DATA…).
    pub timeout: Duration,
}

/// Never prints the password.
impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            host: "localhost".into(),
            port: 25,
            username: None,
            password: None,
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Where the local mailbox writes `{delivery_id}.eml` when no SMTP relay is set.
    pub mailbox_dir: PathBuf,
    /// Send email through this relay instead of the local mailbox.
    pub smtp: Option<SmtpConfig>,
    /// The `From` mailbox; its domain also names Message-IDs.
    pub from: String,
    /// Sending attempts before a delivery is DEAD.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt up to `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often an idle dispatcher looks for due work queued by other processes.
    pub poll: Duration,
    /// How long a claimed delivery is held before another dispatcher may take
    /// it over (a crashed dispatcher's work resumes after this). Must exceed
    /// the slowest send, SMTP timeouts included.
    pub lease: Duration,
    /// Deliveries one `dispatch_once` handles at most.
    pub batch: usize,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            mailbox_dir: PathBuf::from("data/mailbox"),
            smtp: None,
            from: "flowline <no-reply@flowline.local>".into(),
            max_attempts: 5,
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(600),
            poll: Duration::from_secs(1),
            lease: Duration::from_secs(300),
            batch: 50,
        }
    }
}

/// A user as the directory knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Recipient {
    pub user_id: String,
    pub email: String,
    pub display_name: String,
    /// The user's chosen locale, else the directory's.
    pub locale: String,
    /// False once the user is banned: nothing more is queued for them.
    pub active: bool,
}

/// One version of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Template {
    pub key: String,
    pub locale: String,
    pub version: i64,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    pub created_at: String,
}

/// `PUT /admin/notification-templates/{key}/{locale}`: the next version.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTemplate {
    /// 1 to 200 characters; `{{variables}}` allowed.
    pub subject: String,
    /// The plain-text body, 1 to 20000 characters.
    pub text: String,
    /// The HTML body (values are HTML-escaped), at most 100000 characters.
    #[serde(default)]
    pub html: Option<String>,
}

/// A notification type with the variables its templates may use.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TemplateKind {
    pub key: String,
    pub variables: Vec<String>,
    pub channels: Vec<Channel>,
}

/// Opting out of `channel` (or `*`) for notifications of `type` (or `*`).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
pub struct OptOut {
    /// `email`, `in_app`, `push` or `*`.
    pub channel: String,
    /// A notification type (`order_confirmed`, …) or `*`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A user's notification preferences.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Preferences {
    #[serde(default)]
    pub opt_out: Vec<OptOut>,
    /// `en`, `pt-BR`, …; null uses the locale the directory has.
    #[serde(default)]
    pub locale: Option<String>,
}

/// A notification in the user's in-app inbox.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct InAppNotification {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub body: String,
    /// Ids the client can link to (order_id, shipment_id…).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub created_at: String,
    pub read_at: Option<String>,
}

/// An email the local mailbox transport wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct MailboxEntry {
    /// The delivery id (also the file name).
    pub id: String,
    pub to: String,
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
    pub message_id: String,
    pub path: String,
    pub sent_at: String,
}

/// A row of the delivery log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    pub id: String,
    /// The event that caused it.
    pub event_id: String,
    pub event_type: String,
    pub user_id: String,
    pub channel: Channel,
    pub template_key: String,
    /// The locale asked for (the recipient's).
    pub locale: String,
    /// The template locale used after fallback; null until rendered.
    pub template_locale: Option<String>,
    /// The template version used; null until rendered.
    pub template_version: Option<i64>,
    /// The email address, for email deliveries.
    pub address: Option<String>,
    pub status: DeliveryStatus,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_attempt_at: String,
    pub created_at: String,
    pub updated_at: String,
    pub sent_at: Option<String>,
}

/// Deliveries per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeliveryCounts {
    pub queued: i64,
    pub retry: i64,
    pub sent: i64,
    /// The dead letters.
    pub dead: i64,
}

/// Filters of the delivery log.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub status: Option<DeliveryStatus>,
    pub user_id: Option<String>,
    pub limit: i64,
}

/// The notifications context.
pub struct Notifications {
    pub db: Db,
    relay: Relay,
    cfg: NotifyConfig,
    from: Mailbox,
    /// The domain of Message-IDs (the sender's).
    id_domain: String,
    smtp: Option<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>,
    push: Arc<dyn PushProvider>,
    wake: Arc<Notify>,
}

pub(crate) const DELIVERY_COLUMNS: &str =
    "id, event_id, event_type, user_id, channel, template_key, \
    locale, template_locale, template_version, address, status, attempts, last_error, \
    next_attempt_at, created_at, updated_at, sent_at";

/// Decodes a [`Delivery`] from a row with [`DELIVERY_COLUMNS`].
macro_rules! delivery_row {
    ($r:expr) => {{
        let r = $r;
        let channel: String = r.try_get("channel")?;
        let status: String = r.try_get("status")?;
        Delivery {
            id: r.try_get("id")?,
            event_id: r.try_get("event_id")?,
            event_type: r.try_get("event_type")?,
            user_id: r.try_get("user_id")?,
            channel: Channel::parse(&channel)
                .ok_or_else(|| StoreError::CorruptEvent(format!("delivery channel {channel}")))?,
            template_key: r.try_get("template_key")?,
            locale: r.try_get("locale")?,
            template_locale: r.try_get("template_locale")?,
            template_version: r.try_get("template_version")?,
            address: r.try_get("address")?,
            status: DeliveryStatus::parse(&status)
                .ok_or_else(|| StoreError::CorruptEvent(format!("delivery status {status}")))?,
            attempts: r.try_get("attempts")?,
            last_error: r.try_get("last_error")?,
            next_attempt_at: rfc3339(r.try_get("next_attempt_at")?),
            created_at: rfc3339(r.try_get("created_at")?),
            updated_at: rfc3339(r.try_get("updated_at")?),
            sent_at: r.try_get::<Option<i64>, _>("sent_at")?.map(rfc3339),
        }
    }};
}

/// A directory entry with the user's chosen locale over the directory's.
pub(crate) const RECIPIENT_SQL: &str =
    "SELECT r.user_id, r.email, r.display_name, r.locale, s.locale, r.active
     FROM recipients r LEFT JOIN user_settings s ON s.user_id = r.user_id
     WHERE r.user_id = $1";

pub(crate) type RecipientRow = (String, String, String, String, Option<String>, i64);

pub(crate) fn recipient(r: RecipientRow) -> Recipient {
    Recipient {
        user_id: r.0,
        email: r.1,
        display_name: r.2,
        locale: r.4.unwrap_or(r.3),
        active: r.5 != 0,
    }
}

pub(crate) fn rfc3339(us: i64) -> String {
    Timestamp::from_micros(us).to_rfc3339()
}

fn invalid(field: impl Into<String>, msg: impl Into<String>) -> Problem {
    let field = field.into();
    let msg = msg.into();
    Problem::new(ErrorCode::ValidationFailed)
        .with_detail(format!("{field}: {msg}"))
        .with_field(field, msg)
}

fn not_found(what: &str) -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail(format!("no such {what}"))
        .into()
}

type TemplateRow = (String, String, i64, String, String, Option<String>, i64);

fn template(r: TemplateRow) -> Template {
    Template {
        key: r.0,
        locale: r.1,
        version: r.2,
        subject: r.3,
        text: r.4,
        html: r.5,
        created_at: rfc3339(r.6),
    }
}

const TEMPLATE_COLUMNS: &str =
    "template_key, locale, version, subject, text_body, html_body, created_at";

type InAppRow = (String, String, String, String, String, i64, Option<i64>);

fn in_app(r: InAppRow) -> Result<InAppNotification, StoreError> {
    Ok(InAppNotification {
        id: r.0,
        kind: r.1,
        title: r.2,
        body: r.3,
        data: serde_json::from_str(&r.4)?,
        created_at: rfc3339(r.5),
        read_at: r.6.map(rfc3339),
    })
}

const IN_APP_COLUMNS: &str = "id, kind, title, body, data, created_at, read_at";

impl Notifications {
    /// Migrates, seeds the default templates and prepares the transports.
    pub async fn open(
        db: Db,
        relay: Relay,
        cfg: NotifyConfig,
    ) -> Result<Notifications, StoreError> {
        let from: Mailbox = cfg.from.parse().map_err(|e| StoreError::DataDir {
            path: cfg.mailbox_dir.clone(),
            reason: format!(
                "notifications sender `{}` is not a valid mailbox: {e}",
                cfg.from
            ),
        })?;
        std::fs::create_dir_all(&cfg.mailbox_dir).map_err(|e| StoreError::DataDir {
            path: cfg.mailbox_dir.clone(),
            reason: format!("cannot create the mailbox directory: {e}"),
        })?;
        db.migrate(outbox::KERNEL_MIGRATIONS).await?;
        db.migrate(MIGRATIONS).await?;
        seed_templates(&db).await?;
        let smtp = cfg.smtp.as_ref().map(dispatch::smtp_transport);
        Ok(Notifications {
            db,
            relay,
            id_domain: from.email.domain().to_owned(),
            from,
            cfg,
            smtp,
            push: Arc::new(LogPush),
            wake: Arc::new(Notify::new()),
        })
    }

    /// Replaces the push provider (the default logs and records `push_log`).
    pub fn with_push_provider(mut self, provider: Arc<dyn PushProvider>) -> Self {
        self.push = provider;
        self
    }

    pub fn config(&self) -> &NotifyConfig {
        &self.cfg
    }

    /// Wakes the dispatcher: deliveries were queued or became due.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A user from the directory, with their effective locale.
    pub async fn recipient(&self, user_id: &str) -> Result<Option<Recipient>, StoreError> {
        let row: Option<RecipientRow> = on_pool!(&self.db, |p| sqlx::query_as(RECIPIENT_SQL)
            .bind(user_id)
            .fetch_optional(p)
            .await)?;
        Ok(row.map(recipient))
    }

    /// Every stored template version, by key and locale, newest version first.
    pub async fn templates(&self) -> Result<Vec<Template>, StoreError> {
        let sql = format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates ORDER BY template_key, locale, version DESC"
        );
        let rows: Vec<TemplateRow> =
            on_pool!(&self.db, |p| sqlx::query_as(&sql).fetch_all(p).await)?;
        Ok(rows.into_iter().map(template).collect())
    }

    /// The latest version of `key` for `locale`, falling back to the
    /// language and then to English.
    pub async fn resolve_template(
        &self,
        key: &str,
        locale: &str,
    ) -> Result<Option<Template>, StoreError> {
        let sql = format!(
            "SELECT {TEMPLATE_COLUMNS} FROM templates WHERE template_key = $1 AND locale = $2
             ORDER BY version DESC LIMIT 1"
        );
        for candidate in template::fallback_chain(locale) {
            let row: Option<TemplateRow> = on_pool!(&self.db, |p| sqlx::query_as(&sql)
                .bind(key)
                .bind(&candidate)
                .fetch_optional(p)
                .await)?;
            if let Some(r) = row {
                return Ok(Some(template(r)));
            }
        }
        Ok(None)
    }

    /// Stores the next version of `key` in `locale`, once it renders with
    /// the variables of its kind. Later deliveries use it.
    pub async fn put_template(
        &self,
        key: &str,
        locale: &str,
        new: NewTemplate,
    ) -> Result<Template, ApiError> {
        let kind = template::kind(key).ok_or_else(|| not_found("notification type"))?;
        let Some(locale) = template::normalize_locale(locale) else {
            return Err(invalid("locale", "a locale such as `en`, `pt` or `pt-BR`").into());
        };
        let mut p =
            Problem::new(ErrorCode::ValidationFailed).with_detail("the template is not valid");
        let mut bad = false;
        let subject_len = new.subject.chars().count();
        if subject_len == 0 || subject_len > 200 || new.subject.contains(['\r', '\n']) {
            p = p.with_field("subject", "1 to 200 characters on one line");
            bad = true;
        }
        if new.text.trim().is_empty() || new.text.chars().count() > 20_000 {
            p = p.with_field("text", "1 to 20000 characters");
            bad = true;
        }
        if new
            .html
            .as_ref()
            .is_some_and(|h| h.trim().is_empty() || h.chars().count() > 100_000)
        {
            p = p.with_field("html", "1 to 100000 characters, or null");
            bad = true;
        }
        if !bad {
            for (field, msg) in template::check(kind, &new.subject, &new.text, new.html.as_deref())
            {
                p = p.with_field(field, msg);
                bad = true;
            }
        }
        if bad {
            return Err(p.into());
        }
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let version: i64 = on_tx!(&mut tx, |c| sqlx::query_scalar(
            "SELECT CAST(COALESCE(MAX(version), 0) + 1 AS BIGINT) FROM templates
             WHERE template_key = $1 AND locale = $2"
        )
        .bind(key)
        .bind(&locale)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?;
        let inserted = on_tx!(&mut tx, |c| {
            sqlx::query(
            "INSERT INTO templates (template_key, locale, version, subject, text_body, html_body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)"
        )
        .bind(key)
        .bind(&locale)
        .bind(version)
        .bind(&new.subject)
        .bind(&new.text)
        .bind(new.html.as_deref())
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        });
        match inserted {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(Problem::new(ErrorCode::Conflict)
                    .with_detail(
                        "another version of this template was stored at the same time; retry",
                    )
                    .into());
            }
            Err(e) => return Err(StoreError::from(e).into()),
        }
        tx.commit().await?;
        tracing::info!(key, locale, version, "notification template version stored");
        Ok(Template {
            key: key.to_owned(),
            locale,
            version,
            subject: new.subject,
            text: new.text,
            html: new.html,
            created_at: rfc3339(now),
        })
    }

    pub async fn preferences(&self, user_id: &str) -> Result<Preferences, StoreError> {
        let (opt_out, locale): (Vec<(String, String)>, Option<Option<String>>) =
            on_pool!(&self.db, |p| {
                let o = sqlx::query_as(
                    "SELECT channel, kind FROM opt_outs WHERE user_id = $1 ORDER BY channel, kind",
                )
                .bind(user_id)
                .fetch_all(p)
                .await?;
                let l = sqlx::query_scalar("SELECT locale FROM user_settings WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(p)
                    .await?;
                Ok::<_, sqlx::Error>((o, l))
            })?;
        Ok(Preferences {
            opt_out: opt_out
                .into_iter()
                .map(|(channel, kind)| OptOut { channel, kind })
                .collect(),
            locale: locale.flatten(),
        })
    }

    /// Replaces a user's preferences.
    pub async fn set_preferences(
        &self,
        user_id: &str,
        prefs: Preferences,
    ) -> Result<Preferences, ApiError> {
        let mut p =
            Problem::new(ErrorCode::ValidationFailed).with_detail("the preferences are not valid");
        let mut bad = false;
        if prefs.opt_out.len() > 100 {
            p = p.with_field("opt_out", "at most 100 entries");
            bad = true;
        }
        for (i, o) in prefs.opt_out.iter().enumerate() {
            if o.channel != "*" && Channel::parse(&o.channel).is_none() {
                p = p.with_field(
                    format!("opt_out[{i}].channel"),
                    "`email`, `in_app`, `push` or `*`",
                );
                bad = true;
            }
            if o.kind != "*" && template::kind(&o.kind).is_none() {
                let known: Vec<&str> = template::KINDS.iter().map(|k| k.key).collect();
                p = p.with_field(
                    format!("opt_out[{i}].type"),
                    format!("one of {} or `*`", known.join(", ")),
                );
                bad = true;
            }
        }
        let locale = match prefs.locale.as_deref() {
            None => None,
            Some(l) => match template::normalize_locale(l) {
                Some(l) => Some(l),
                None => {
                    p = p.with_field("locale", "a locale such as `en`, `pt` or `pt-BR`");
                    bad = true;
                    None
                }
            },
        };
        if bad {
            return Err(p.into());
        }
        let mut opt_out = prefs.opt_out;
        opt_out.sort();
        opt_out.dedup();
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        // The settings row first: its lock queues a user's concurrent saves.
        on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO user_settings (user_id, locale, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (user_id) DO UPDATE SET locale = excluded.locale, updated_at = excluded.updated_at"
        )
        .bind(user_id)
        .bind(locale.as_deref())
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        on_tx!(&mut tx, |c| sqlx::query(
            "DELETE FROM opt_outs WHERE user_id = $1"
        )
        .bind(user_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        for o in &opt_out {
            on_tx!(&mut tx, |c| sqlx::query(
                "INSERT INTO opt_outs (user_id, channel, kind) VALUES ($1, $2, $3)"
            )
            .bind(user_id)
            .bind(&o.channel)
            .bind(&o.kind)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?;
        }
        tx.commit().await?;
        Ok(Preferences { opt_out, locale })
    }

    /// The user's in-app notifications, newest first, after `cursor` (the
    /// last id of the previous page).
    pub async fn in_app(
        &self,
        user_id: &str,
        unread_only: bool,
        limit: i64,
        cursor: Option<&str>,
    ) -> Result<Vec<InAppNotification>, StoreError> {
        let sql = format!(
            "SELECT {IN_APP_COLUMNS} FROM in_app_notifications
             WHERE user_id = $1 AND ($2 = 0 OR read_at IS NULL) AND ($3 = '' OR id < $3)
             ORDER BY id DESC LIMIT $4"
        );
        let rows: Vec<InAppRow> = on_pool!(&self.db, |p| sqlx::query_as(&sql)
            .bind(user_id)
            .bind(i64::from(unread_only))
            .bind(cursor.unwrap_or(""))
            .bind(limit)
            .fetch_all(p)
            .await)?;
        rows.into_iter().map(in_app).collect()
    }

    pub async fn unread_count(&self, user_id: &str) -> Result<i64, StoreError> {
        Ok(on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT count(*) FROM in_app_notifications WHERE user_id = $1 AND read_at IS NULL"
        )
        .bind(user_id)
        .fetch_one(p)
        .await)?)
    }

    /// Marks one of the user's notifications read (once: the first time stays).
    pub async fn mark_read(&self, user_id: &str, id: &str) -> Result<InAppNotification, ApiError> {
        let sql = format!(
            "UPDATE in_app_notifications SET read_at = COALESCE(read_at, $3)
             WHERE id = $1 AND user_id = $2 RETURNING {IN_APP_COLUMNS}"
        );
        let row: Option<InAppRow> = on_pool!(write & self.db, |p| sqlx::query_as(&sql)
            .bind(id)
            .bind(user_id)
            .bind(Timestamp::now().as_micros())
            .fetch_optional(p)
            .await)
        .map_err(StoreError::from)?;
        let row = row.ok_or_else(|| not_found("notification"))?;
        Ok(in_app(row)?)
    }

    /// Emails the local mailbox wrote, newest first, optionally to one address.
    pub async fn mailbox(
        &self,
        to: Option<&str>,
        limit: i64,
    ) -> Result<Vec<MailboxEntry>, StoreError> {
        type MailRow = (
            String,
            String,
            String,
            String,
            Option<String>,
            String,
            String,
            i64,
        );
        let to = to.map(str::to_ascii_lowercase).unwrap_or_default();
        let rows: Vec<MailRow> = on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT id, to_address, subject, text_body, html_body, message_id, path, sent_at
             FROM mailbox WHERE ($1 = '' OR to_address = $1)
             ORDER BY sent_at DESC, id DESC LIMIT $2"
        )
        .bind(&to)
        .bind(limit)
        .fetch_all(p)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|r| MailboxEntry {
                id: r.0,
                to: r.1,
                subject: r.2,
                text: r.3,
                html: r.4,
                message_id: r.5,
                path: r.6,
                sent_at: rfc3339(r.7),
            })
            .collect())
    }

    /// The delivery log, newest first.
    pub async fn deliveries(&self, f: &DeliveryFilter) -> Result<Vec<Delivery>, StoreError> {
        let mut conds = Vec::new();
        let mut args: Vec<String> = Vec::new();
        if let Some(s) = f.status {
            args.push(s.as_str().to_owned());
            conds.push(format!("status = ${}", args.len()));
        }
        if let Some(u) = &f.user_id {
            args.push(u.clone());
            conds.push(format!("user_id = ${}", args.len()));
        }
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries {filter} ORDER BY id DESC LIMIT ${}",
            args.len() + 1
        );
        on_pool!(&self.db, |p| {
            let mut q = sqlx::query(&sql);
            for a in &args {
                q = q.bind(a);
            }
            let rows = q.bind(f.limit).fetch_all(p).await?;
            rows.iter()
                .map(|r| Ok(delivery_row!(r)))
                .collect::<Result<Vec<_>, StoreError>>()
        })
    }

    /// Sends a dead letter again: DEAD → RETRY with its attempts reset (an
    /// SMTP relay that was down longer than the retries lasted). `None` when
    /// there is no such delivery; `Some(false)` when it is not DEAD.
    pub async fn retry_dead(&self, id: &str) -> Result<Option<bool>, StoreError> {
        let now = Timestamp::now().as_micros();
        let n = on_pool!(write & self.db, |p| sqlx::query(
            "UPDATE deliveries SET status = 'RETRY', attempts = 0, next_attempt_at = $2,
                 locked_until = NULL, version = version + 1, updated_at = $2
             WHERE id = $1 AND status = 'DEAD'"
        )
        .bind(id)
        .bind(now)
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?;
        if n > 0 {
            self.wake();
            return Ok(Some(true));
        }
        Ok(self.delivery(id).await?.map(|_| false))
    }

    /// Frees every delivery lease. Only for a process that knows it is the
    /// sole dispatcher (an embedded database under its data-directory lock).
    pub async fn release_leases(&self) -> Result<u64, StoreError> {
        Ok(on_pool!(write & self.db, |p| sqlx::query(
            "UPDATE deliveries SET locked_until = NULL
             WHERE status IN ('QUEUED', 'RETRY') AND locked_until IS NOT NULL"
        )
        .execute(p)
        .await
        .map(|r| r.rows_affected()))?)
    }

    pub async fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = $1");
        on_pool!(&self.db, |p| {
            let row = sqlx::query(&sql).bind(id).fetch_optional(p).await?;
            row.map(|r| Ok(delivery_row!(r))).transpose()
        })
    }

    /// How many deliveries are in each status (`dead` counts the dead letters).
    pub async fn counts(&self) -> Result<DeliveryCounts, StoreError> {
        let rows: Vec<(String, i64)> = on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT status, count(*) FROM deliveries GROUP BY status"
        )
        .fetch_all(p)
        .await)?;
        let mut c = DeliveryCounts::default();
        for (status, n) in rows {
            match DeliveryStatus::parse(&status) {
                Some(DeliveryStatus::Queued) => c.queued = n,
                Some(DeliveryStatus::Retry) => c.retry = n,
                Some(DeliveryStatus::Sent) => c.sent = n,
                Some(DeliveryStatus::Dead) => c.dead = n,
                None => {}
            }
        }
        Ok(c)
    }

    /// The notification types with their variables and channels.
    pub fn kinds(&self) -> Vec<TemplateKind> {
        template::KINDS
            .iter()
            .map(|k| TemplateKind {
                key: k.key.to_owned(),
                variables: k.variables.iter().map(|v| (*v).to_owned()).collect(),
                channels: k.channels.to_vec(),
            })
            .collect()
    }
}

/// Seeds version 1 of every default (key, locale) that has none yet; an
/// admin's later versions are never touched.
async fn seed_templates(db: &Db) -> Result<(), StoreError> {
    let now = Timestamp::now().as_micros();
    let mut tx = db.begin().await?;
    for (key, locale, subject, text, html) in template::DEFAULTS {
        on_tx!(&mut tx, |c| {
            sqlx::query(
            "INSERT INTO templates (template_key, locale, version, subject, text_body, html_body, created_at)
             VALUES ($1, $2, 1, $3, $4, $5, $6)
             ON CONFLICT (template_key, locale, version) DO NOTHING"
        )
        .bind(*key)
        .bind(*locale)
        .bind(*subject)
        .bind(*text)
        .bind(*html)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        })?;
    }
    tx.commit().await
}
