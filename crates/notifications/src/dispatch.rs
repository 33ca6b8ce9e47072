//! Delivery: lease, render, send, record.
//!
//! A dispatcher claims one due delivery at a time with a conditional update
//! that sets a lease (`locked_until`) and bumps `version`; the outcome is
//! recorded only if the version is still the claimed one, so after a lease
//! expires and another dispatcher takes over, the late writer changes
//! nothing. A dispatcher that dies between claim and send leaves the row to
//! be claimed again once the lease has expired. The attempt counter moves at
//! claim time, so a delivery that keeps crashing its dispatcher still ends
//! up DEAD.

use crate::template::{self, Vars};
use crate::{Channel, Notifications, SmtpConfig, TOPIC};
use flowline_core::{Envelope, EventDraft, Timestamp};
use flowline_http::BoxFuture;
use flowline_store::{on_pool, on_tx, outbox, Db, StoreError, Tx};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use sqlx::Row;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why a channel could not send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub message: String,
    /// Retrying cannot help (a rejected address, a template that does not
    /// render): the delivery goes straight to DEAD.
    pub permanent: bool,
}

impl SendError {
    pub fn transient(message: impl std::fmt::Display) -> Self {
        SendError {
            message: message.to_string(),
            permanent: false,
        }
    }

    pub fn permanent(message: impl std::fmt::Display) -> Self {
        SendError {
            message: message.to_string(),
            permanent: true,
        }
    }
}

/// A push notification as handed to a provider.
#[derive(Debug, Clone, PartialEq)]
pub struct PushMessage {
    /// Stable across retries: a provider that supports collapse or
    /// idempotency keys should use it.
    pub delivery_id: String,
    pub user_id: String,
    pub title: String,
    pub body: String,
    pub data: serde_json::Value,
}

/// A push gateway (FCM, APNs, a web-push relay…). Every push a provider
/// accepts is recorded in `push_log`.
pub trait PushProvider: Send + Sync + 'static {
    /// Recorded with each push in `push_log`.
    fn name(&self) -> &'static str;
    fn send<'a>(&'a self, push: &'a PushMessage) -> BoxFuture<'a, Result<(), SendError>>;
}

/// The default provider: no device gateway, the push is logged.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogPush;

impl PushProvider for LogPush {
    fn name(&self) -> &'static str {
        "log"
    }

    fn send<'a>(&'a self, push: &'a PushMessage) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            tracing::info!(delivery_id = %push.delivery_id, user_id = %push.user_id,
                title = %push.title, "push notification");
            Ok(())
        })
    }
}

pub(crate) fn smtp_transport(cfg: &SmtpConfig) -> AsyncSmtpTransport<Tokio1Executor> {
    let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.host.as_str())
        .port(cfg.port)
        .timeout(Some(cfg.timeout));
    if let Some(user) = &cfg.username {
        b = b.credentials(Credentials::new(
            user.clone(),
            cfg.password.clone().unwrap_or_default(),
        ));
    }
    b.build()
}

/// `base * 2^(attempt-1)`, capped at `max`.
pub(crate) fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// A leased delivery.
struct Claimed {
    id: String,
    event_id: String,
    correlation_id: String,
    user_id: String,
    channel: Channel,
    template_key: String,
    locale: String,
    address: Option<String>,
    vars: Vars,
    attempts: i64,
    version: i64,
}

/// What a successful send leaves behind, written with the SENT status.
enum Effect {
    Mailbox {
        to: String,
        subject: String,
        text: String,
        html: Option<String>,
        message_id: String,
        path: String,
    },
    Smtp,
    InApp {
        title: String,
        body: String,
        data: String,
    },
    Push {
        provider: &'static str,
        title: String,
        body: String,
    },
}

struct Sent {
    template_locale: String,
    template_version: i64,
    effect: Effect,
}

struct Failed {
    error: SendError,
    /// Set when rendering got as far as choosing a template.
    template: Option<(String, i64)>,
}

impl From<SendError> for Failed {
    fn from(error: SendError) -> Self {
        Failed {
            error,
            template: None,
        }
    }
}

