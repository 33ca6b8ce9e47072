//! The consumer: keeps the recipients directory and turns events into
//! queued deliveries.
//!
//! Every effect commits in one transaction with the inbox claim of its
//! event, so a redelivered event finds its claim and queues nothing: one
//! event, at most one delivery per channel, however often it arrives.

use crate::template::{self, Vars, DEFAULT_LOCALE};
use crate::{Channel, Notifications, Recipient};
use flowline_core::{Envelope, RecordedEvent, Timestamp};
use flowline_store::{inbox, on_tx, Handler, HandlerError, Tx};
use serde::{Deserialize, Deserializer};
use std::sync::Arc;

/// The consumer group (and inbox consumer name).
pub const GROUP: &str = "notifications";
pub const USER_TOPIC: &str = "user.events";
pub const ORDERS_TOPIC: &str = "orders.events";
pub const SHIPPING_TOPIC: &str = "shipping.events";
/// `message.missed`: a mention or direct message for a user with no live
/// connection (the messaging context decides who is offline).
pub const NOTICES_TOPIC: &str = "messaging.notices";
/// Subscribed topics. `user.events` comes first: a pass of the consumer
/// reads the directory's updates before the orders that need them.
pub const TOPICS: &[&str] = &[USER_TOPIC, ORDERS_TOPIC, SHIPPING_TOPIC, NOTICES_TOPIC];
/// A second group for [`DIRECTORY_TOPICS`] alone, run beside [`GROUP`].
///
/// A consumer retries a failing event in place, holding its other topics
/// meanwhile: an order for a user whose registration is appended a moment
/// later would wait on a directory that cannot move. This group keeps the
/// directory moving independently. Both groups share the inbox name
/// [`GROUP`], so whichever handles a `user.*` event first applies it and
/// the other finds it claimed.
pub const DIRECTORY_GROUP: &str = "notifications.directory";
pub const DIRECTORY_TOPICS: &[&str] = &[USER_TOPIC];

/// The notifications consumer of [`TOPICS`] (group [`GROUP`]).
pub struct Notifier(pub Arc<Notifications>);

/// A string, or a number taken as its decimal text (order numbers may be either).
fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string, got {other}"
        ))),
    }
}

