//! The context's consumers that run once per cluster: the user directory
//! (from `user.events`) and the feed behind `GET /api/v1/events`.

use crate::{Messaging, MESSAGES_TOPIC};
use flowline_core::{RecordedEvent, Timestamp};
use flowline_store::{on_tx, Handler, HandlerError, StoreError};
use serde_json::{json, Value};
use std::sync::Arc;

pub const DIRECTORY_GROUP: &str = "messaging.directory";
pub const FEED_GROUP: &str = "messaging.feed";
pub const FEED_TOPICS: [&str; 3] = ["orders.events", "notifications.events", MESSAGES_TOPIC];

/// Keeps `users` (who can be added to a workspace or mentioned).
pub struct Directory(pub Arc<Messaging>);

impl Handler for Directory {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let e = &ev.envelope;
        let p = &e.payload;
        let Some(user_id) = p.get("user_id").and_then(Value::as_str) else {
            return Ok(());
        };
        let now = Timestamp::now().as_micros();
        let name = p.get("display_name").and_then(Value::as_str);
        let mut tx = self.0.db.begin().await?;
        // Upserts and updates: a replay or redelivery writes the same row again.
        match e.event_type.as_str() {
            "user.registered" => on_tx!(&mut tx, |c| sqlx::query(
                "INSERT INTO users (user_id, display_name, active, updated_at)
                 VALUES ($1, $2, 1, $3)
                 ON CONFLICT (user_id) DO UPDATE SET display_name = excluded.display_name,
                    updated_at = excluded.updated_at"
            )
            .bind(user_id)
            .bind(name.unwrap_or(""))
            .bind(now)
            .execute(c)
            .await
            .map(|_| ()))
            .map_err(StoreError::from)?,
            "user.updated" => {
                if let Some(name) = name {
                    on_tx!(&mut tx, |c| sqlx::query(
                        "UPDATE users SET display_name = $2, updated_at = $3 WHERE user_id = $1"
                    )
                    .bind(user_id)
                    .bind(name)
                    .bind(now)
                    .execute(c)
                    .await
                    .map(|_| ()))
                    .map_err(StoreError::from)?
                }
            }
            "user.banned" => on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE users SET active = 0, updated_at = $2 WHERE user_id = $1"
            )
            .bind(user_id)
            .bind(now)
            .execute(c)
            .await
            .map(|_| ()))
            .map_err(StoreError::from)?,
            _ => {}
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Writes the feed: order changes, in-app notifications, and mentions and
/// direct messages, each once per (user, event).
pub struct FeedWriter(pub Arc<Messaging>);

impl Handler for FeedWriter {
    async fn handle(&self, ev: &RecordedEvent) -> Result<(), HandlerError> {
        let e = &ev.envelope;
        let p = &e.payload;
        let str_of = |k: &str| p.get(k).and_then(Value::as_str).map(str::to_owned);
        if e.event_type == "message.deleted" {
            return self.scrub(p).await;
        }
        let mut entries: Vec<(String, &str, Value)> = Vec::new();
        match (e.topic.as_str(), e.event_type.as_str()) {
            ("orders.events", t) => {
                if let Some(user) = str_of("user_id") {
                    entries.push((
                        user,
                        "order",
                        json!({"event": t, "order_id": p.get("order_id"),
                               "order_number": p.get("order_number"), "status": p.get("status"),
                               "reason": p.get("reason")}),
                    ));
                }
            }
            ("notifications.events", "notification.sent") => {
                if let (Some(user), Some("in_app")) =
                    (str_of("user_id"), p.get("channel").and_then(Value::as_str))
                {
                    entries.push((
                        user,
                        "notification",
                        json!({"delivery_id": p.get("delivery_id"), "type": p.get("type")}),
                    ));
                }
            }
            (MESSAGES_TOPIC, "message.sent") => {
                let direct = p.get("direct").and_then(Value::as_bool).unwrap_or(false);
                let kind = if direct { "direct_message" } else { "mention" };
                let msg = p.get("message").cloned().unwrap_or(Value::Null);
                for u in p
                    .get("recipients")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                {
                    entries.push((
                        u.to_owned(),
                        kind,
                        json!({"channel_id": p.get("channel_id"),
                               "workspace_id": p.get("workspace_id"), "seq": p.get("seq"),
                               "message_id": msg.get("id"), "author_id": msg.get("author_id"),
                               "body": msg.get("body")}),
                    ));
                }
            }
            _ => {}
        }
        if entries.is_empty() {
            return Ok(());
        }
        let now = e.occurred_at.as_micros();
        let mut tx = self.0.db.begin().await?;
        for (user, kind, payload) in &entries {
            on_tx!(&mut tx, |c| {
                sqlx::query(
                "INSERT INTO feed (user_id, event_id, kind, payload, at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id, event_id) DO NOTHING"
            )
            .bind(user)
            .bind(e.id.to_string())
            .bind(*kind)
            .bind(payload.to_string())
            .bind(now)
            .execute(c)
            .await
            .map(|_| ())
            })
            .map_err(StoreError::from)?;
        }
        tx.commit().await?;
        self.0.feed_tick();
        Ok(())
    }
}

impl FeedWriter {
    /// A deleted message's text leaves the feed entries that quoted it.
    async fn scrub(&self, p: &Value) -> Result<(), HandlerError> {
        let Some(message_id) = p.get("message_id").and_then(Value::as_str) else {
            return Ok(());
        };
        let mut tx = self.0.db.begin().await?;
        let rows: Vec<(i64, String)> = on_tx!(&mut tx, |c| sqlx::query_as(
            "SELECT id, payload FROM feed WHERE message_id = $1"
        )
        .bind(message_id)
        .fetch_all(c)
        .await)
        .map_err(StoreError::from)?;
        for (id, payload) in rows {
            let mut v: Value = serde_json::from_str(&payload)?;
            v["body"] = Value::Null;
            v["deleted"] = Value::Bool(true);
            on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE feed SET payload = $2 WHERE id = $1"
            )
            .bind(id)
            .bind(v.to_string())
            .execute(c)
            .await
            .map(|_| ()))
            .map_err(StoreError::from)?;
        }
        tx.commit().await?;
        Ok(())
    }
}