const CLAIM_COLUMNS: &str = "id, event_id, correlation_id, user_id, channel, template_key, \
    locale, address, vars, attempts, version";

impl Notifications {
    /// Handles up to `batch` due deliveries (claiming each just before it
    /// is sent, so a lease never has to cover a whole batch). Returns how
    /// many were handled, sent or not.
    pub async fn dispatch_once(&self) -> Result<usize, StoreError> {
        self.dispatch(None).await
    }

    /// Dispatches until shutdown: at once when woken (a delivery was queued
    /// or a retry came due), else every `poll`. Several dispatchers, in one
    /// process or many, may run on one database.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let busy = match self.dispatch(Some(&shutdown)).await {
                Ok(n) => {
                    failures = 0;
                    n >= self.cfg.batch.max(1)
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, failures, "notification dispatch failed; will retry");
                    false
                }
            };
            if busy {
                continue;
            }
            let wait = if failures > 0 {
                backoff(
                    Duration::from_millis(100),
                    Duration::from_secs(10),
                    failures,
                )
            } else {
                self.cfg.poll
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                // A dropped sender counts as shutdown (else this would spin).
                r = shutdown.changed() => if r.is_err() { break },
            }
        }
        tracing::debug!("notification dispatcher stopped");
    }

    /// One batch; stops early (between deliveries, never within one) when
    /// `stop` turns true.
    async fn dispatch(&self, stop: Option<&watch::Receiver<bool>>) -> Result<usize, StoreError> {
        let mut n = 0;
        while n < self.cfg.batch.max(1) && !stop.is_some_and(|s| *s.borrow()) {
            let Some(d) = self.claim().await? else { break };
            self.deliver(d).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Leases the most overdue delivery, if any is due.
    async fn claim(&self) -> Result<Option<Claimed>, StoreError> {
        let now = Timestamp::now().as_micros();
        let until = now.saturating_add(micros(self.cfg.lease));
        // `attempts < $3`: a delivery whose attempts crashed the dispatcher
        // (so never recorded an outcome) is not claimed again forever.
        let due = "status IN ('QUEUED', 'RETRY') AND next_attempt_at <= $2 \
                   AND (locked_until IS NULL OR locked_until <= $2) AND attempts < $3";
        let set = "SET locked_until = $1, attempts = attempts + 1, version = version + 1, \
                   updated_at = $2";
        let sql = match self.db {
            // The pick is a materialized CTE: a `LIMIT` subquery under `IN`
            // may be evaluated more than once and claim several rows. SKIP
            // LOCKED keeps concurrent dispatchers off each other's pick, and
            // the outer WHERE re-checks it, so a row another dispatcher
            // claimed meanwhile is left alone.
            Db::Postgres { .. } => format!(
                "WITH pick AS MATERIALIZED (
                    SELECT id AS pick_id FROM deliveries WHERE {due}
                    ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
                 UPDATE deliveries {set} FROM pick
                 WHERE id = pick_id AND {due}
                 RETURNING {CLAIM_COLUMNS}"
            ),
            // One writer at a time: the subquery and the update see the same rows.
            Db::Sqlite { .. } => format!(
                "UPDATE deliveries {set}
                 WHERE id IN (SELECT id FROM deliveries WHERE {due}
                              ORDER BY next_attempt_at, id LIMIT 1)
                   AND {due}
                 RETURNING {CLAIM_COLUMNS}"
            ),
        };
        on_pool!(write & self.db, |p| {
            let row = sqlx::query(&sql)
                .bind(until)
                .bind(now)
                .bind(i64::from(self.cfg.max_attempts))
                .fetch_optional(p)
                .await?;
            let Some(r) = row else { return Ok(None) };
            let channel: String = r.try_get("channel")?;
            let vars: String = r.try_get("vars")?;
            let id: String = r.try_get("id")?;
            Ok(Some(Claimed {
                channel: Channel::parse(&channel).ok_or_else(|| {
                    StoreError::CorruptEvent(format!("delivery {id} channel {channel}"))
                })?,
                vars: serde_json::from_str(&vars)?,
                event_id: r.try_get("event_id")?,
                correlation_id: r.try_get("correlation_id")?,
                user_id: r.try_get("user_id")?,
                template_key: r.try_get("template_key")?,
                locale: r.try_get("locale")?,
                address: r.try_get("address")?,
                attempts: r.try_get("attempts")?,
                version: r.try_get("version")?,
                id,
            }))
        })
    }

    async fn deliver(&self, d: Claimed) -> Result<(), StoreError> {
        // Bounded well inside the lease: a hung provider must neither stall
        // this node's dispatcher nor let another node send it again.
        let attempt = tokio::time::timeout(self.cfg.lease / 2, self.attempt(&d)).await;
        match attempt {
            Ok(Ok(sent)) => self.record_sent(&d, sent).await,
            Ok(Err(failed)) => self.record_failure(&d, failed).await,
            Err(_) => {
                let failed = Failed {
                    error: SendError::transient("the send timed out"),
                    template: None,
                };
                self.record_failure(&d, failed).await
            }
        }
    }

    /// Renders and sends; writes nothing to the database.
    async fn attempt(&self, d: &Claimed) -> Result<Sent, Failed> {
        let store = |e: StoreError| SendError::transient(format!("storage: {e}"));
        let r = self
            .recipient(&d.user_id)
            .await
            .map_err(store)?
            .ok_or_else(|| SendError::permanent("the recipient left the directory"))?;
        if !r.active {
            // Banned after this was queued: nothing more reaches them.
            return Err(SendError::permanent("the recipient is no longer active").into());
        }
        let t = self
            .resolve_template(&d.template_key, &d.locale)
            .await
            .map_err(store)?
            .ok_or_else(|| {
                SendError::permanent(format!(
                    "no `{}` template for {} or a fallback",
                    d.template_key, d.locale
                ))
            })?;
        let used = (t.locale.clone(), t.version);
        let fail = |error: SendError| Failed {
            error,
            template: Some(used.clone()),
        };
        let mut vars = d.vars.clone();
        vars.insert("name".into(), r.display_name.clone());
        vars.insert("email".into(), r.email.clone());
        let rendered = (|| {
            let subject = template::one_line(&template::render(&t.subject, &vars, false)?);
            let text = template::render(&t.text, &vars, false)?;
            let html = t
                .html
                .as_deref()
                .map(|h| template::render(h, &vars, true))
                .transpose()?;
            Ok::<_, template::RenderError>((subject, text, html))
        })();
        let (subject, text, html) = rendered.map_err(|e| {
            fail(SendError::permanent(format!(
                "template {}/{} v{}: {e}",
                t.key, t.locale, t.version
            )))
        })?;
        let effect = match d.channel {
            Channel::Email => {
                let address = d.address.clone().unwrap_or_else(|| r.email.clone());
                self.email(d, &r.display_name, &address, subject, text, html)
                    .await
                    .map_err(fail)?
            }
            Channel::InApp => {
                let data =
                    serde_json::to_string(&d.vars).map_err(|e| fail(SendError::permanent(e)))?;
                Effect::InApp {
                    title: subject,
                    body: text,
                    data,
                }
            }
            Channel::Push => {
                let push = PushMessage {
                    delivery_id: d.id.clone(),
                    user_id: d.user_id.clone(),
                    title: subject,
                    body: text,
                    data: serde_json::to_value(&d.vars).unwrap_or_default(),
                };
                self.push.send(&push).await.map_err(fail)?;
                Effect::Push {
                    provider: self.push.name(),
                    title: push.title,
                    body: push.body,
                }
            }
        };
        Ok(Sent {
            template_locale: used.0,
            template_version: used.1,
            effect,
        })
    }

    /// Builds the MIME message and hands it to SMTP or the local mailbox.
    async fn email(
        &self,
        d: &Claimed,
        name: &str,
        address: &str,
        subject: String,
        text: String,
        html: Option<String>,
    ) -> Result<Effect, SendError> {
        let to_addr: lettre::Address = address
            .parse()
            .map_err(|e| SendError::permanent(format!("recipient address `{address}`: {e}")))?;
        let name = template::one_line(name);
        let to = Mailbox::new((!name.is_empty()).then_some(name), to_addr);
        // Derived from the delivery id: a resend after a lost acknowledgement
        // carries the same id, which receivers use to drop the duplicate.
        let message_id = format!("<{}@{}>", d.id, self.id_domain);
        let builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject.clone())
            .message_id(Some(message_id.clone()));
        let msg = match &html {
            Some(h) => {
                builder.multipart(MultiPart::alternative_plain_html(text.clone(), h.clone()))
            }
            None => builder.singlepart(SinglePart::plain(text.clone())),
        }
        .map_err(|e| SendError::permanent(format!("cannot build the message: {e}")))?;
        if let Some(smtp) = &self.smtp {
            // Retried even on 5xx: a relay restart or a rotated password
            // refuses every message for a while, and a dead letter is not
            // resent by itself. Attempts still run out at `max_attempts`.
            smtp.send(msg)
                .await
                .map_err(|e| SendError::transient(format!("smtp: {e}")))?;
            return Ok(Effect::Smtp);
        }
        // Named by the delivery id and moved into place whole: a retry
        // overwrites the same file, a reader never sees half a message.
        let path = self.cfg.mailbox_dir.join(format!("{}.eml", d.id));
        let tmp = self.cfg.mailbox_dir.join(format!(".{}.eml.tmp", d.id));
        let io =
            |e: std::io::Error| SendError::transient(format!("mailbox {}: {e}", path.display()));
        tokio::fs::write(&tmp, msg.formatted()).await.map_err(io)?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        Ok(Effect::Mailbox {
            to: address.to_ascii_lowercase(),
            subject,
            text,
            html,
            message_id,
            path: path.display().to_string(),
        })
    }

    /// Writes SENT, the channel's row and `notification.sent`, if the lease
    /// is still ours.
    async fn record_sent(&self, d: &Claimed, s: Sent) -> Result<(), StoreError> {
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let n = on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE deliveries SET status = 'SENT', sent_at = $1, updated_at = $1,
                locked_until = NULL, last_error = NULL, template_locale = $2,
                template_version = $3, version = version + 1
             WHERE id = $4 AND version = $5"
        )
        .bind(now)
        .bind(&s.template_locale)
        .bind(s.template_version)
        .bind(&d.id)
        .bind(d.version)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        if n == 0 {
            tx.rollback().await?;
            tracing::warn!(delivery_id = %d.id, "delivery lease lost before the send was recorded");
            return Ok(());
        }
        write_effect(&mut tx, d, &s.effect, now).await?;
        let payload = serde_json::json!({
            "delivery_id": d.id, "event_id": d.event_id, "user_id": d.user_id,
            "channel": d.channel, "type": d.template_key, "locale": s.template_locale,
            "template_version": s.template_version, "attempts": d.attempts,
            "sent_at": crate::rfc3339(now),
        });
        self.emit(&mut tx, d, "notification.sent", payload).await?;
        tx.commit().await?;
        self.relay.notify();
        tracing::info!(delivery_id = %d.id, channel = d.channel.as_str(),
            template = %d.template_key, attempts = d.attempts, "notification sent");
        Ok(())
    }

    /// Schedules a retry, or at the limit (or on a permanent error) makes
    /// the delivery DEAD with `notification.dead_lettered`.
    async fn record_failure(&self, d: &Claimed, f: Failed) -> Result<(), StoreError> {
        let now = Timestamp::now().as_micros();
        let attempts = u32::try_from(d.attempts).unwrap_or(u32::MAX);
        let dead = f.error.permanent || attempts >= self.cfg.max_attempts;
        let delay = backoff(self.cfg.backoff_base, self.cfg.backoff_max, attempts);
        let (status, next) = if dead {
            ("DEAD", now)
        } else {
            ("RETRY", now.saturating_add(micros(delay)))
        };
        let (t_locale, t_version) = f.template.clone().unzip();
        let mut tx = self.db.begin().await?;
        let n = on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE deliveries SET status = $1, next_attempt_at = $2, last_error = $3,
                locked_until = NULL, updated_at = $4,
                template_locale = COALESCE($5, template_locale),
                template_version = COALESCE($6, template_version), version = version + 1
             WHERE id = $7 AND version = $8"
        )
        .bind(status)
        .bind(next)
        .bind(&f.error.message)
        .bind(now)
        .bind(t_locale.as_deref())
        .bind(t_version)
        .bind(&d.id)
        .bind(d.version)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        if n == 0 {
            tx.rollback().await?;
            tracing::warn!(delivery_id = %d.id, "delivery lease lost before the failure was recorded");
            return Ok(());
        }
        if dead {
            let payload = serde_json::json!({
                "delivery_id": d.id, "event_id": d.event_id, "user_id": d.user_id,
                "channel": d.channel, "type": d.template_key, "attempts": d.attempts,
                "reason": f.error.message,
            });
            self.emit(&mut tx, d, "notification.dead_lettered", payload)
                .await?;
        }
        tx.commit().await?;
        if dead {
            self.relay.notify();
            tracing::error!(delivery_id = %d.id, channel = d.channel.as_str(),
                attempts = d.attempts, error = %f.error.message, "notification dead-lettered");
        } else {
            tracing::warn!(delivery_id = %d.id, channel = d.channel.as_str(),
                attempts = d.attempts, delay_ms = delay.as_millis() as u64,
                error = %f.error.message, "notification failed; will retry");
            self.wake_after(delay);
        }
        Ok(())
    }

    /// Adds an event caused by the delivery's source event (same
    /// correlation), keyed by user so a user's notifications stay in order.
    async fn emit(
        &self,
        tx: &mut Tx,
        d: &Claimed,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<(), StoreError> {
        let draft = EventDraft::new(TOPIC, event_type, d.user_id.clone(), payload);
        let ev = Envelope::stamp(draft, &d.correlation_id, Some(&d.event_id));
        outbox::enqueue(tx, &ev).await
    }

    /// Wakes the dispatcher when a short backoff ends, rather than at its
    /// next idle poll.
    fn wake_after(&self, wait: Duration) {
        if wait < self.cfg.poll {
            let wake = self.wake.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                wake.notify_one();
            });
        }
    }
}