#[derive(Debug, Deserialize)]
struct Registered {
    user_id: String,
    email: String,
    #[serde(default)]
    display_name: String,
    /// Not sent by identity today; honoured when it is.
    #[serde(default)]
    locale: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Updated {
    user_id: String,
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    email: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Banned {
    user_id: String,
}

#[derive(Debug, Deserialize)]
struct Total {
    amount: i64,
    currency: String,
}

#[derive(Debug, Deserialize)]
struct Item {
    #[serde(default)]
    title: String,
    #[serde(default)]
    product_id: String,
    quantity: i64,
}

#[derive(Debug, Deserialize)]
struct OrderConfirmed {
    #[serde(deserialize_with = "text")]
    order_id: String,
    #[serde(deserialize_with = "text")]
    order_number: String,
    user_id: String,
    total: Total,
    #[serde(default)]
    items: Vec<Item>,
}

#[derive(Debug, Deserialize)]
struct OrderCancelled {
    #[serde(deserialize_with = "text")]
    order_id: String,
    #[serde(deserialize_with = "text")]
    order_number: String,
    user_id: String,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Shipment {
    #[serde(deserialize_with = "text")]
    shipment_id: String,
    #[serde(deserialize_with = "text")]
    order_id: String,
    #[serde(deserialize_with = "text")]
    order_number: String,
    user_id: String,
    status: String,
    #[serde(default)]
    tracking_number: Option<String>,
    #[serde(default)]
    at: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Missed {
    user_id: String,
    reason: String,
    channel_id: String,
    author_id: String,
    #[serde(default)]
    excerpt: String,
}

fn parse<T: serde::de::DeserializeOwned>(e: &Envelope) -> Result<T, HandlerError> {
    serde_json::from_value(e.payload.clone()).map_err(|err| {
        HandlerError::permanent(format!("{} {}: bad payload: {err}", e.event_type, e.id))
    })
}

/// `29990 BRL` → `BRL 299.90` (minor units by the currency's exponent).
pub(crate) fn money(amount: i64, currency: &str) -> String {
    let zero_decimals = ["CLP", "ISK", "JPY", "KRW", "VND"].contains(&currency);
    if zero_decimals {
        return format!("{currency} {amount}");
    }
    let sign = if amount < 0 { "-" } else { "" };
    let a = amount.unsigned_abs();
    format!("{currency} {sign}{}.{:02}", a / 100, a % 100)
}

fn vars<const N: usize>(pairs: [(&str, String); N]) -> Vars {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

impl Handler for Notifier {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let e = &ev.envelope;
        match e.event_type.as_str() {
            "user.registered" => self.registered(e, parse(e)?).await,
            "user.updated" => self.updated(e, parse(e)?).await,
            "user.banned" => self.banned(e, parse(e)?).await,
            "order.confirmed" => {
                let p: OrderConfirmed = parse(e)?;
                let lines: Vec<String> = p
                    .items
                    .iter()
                    .map(|i| {
                        let title = if i.title.is_empty() {
                            &i.product_id
                        } else {
                            &i.title
                        };
                        format!("{} x {title}", i.quantity)
                    })
                    .collect();
                let count: i64 = p.items.iter().map(|i| i.quantity).sum();
                let v = vars([
                    ("order_id", p.order_id),
                    ("order_number", p.order_number),
                    ("total", money(p.total.amount, &p.total.currency)),
                    ("items", lines.join("\n")),
                    ("item_count", count.to_string()),
                ]);
                self.notify(e, &p.user_id, "order_confirmed", v).await
            }
            "order.cancelled" => {
                let p: OrderCancelled = parse(e)?;
                let v = vars([
                    ("order_id", p.order_id),
                    ("order_number", p.order_number),
                    (
                        "reason",
                        p.reason.unwrap_or_else(|| "no reason given".into()),
                    ),
                ]);
                self.notify(e, &p.user_id, "order_cancelled", v).await
            }
            t @ ("shipment.picked" | "shipment.in_transit" | "shipment.delivered") => {
                let key = match t {
                    "shipment.picked" => "shipment_picked",
                    "shipment.in_transit" => "shipment_in_transit",
                    _ => "shipment_delivered",
                };
                let p: Shipment = parse(e)?;
                let mut v = vars([
                    ("shipment_id", p.shipment_id),
                    ("order_id", p.order_id),
                    ("order_number", p.order_number),
                    ("status", p.status),
                    ("at", p.at.unwrap_or_else(|| e.occurred_at.to_rfc3339())),
                ]);
                // Absent until the carrier assigns one: a template that needs
                // it fails (and says so) rather than printing nothing.
                if let Some(t) = p.tracking_number {
                    v.insert("tracking_number".into(), t);
                }
                self.notify(e, &p.user_id, key, v).await
            }
            "message.missed" => {
                let p: Missed = parse(e)?;
                let key = if p.reason == "direct" {
                    "message_direct"
                } else {
                    "message_mention"
                };
                let sender = match self.0.recipient(&p.author_id).await? {
                    Some(r) if !r.display_name.is_empty() => r.display_name,
                    _ => p.author_id.clone(),
                };
                let v = vars([
                    ("sender", sender),
                    ("conversation_id", p.channel_id),
                    ("excerpt", p.excerpt),
                ]);
                self.notify(e, &p.user_id, key, v).await
            }
            _ => Ok(()),
        }
    }
}

impl Notifier {
    /// Queues a notification asked for directly rather than caused by an
    /// event. `id` stands in for the event id: asking again with the same id
    /// queues nothing more.
    pub async fn request(
        &self,
        id: uuid::Uuid,
        correlation_id: &str,
        user_id: &str,
        key: &'static str,
        v: Vars,
    ) -> Result<(), HandlerError> {
        let draft = flowline_core::EventDraft::new(
            "notifications.requests",
            format!("request.{key}"),
            user_id,
            serde_json::to_value(&v)?,
        );
        let mut e = Envelope::stamp(draft, correlation_id, None);
        e.id = id;
        self.notify(&e, user_id, key, v).await
    }

    async fn registered(&self, e: &Envelope, p: Registered) -> Result<(), HandlerError> {
        let locale = p
            .locale
            .as_deref()
            .and_then(template::normalize_locale)
            .unwrap_or_else(|| DEFAULT_LOCALE.to_owned());
        let mut tx = self.0.db.begin().await?;
        if !inbox::claim(&mut tx, GROUP, e.id).await? {
            tx.commit().await?;
            return Ok(());
        }
        on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO recipients (user_id, email, display_name, locale, active, updated_at)
             VALUES ($1, $2, $3, $4, 1, $5)
             ON CONFLICT (user_id) DO UPDATE SET email = excluded.email,
                display_name = excluded.display_name, updated_at = excluded.updated_at"
        )
        .bind(&p.user_id)
        .bind(&p.email)
        .bind(&p.display_name)
        .bind(&locale)
        .bind(Timestamp::now().as_micros())
        .execute(c)
        .await
        .map(|r| r.rows_affected()))?;
        let v = vars([("email", p.email.clone())]);
        self.queue(tx, e, &p.user_id, "welcome", v).await
    }

    async fn updated(&self, e: &Envelope, p: Updated) -> Result<(), HandlerError> {
        let mut tx = self.0.db.begin().await?;
        if inbox::claim(&mut tx, GROUP, e.id).await? {
            // A user the directory never saw has nothing to update (their
            // registration predates this consumer's start).
            on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE recipients SET display_name = COALESCE($2, display_name),
                    email = COALESCE($3, email), updated_at = $4
                 WHERE user_id = $1"
            )
            .bind(&p.user_id)
            .bind(p.display_name.as_deref())
            .bind(p.email.as_deref())
            .bind(Timestamp::now().as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn banned(&self, e: &Envelope, p: Banned) -> Result<(), HandlerError> {
        let mut tx = self.0.db.begin().await?;
        if inbox::claim(&mut tx, GROUP, e.id).await? {
            on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE recipients SET active = 0, updated_at = $2 WHERE user_id = $1"
            )
            .bind(&p.user_id)
            .bind(Timestamp::now().as_micros())
            .execute(c)
            .await
            .map(|r| r.rows_affected()))?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Queues `key` for `user_id` in a transaction of its own.
    async fn notify(
        &self,
        e: &Envelope,
        user_id: &str,
        key: &'static str,
        v: Vars,
    ) -> Result<(), HandlerError> {
        let mut tx = self.0.db.begin().await?;
        if !inbox::claim(&mut tx, GROUP, e.id).await? {
            tx.commit().await?;
            return Ok(());
        }
        self.queue(tx, e, user_id, key, v).await
    }

    /// Queues one delivery per channel the user has not opted out of, and
    /// commits `tx` (which holds the event's claim).
    async fn queue(
        &self,
        mut tx: Tx,
        e: &Envelope,
        user_id: &str,
        key: &'static str,
        v: Vars,
    ) -> Result<(), HandlerError> {
        let kind = template::kind(key)
            .ok_or_else(|| HandlerError::permanent(format!("no notification type `{key}`")))?;
        let Some(r) = recipient_in(&mut tx, user_id).await? else {
            // The user's registration has not reached the directory yet (it
            // travels on another topic): roll the claim back and retry.
            tx.rollback().await?;
            return Err(HandlerError::transient(format!(
                "{} {}: user {user_id} is not in the recipients directory yet",
                e.event_type, e.id
            )));
        };
        if !r.active {
            tx.commit().await?;
            tracing::info!(user_id, event_type = %e.event_type, "recipient inactive; nothing queued");
            return Ok(());
        }
        let opted: Vec<(String, String)> = on_tx!(&mut tx, |c| sqlx::query_as(
            "SELECT channel, kind FROM opt_outs WHERE user_id = $1"
        )
        .bind(user_id)
        .fetch_all(c)
        .await)?;
        let vars_json = serde_json::to_string(&v)?;
        let now = Timestamp::now().as_micros();
        let mut queued = 0;
        for ch in kind.channels {
            let out = opted
                .iter()
                .any(|(c, k)| (c == "*" || c == ch.as_str()) && (k == "*" || k == kind.key));
            if out {
                continue;
            }
            let address = (*ch == Channel::Email).then_some(r.email.as_str());
            let id = flowline_core::id::new_id().to_string();
            queued += on_tx!(&mut tx, |c| {
                sqlx::query(
                "INSERT INTO deliveries (id, event_id, event_type, correlation_id, user_id, channel,
                    template_key, locale, address, vars, status, attempts, next_attempt_at,
                    version, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'QUEUED', 0, $11, 0, $11, $11)
                 ON CONFLICT (event_id, channel) DO NOTHING"
            )
            .bind(&id)
            .bind(e.id.to_string())
            .bind(&e.event_type)
            .bind(&e.correlation_id)
            .bind(user_id)
            .bind(ch.as_str())
            .bind(kind.key)
            .bind(&r.locale)
            .bind(address)
            .bind(&vars_json)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected())
            })?;
        }
        tx.commit().await?;
        if queued > 0 {
            self.0.wake();
        }
        Ok(())
    }
}

/// The directory entry within `tx` (the claim's transaction).
async fn recipient_in(tx: &mut Tx, user_id: &str) -> Result<Option<Recipient>, HandlerError> {
    let row: Option<crate::RecipientRow> = on_tx!(tx, |c| sqlx::query_as(crate::RECIPIENT_SQL)
        .bind(user_id)
        .fetch_optional(c)
        .await)?;
    Ok(row.map(crate::recipient))
}

#[cfg(test)]
mod tests {
    #[test]
    fn money_uses_the_currency_exponent() {
        assert_eq!(super::money(29990, "BRL"), "BRL 299.90");
        assert_eq!(super::money(5, "USD"), "USD 0.05");
        assert_eq!(super::money(1200, "JPY"), "JPY 1200");
        assert_eq!(super::money(-150, "EUR"), "EUR -1.50");
    }
}