/// The channel's own record of a send, keyed by the delivery id (a second
/// write of the same delivery is a no-op).
async fn write_effect(
    tx: &mut Tx,
    d: &Claimed,
    effect: &Effect,
    now: i64,
) -> Result<(), StoreError> {
    match effect {
        Effect::Smtp => {}
        Effect::Mailbox {
            to,
            subject,
            text,
            html,
            message_id,
            path,
        } => {
            on_tx!(&mut *tx, |c| {
                sqlx::query(
                "INSERT INTO mailbox (id, to_address, subject, text_body, html_body, message_id, path, sent_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING"
            )
            .bind(&d.id)
            .bind(to)
            .bind(subject)
            .bind(text)
            .bind(html.as_deref())
            .bind(message_id)
            .bind(path)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
            })?;
        }
        Effect::InApp { title, body, data } => {
            on_tx!(&mut *tx, |c| {
                sqlx::query(
                "INSERT INTO in_app_notifications (id, user_id, kind, title, body, data, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING"
            )
            .bind(&d.id)
            .bind(&d.user_id)
            .bind(&d.template_key)
            .bind(title)
            .bind(body)
            .bind(data)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
            })?;
        }
        Effect::Push {
            provider,
            title,
            body,
        } => {
            on_tx!(&mut *tx, |c| sqlx::query(
                "INSERT INTO push_log (id, user_id, provider, title, body, sent_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING"
            )
            .bind(&d.id)
            .bind(&d.user_id)
            .bind(*provider)
            .bind(title)
            .bind(body)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(100);
        let m = Duration::from_secs(2);
        assert_eq!(backoff(b, m, 1), b);
        assert_eq!(backoff(b, m, 3), Duration::from_millis(400));
        assert_eq!(backoff(b, m, 9), m);
        assert_eq!(backoff(b, m, 90), m);
    }
}
