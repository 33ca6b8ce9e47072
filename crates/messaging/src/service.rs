//! The context's operations: workspaces, channels, messages, presence and the
//! feed. Every write that others must hear of commits its event with it.

use crate::model::{self, Channel, ChannelEvent, ChannelKind, Member, Message, Reaction, Role};
use crate::{
    Messaging, Workspace, MESSAGES_TOPIC, NOTICES_TOPIC, PRESENCE_TOPIC, WORKSPACES_TOPIC,
};
use flowline_core::{Envelope, ErrorCode, EventDraft, Problem, Timestamp};
use flowline_http::{ApiError, RequestContext};
use flowline_store::{on_pool, on_tx, outbox, StoreError, Tx};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::Row;
use std::time::Duration;

/// Largest page of history or feed.
pub const MAX_PAGE: i64 = 200;
/// Different reactions one message can carry (each change's frame lists them).
pub const MAX_REACTIONS: usize = 50;

fn rfc(us: i64) -> String {
    Timestamp::from_micros(us).to_rfc3339()
}

fn not_found(what: &str) -> ApiError {
    Problem::new(ErrorCode::NotFound)
        .with_detail(format!("no such {what}"))
        .into()
}

fn denied(detail: &str) -> ApiError {
    Problem::new(ErrorCode::PermissionDenied)
        .with_detail(detail.to_owned())
        .into()
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    Problem::new(ErrorCode::ValidationFailed)
        .with_field(field, message)
        .into()
}

/// What a user may do in a channel.
#[derive(Debug, Clone)]
pub struct Access {
    pub channel: Channel,
    /// The user's workspace role (`None`: not in the workspace).
    pub role: Option<Role>,
}

impl Access {
    pub fn can_read(&self) -> bool {
        self.channel.member || (self.channel.kind == ChannelKind::Public && self.role.is_some())
    }

    pub fn can_post(&self) -> bool {
        self.channel.member
    }

    fn require_read(self) -> Result<Access, ApiError> {
        if self.can_read() {
            Ok(self)
        } else if self.role.is_some() {
            Err(denied("a private channel is open to its members only"))
        } else {
            Err(not_found("channel"))
        }
    }

    fn require_post(self) -> Result<Access, ApiError> {
        let a = self.require_read()?;
        if a.can_post() {
            Ok(a)
        } else {
            Err(denied("join the channel to post in it"))
        }
    }
}

/// Someone typing in a channel.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Typing {
    pub user_id: String,
    /// When the indication lapses unless renewed.
    pub until: String,
}

/// `POST` body of a message, from REST or the socket.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    pub body: String,
    /// Reply in the thread of this message (of the same channel).
    #[serde(default)]
    pub parent_id: Option<String>,
    /// The client's own id for the message: a retried send with the same id
    /// returns the first one instead of posting twice.
    #[serde(default)]
    pub client_id: Option<String>,
}

/// A page of history.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MessagePage {
    /// Ascending by sequence.
    pub items: Vec<Message>,
    /// More messages exist beyond this page in the direction asked.
    pub has_more: bool,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Presence {
    pub user_id: String,
    pub online: bool,
    /// When the user's last connection closed (RFC 3339), if ever.
    pub last_seen_at: Option<String>,
}

/// One entry of a user's feed (`GET /api/v1/events`).
#[derive(Debug, Clone, Serialize)]
pub struct FeedEntry {
    pub id: i64,
    pub kind: String,
    pub payload: Value,
    pub at: String,
}

pub(crate) async fn enqueue(
    tx: &mut Tx,
    ctx: &RequestContext,
    topic: &str,
    event_type: &str,
    key: &str,
    payload: Value,
) -> Result<(), StoreError> {
    let ev = Envelope::stamp(
        EventDraft::new(topic, event_type, key, payload),
        &ctx.correlation_id,
        Some(&ctx.request_id),
    );
    outbox::enqueue(tx, &ev).await
}

const CHANNEL_SQL: &str = "SELECT c.id, c.workspace_id, c.name, c.kind, c.topic, c.last_seq,
        c.created_at,
        (SELECT role FROM workspace_members wm
          WHERE wm.workspace_id = c.workspace_id AND wm.user_id = $2) AS ws_role,
        (SELECT read_seq FROM channel_members cm
          WHERE cm.channel_id = c.id AND cm.user_id = $2) AS read_seq
     FROM channels c";

macro_rules! access_row {
    ($r:expr) => {{
        let r = $r;
        let read_seq: Option<i64> = r.try_get("read_seq")?;
        let role: Option<String> = r.try_get("ws_role")?;
        let kind: String = r.try_get("kind")?;
        Access {
            channel: Channel {
                id: r.try_get("id")?,
                workspace_id: r.try_get("workspace_id")?,
                name: r.try_get("name")?,
                kind: ChannelKind::parse(&kind).unwrap_or(ChannelKind::Private),
                topic: r.try_get("topic")?,
                last_seq: r.try_get("last_seq")?,
                member: read_seq.is_some(),
                read_seq: read_seq.unwrap_or(0),
                created_at: rfc(r.try_get("created_at")?),
            },
            role: role.as_deref().and_then(Role::parse),
        }
    }};
}

const MESSAGE_COLUMNS: &str =
    "id, channel_id, seq, author_id, parent_id, body, client_id, created_at, edited_at, deleted_at";

macro_rules! message_row {
    ($r:expr) => {{
        let r = $r;
        let edited: Option<i64> = r.try_get("edited_at")?;
        let deleted: Option<i64> = r.try_get("deleted_at")?;
        Message {
            id: r.try_get("id")?,
            channel_id: r.try_get("channel_id")?,
            seq: r.try_get("seq")?,
            author_id: r.try_get("author_id")?,
            parent_id: r.try_get("parent_id")?,
            body: r.try_get("body")?,
            client_id: r.try_get("client_id")?,
            created_at: rfc(r.try_get("created_at")?),
            edited_at: edited.map(rfc),
            deleted: deleted.is_some(),
            reactions: Vec::new(),
        }
    }};
}

macro_rules! workspace_of {
    ($r:expr) => {{
        let r = $r;
        let role: Option<String> = r.try_get("role")?;
        Workspace {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            status: r.try_get("status")?,
            created_by: r.try_get("created_by")?,
            failure: r.try_get("failure")?,
            role: role.as_deref().and_then(Role::parse),
            created_at: rfc(r.try_get("created_at")?),
        }
    }};
}

/// Ids are UUIDs here; anything else (a NUL byte, a megabyte) names nothing,
/// and must not reach PostgreSQL, which refuses NUL in text.
fn plausible_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && !id.contains('\0')
}

/// Text a user wrote: no NUL or other control characters but newline and tab.
fn clean_text(field: &str, text: &str) -> Result<(), ApiError> {
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r')
    {
        return Err(invalid(field, "no control characters"));
    }
    Ok(())
}

fn validate_name(name: &str, max: usize) -> Result<String, ApiError> {
    let n = name.trim();
    if n.is_empty() || n.chars().count() > max {
        return Err(invalid("name", format!("1 to {max} characters")));
    }
    if n.chars().any(char::is_control) {
        return Err(invalid("name", "no control characters"));
    }
    Ok(n.to_owned())
}

fn validate_channel_name(name: &str) -> Result<String, ApiError> {
    let n = name.trim().trim_start_matches('#').to_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 80
        && n.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(invalid(
            "name",
            "1 to 80 of a-z, 0-9, '-' and '_', starting with a letter or digit",
        ));
    }
    Ok(n)
}

fn validate_emoji(emoji: &str) -> Result<(), ApiError> {
    let n = emoji.chars().count();
    if emoji.contains('\0') {
        return Err(invalid("emoji", "no control characters"));
    }
    if n == 0 || n > 32 || emoji.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("emoji", "1 to 32 characters, no spaces"));
    }
    Ok(())
}

impl Messaging {
    // ---------------------------------------------------------------- access

    /// The channel as `user_id` sees it (`None`: no such channel).
    pub async fn access(&self, channel_id: &str, user_id: &str) -> Result<Access, ApiError> {
        if !plausible_id(channel_id) {
            return Err(not_found("channel"));
        }
        let sql = format!("{CHANNEL_SQL} WHERE c.id = $1");
        let found: Option<Access> = on_pool!(&self.db, |p| {
            async {
                let row = sqlx::query(&sql)
                    .bind(channel_id)
                    .bind(user_id)
                    .fetch_optional(p)
                    .await?;
                match row {
                    Some(r) => Ok::<_, StoreError>(Some(access_row!(&r))),
                    None => Ok(None),
                }
            }
            .await
        })?;
        found.ok_or_else(|| not_found("channel"))
    }

    /// The channel if `user_id` may read it: for subscriptions and history.
    pub async fn readable(&self, channel_id: &str, user_id: &str) -> Result<Channel, ApiError> {
        Ok(self
            .access(channel_id, user_id)
            .await?
            .require_read()?
            .channel)
    }

    async fn role(&self, workspace_id: &str, user_id: &str) -> Result<Option<Role>, StoreError> {
        if !plausible_id(workspace_id) || !plausible_id(user_id) {
            return Ok(None);
        }
        let role: Option<String> = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT role FROM workspace_members WHERE workspace_id = $1 AND user_id = $2"
        )
        .bind(workspace_id)
        .bind(user_id)
        .fetch_optional(p)
        .await)
        .map_err(StoreError::from)?;
        Ok(role.as_deref().and_then(Role::parse))
    }

    async fn require_member(&self, workspace_id: &str, user_id: &str) -> Result<Role, ApiError> {
        self.role(workspace_id, user_id)
            .await?
            .ok_or_else(|| not_found("workspace"))
    }

    /// Workspace ids `user_id` belongs to (presence is shown within them).
    pub async fn workspace_ids(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT workspace_id FROM workspace_members WHERE user_id = $1"
        )
        .bind(user_id)
        .fetch_all(p)
        .await)
        .map_err(StoreError::from)
    }

    /// Whether the directory knows `user_id` as active.
    pub async fn user_active(&self, user_id: &str) -> Result<Option<bool>, StoreError> {
        if !plausible_id(user_id) {
            return Ok(None);
        }
        let a: Option<i64> = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT active FROM users WHERE user_id = $1"
        )
        .bind(user_id)
        .fetch_optional(p)
        .await)
        .map_err(StoreError::from)?;
        Ok(a.map(|a| a != 0))
    }

    // ------------------------------------------------------------ workspaces

    /// Runs the create-workspace saga and waits (a few seconds at most) for
    /// it to finish: the answer is ACTIVE with `#general`, FAILED with the
    /// reason, or still CREATING.
    pub async fn create_workspace(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        name: &str,
    ) -> Result<Workspace, ApiError> {
        let name = validate_name(name, 80)?;
        let id = flowline_core::id::new_id().to_string();
        let data = json!({
            "workspace_id": id,
            "name": name,
            "user_id": user_id,
            "general_channel_id": flowline_core::id::new_id().to_string(),
            "correlation_id": ctx.correlation_id,
        });
        let mut tx = self.db.begin().await?;
        self.orchestrator
            .start(&mut tx, crate::WORKSPACE_SAGA, &id, data)
            .await?;
        tx.commit().await?;
        self.orchestrator.wake();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut pause = Duration::from_millis(2);
        loop {
            let done = matches!(
                self.orchestrator.status(&id).await?,
                Some(flowline_saga::SagaStatus::Completed | flowline_saga::SagaStatus::Compensated)
            );
            if done || tokio::time::Instant::now() >= deadline {
                break;
            }
            // A few milliseconds usually; back off to 50 ms between looks.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        Ok(self
            .workspace_row(&id, user_id)
            .await?
            .unwrap_or(Workspace {
                id,
                name,
                status: "CREATING".into(),
                created_by: user_id.to_owned(),
                failure: None,
                role: None,
                created_at: Timestamp::now().to_rfc3339(),
            }))
    }

    async fn workspace_row(
        &self,
        id: &str,
        user_id: &str,
    ) -> Result<Option<Workspace>, StoreError> {
        on_pool!(&self.db, |p| {
            let row = sqlx::query(
                "SELECT w.id, w.name, w.status, w.created_by, w.failure, w.created_at,
                    (SELECT role FROM workspace_members m
                      WHERE m.workspace_id = w.id AND m.user_id = $2) AS role
                 FROM workspaces w WHERE w.id = $1",
            )
            .bind(id)
            .bind(user_id)
            .fetch_optional(p)
            .await?;
            match row {
                Some(r) => Ok(Some(workspace_of!(&r))),
                None => Ok(None),
            }
        })
    }

    /// A workspace of the caller's (the creator also sees a failed one).
    pub async fn workspace(&self, id: &str, user_id: &str) -> Result<Workspace, ApiError> {
        match self.workspace_row(id, user_id).await? {
            Some(w) if w.role.is_some() || w.created_by == user_id => Ok(w),
            _ => Err(not_found("workspace")),
        }
    }

    /// The caller's workspaces, oldest first.
    pub async fn workspaces(&self, user_id: &str) -> Result<Vec<Workspace>, ApiError> {
        Ok(on_pool!(&self.db, |p| {
            let rows = sqlx::query(
                "SELECT w.id, w.name, w.status, w.created_by, w.failure, w.created_at, m.role
                 FROM workspaces w JOIN workspace_members m ON m.workspace_id = w.id
                 WHERE m.user_id = $1 ORDER BY w.created_at, w.id",
            )
            .bind(user_id)
            .fetch_all(p)
            .await
            .map_err(StoreError::from)?;
            rows.iter()
                .map(|r| Ok(workspace_of!(r)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?)
    }

    pub async fn members(
        &self,
        workspace_id: &str,
        user_id: &str,
    ) -> Result<Vec<Member>, ApiError> {
        self.require_member(workspace_id, user_id).await?;
        Ok(on_pool!(&self.db, |p| {
            let rows = sqlx::query(
                "SELECT m.user_id, u.display_name, m.role, m.joined_at
                 FROM workspace_members m LEFT JOIN users u ON u.user_id = m.user_id
                 WHERE m.workspace_id = $1 ORDER BY m.joined_at, m.user_id",
            )
            .bind(workspace_id)
            .fetch_all(p)
            .await
            .map_err(StoreError::from)?;
            rows.iter()
                .map(|r| {
                    let role: String = r.try_get("role")?;
                    Ok(Member {
                        user_id: r.try_get("user_id")?,
                        display_name: r.try_get("display_name")?,
                        role: Role::parse(&role).unwrap_or(Role::Member),
                        joined_at: rfc(r.try_get("joined_at")?),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()
        })?)
    }

    /// Adds (or changes the role of) a member; owners and admins only. A new
    /// member joins `#general`.
    pub async fn put_member(
        &self,
        ctx: &RequestContext,
        workspace_id: &str,
        actor: &str,
        user_id: &str,
        role: Role,
    ) -> Result<Member, ApiError> {
        let actor_role = self.require_member(workspace_id, actor).await?;
        if !actor_role.manages() {
            return Err(denied("only owners and admins add members"));
        }
        if role == Role::Owner && actor_role != Role::Owner {
            return Err(denied("only an owner makes owners"));
        }
        // An admin manages members, not other admins or owners.
        if let Some(current) = self.role(workspace_id, user_id).await? {
            if current != Role::Member && actor_role != Role::Owner && user_id != actor {
                return Err(denied("only an owner changes an admin's or owner's role"));
            }
        }
        match self.user_active(user_id).await? {
            Some(true) => {}
            _ => return Err(not_found("user")),
        }
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let added = on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO workspace_members (workspace_id, user_id, role, joined_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT (workspace_id, user_id) DO NOTHING"
        )
        .bind(workspace_id)
        .bind(user_id)
        .bind(role.as_str())
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if added == 0 {
            on_tx!(&mut tx, |c| sqlx::query(
                "UPDATE workspace_members SET role = $3 WHERE workspace_id = $1 AND user_id = $2"
            )
            .bind(workspace_id)
            .bind(user_id)
            .bind(role.as_str())
            .execute(c)
            .await
            .map(|_| ()))
            .map_err(StoreError::from)?;
        } else {
            on_tx!(&mut tx, |c| sqlx::query(
                "INSERT INTO channel_members (channel_id, user_id, joined_at, read_seq)
                 SELECT id, $2, $3, 0 FROM channels WHERE workspace_id = $1 AND name = 'general'
                 ON CONFLICT (channel_id, user_id) DO NOTHING"
            )
            .bind(workspace_id)
            .bind(user_id)
            .bind(now)
            .execute(c)
            .await
            .map(|_| ()))
            .map_err(StoreError::from)?;
            enqueue(
                &mut tx,
                ctx,
                WORKSPACES_TOPIC,
                "member.joined",
                workspace_id,
                json!({"workspace_id": workspace_id, "user_id": user_id, "role": role}),
            )
            .await?;
        }
        tx.commit().await?;
        self.relay.notify();
        Ok(Member {
            user_id: user_id.to_owned(),
            display_name: None,
            role,
            joined_at: rfc(now),
        })
    }

    // -------------------------------------------------------------- channels

    /// The channels the caller can read: every public one and the private
    /// and direct ones they belong to.
    pub async fn channels(
        &self,
        workspace_id: &str,
        user_id: &str,
    ) -> Result<Vec<Channel>, ApiError> {
        self.require_member(workspace_id, user_id).await?;
        let sql = format!(
            "{CHANNEL_SQL} WHERE c.workspace_id = $1 AND (c.kind = 'public' OR EXISTS (
                SELECT 1 FROM channel_members x WHERE x.channel_id = c.id AND x.user_id = $2))
             ORDER BY c.created_at, c.id"
        );
        Ok(on_pool!(&self.db, |p| {
            let rows = sqlx::query(&sql)
                .bind(workspace_id)
                .bind(user_id)
                .fetch_all(p)
                .await
                .map_err(StoreError::from)?;
            rows.iter()
                .map(|r| Ok(access_row!(r).channel))
                .collect::<Result<Vec<_>, StoreError>>()
        })?)
    }

    /// A public or private channel; the creator is its first member.
    pub async fn create_channel(
        &self,
        ctx: &RequestContext,
        workspace_id: &str,
        user_id: &str,
        name: &str,
        kind: ChannelKind,
        topic: Option<&str>,
    ) -> Result<Channel, ApiError> {
        self.require_member(workspace_id, user_id).await?;
        if kind == ChannelKind::Direct {
            return Err(invalid(
                "kind",
                "open a direct channel with POST .../direct",
            ));
        }
        let name = validate_channel_name(name)?;
        if let Some(t) = topic {
            if t.chars().count() > 250 {
                return Err(invalid("topic", "at most 250 characters"));
            }
            clean_text("topic", t)?;
        }
        let id = flowline_core::id::new_id().to_string();
        let mut tx = self.db.begin().await?;
        let created =
            insert_channel(&mut tx, &id, workspace_id, &name, kind, topic, user_id).await?;
        if !created {
            tx.rollback().await?;
            return Err(Problem::new(ErrorCode::Conflict)
                .with_field("name", "a channel of that name exists in this workspace")
                .into());
        }
        add_channel_member(&mut tx, &id, user_id).await?;
        enqueue(
            &mut tx,
            ctx,
            WORKSPACES_TOPIC,
            "channel.created",
            workspace_id,
            json!({"workspace_id": workspace_id, "channel_id": id, "name": name,
                   "kind": kind, "created_by": user_id}),
        )
        .await?;
        tx.commit().await?;
        self.relay.notify();
        Ok(self.access(&id, user_id).await?.channel)
    }

    /// The direct channel between the caller and `other` (created once).
    pub async fn open_direct(
        &self,
        ctx: &RequestContext,
        workspace_id: &str,
        user_id: &str,
        other: &str,
    ) -> Result<Channel, ApiError> {
        self.require_member(workspace_id, user_id).await?;
        if other == user_id {
            return Err(invalid("user_id", "a direct channel needs another member"));
        }
        if self.role(workspace_id, other).await?.is_none() {
            return Err(invalid("user_id", "not a member of this workspace"));
        }
        let (a, b) = if user_id < other {
            (user_id, other)
        } else {
            (other, user_id)
        };
        let name = format!("dm:{a}:{b}");
        let id = flowline_core::id::new_id().to_string();
        let mut tx = self.db.begin().await?;
        if insert_channel(
            &mut tx,
            &id,
            workspace_id,
            &name,
            ChannelKind::Direct,
            None,
            user_id,
        )
        .await?
        {
            add_channel_member(&mut tx, &id, a).await?;
            add_channel_member(&mut tx, &id, b).await?;
            enqueue(
                &mut tx,
                ctx,
                WORKSPACES_TOPIC,
                "channel.created",
                workspace_id,
                json!({"workspace_id": workspace_id, "channel_id": id, "name": name,
                       "kind": ChannelKind::Direct, "created_by": user_id}),
            )
            .await?;
        }
        tx.commit().await?;
        self.relay.notify();
        let existing: String = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT id FROM channels WHERE workspace_id = $1 AND name = $2"
        )
        .bind(workspace_id)
        .bind(&name)
        .fetch_one(p)
        .await)
        .map_err(StoreError::from)?;
        Ok(self.access(&existing, user_id).await?.channel)
    }

    /// Joins a public channel (a no-op for a member).
    pub async fn join(
        &self,
        ctx: &RequestContext,
        channel_id: &str,
        user_id: &str,
    ) -> Result<Channel, ApiError> {
        let a = self.access(channel_id, user_id).await?;
        if a.channel.member {
            return Ok(a.channel);
        }
        if a.role.is_none() {
            return Err(not_found("channel"));
        }
        if a.channel.kind != ChannelKind::Public {
            return Err(denied("private channels are joined by invitation"));
        }
        self.add_member_tx(ctx, &a.channel, user_id).await?;
        Ok(self.access(channel_id, user_id).await?.channel)
    }

    /// Adds another workspace member to a private channel the caller is in.
    pub async fn invite(
        &self,
        ctx: &RequestContext,
        channel_id: &str,
        actor: &str,
        user_id: &str,
    ) -> Result<Channel, ApiError> {
        let a = self.access(channel_id, actor).await?.require_post()?;
        if a.channel.kind == ChannelKind::Direct {
            return Err(invalid("channel_id", "a direct channel has two members"));
        }
        if self.role(&a.channel.workspace_id, user_id).await?.is_none() {
            return Err(invalid("user_id", "not a member of this workspace"));
        }
        self.add_member_tx(ctx, &a.channel, user_id).await?;
        Ok(self.access(channel_id, user_id).await?.channel)
    }

    async fn add_member_tx(
        &self,
        ctx: &RequestContext,
        ch: &Channel,
        user_id: &str,
    ) -> Result<(), ApiError> {
        let mut tx = self.db.begin().await?;
        if add_channel_member(&mut tx, &ch.id, user_id).await? {
            enqueue(
                &mut tx,
                ctx,
                WORKSPACES_TOPIC,
                "channel.joined",
                &ch.workspace_id,
                json!({"workspace_id": ch.workspace_id, "channel_id": ch.id, "user_id": user_id}),
            )
            .await?;
        }
        tx.commit().await?;
        self.relay.notify();
        Ok(())
    }

    /// Leaves a channel (not a direct one). Leaving a private channel ends
    /// access to it.
    pub async fn leave(
        &self,
        ctx: &RequestContext,
        channel_id: &str,
        user_id: &str,
    ) -> Result<(), ApiError> {
        let a = self.access(channel_id, user_id).await?.require_read()?;
        if a.channel.kind == ChannelKind::Direct {
            return Err(invalid("channel_id", "direct channels cannot be left"));
        }
        let mut tx = self.db.begin().await?;
        let n = on_tx!(&mut tx, |c| sqlx::query(
            "DELETE FROM channel_members WHERE channel_id = $1 AND user_id = $2"
        )
        .bind(channel_id)
        .bind(user_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if n > 0 {
            enqueue(
                &mut tx,
                ctx,
                WORKSPACES_TOPIC,
                "channel.left",
                &a.channel.workspace_id,
                json!({"workspace_id": a.channel.workspace_id, "channel_id": channel_id,
                       "user_id": user_id}),
            )
            .await?;
        }
        tx.commit().await?;
        self.relay.notify();
        Ok(())
    }

    /// Moves the caller's read marker forward (never back).
    pub async fn mark_read(
        &self,
        channel_id: &str,
        user_id: &str,
        seq: i64,
    ) -> Result<Channel, ApiError> {
        let a = self.access(channel_id, user_id).await?.require_read()?;
        if !a.channel.member {
            return Err(denied("join the channel to keep a read marker"));
        }
        if seq < 0 || seq > a.channel.last_seq {
            return Err(invalid("seq", format!("0 to {}", a.channel.last_seq)));
        }
        let mut tx = self.db.begin().await?;
        on_tx!(&mut tx, |c| sqlx::query(
            "UPDATE channel_members SET read_seq = $3
             WHERE channel_id = $1 AND user_id = $2 AND read_seq < $3"
        )
        .bind(channel_id)
        .bind(user_id)
        .bind(seq)
        .execute(c)
        .await
        .map(|_| ()))
        .map_err(StoreError::from)?;
        tx.commit().await?;
        Ok(self.access(channel_id, user_id).await?.channel)
    }

    // -------------------------------------------------------------- messages

    /// A message body as stored (trailing space trimmed), or why not.
    fn checked_body<'b>(&self, body: &'b str) -> Result<&'b str, ApiError> {
        let body = body.trim_end();
        if body.trim().is_empty() {
            return Err(invalid("body", "must not be empty"));
        }
        let max = self.cfg.max_message_chars;
        if body.chars().count() > max {
            return Err(Problem::new(ErrorCode::PayloadTooLarge)
                .with_field("body", format!("at most {max} characters"))
                .into());
        }
        clean_text("body", body)?;
        Ok(body)
    }

    /// Posts a message. `Ok((message, false))` when a retry with the same
    /// `client_id` found it already posted.
    pub async fn post(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        channel_id: &str,
        new: NewMessage,
    ) -> Result<(Message, bool), ApiError> {
        let body = self.checked_body(&new.body)?;
        if let Some(c) = &new.client_id {
            if c.is_empty() || c.len() > 100 {
                return Err(invalid("client_id", "1 to 100 characters"));
            }
            clean_text("client_id", c)?;
        }
        let a = self.access(channel_id, user_id).await?.require_post()?;
        if let Some(parent) = &new.parent_id {
            let m = self.message_in_channel(parent).await?;
            if m.as_ref().map(|m| m.channel_id.as_str()) != Some(channel_id) {
                return Err(invalid("parent_id", "no such message in this channel"));
            }
        }
        let mut tx = self.db.begin().await?;
        // The channel's row lock first: a concurrent retry with the same
        // client_id has then committed, and this lookup sees it.
        let (seq, workspace_id) = next_seq(&mut tx, channel_id).await?;
        if let Some(cid) = &new.client_id {
            if let Some(m) = by_client_id(&mut tx, channel_id, user_id, cid).await? {
                // Rolling back gives the sequence number back.
                tx.rollback().await?;
                return Ok((self.with_reactions(m).await?, false));
            }
        }
        let now = Timestamp::now().as_micros();
        let msg = Message {
            id: flowline_core::id::new_id().to_string(),
            channel_id: channel_id.to_owned(),
            seq,
            author_id: user_id.to_owned(),
            parent_id: new.parent_id.clone(),
            body: Some(body.to_owned()),
            client_id: new.client_id.clone(),
            created_at: rfc(now),
            edited_at: None,
            deleted: false,
            reactions: Vec::new(),
        };
        on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO messages (id, channel_id, seq, author_id, parent_id, body, client_id,
                created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        )
        .bind(&msg.id)
        .bind(channel_id)
        .bind(seq)
        .bind(user_id)
        .bind(msg.parent_id.as_deref())
        .bind(body)
        .bind(msg.client_id.as_deref())
        .bind(now)
        .execute(c)
        .await
        .map(|_| ()))
        .map_err(StoreError::from)?;
        // Who hears of it beyond the channel: mentioned readers and, in a
        // direct channel, the other member.
        let mut recipients = Vec::new();
        let mut reasons = Vec::new();
        if a.channel.kind == ChannelKind::Direct {
            for u in channel_members(&mut tx, channel_id).await? {
                if u != user_id {
                    recipients.push(u);
                    reasons.push("direct");
                }
            }
        }
        let mentioned = model::mentions(body);
        for u in &mentioned {
            if u == user_id || recipients.contains(u) {
                continue;
            }
            if can_read_tx(&mut tx, &a.channel, u).await? {
                recipients.push(u.clone());
                reasons.push("mention");
            }
        }
        let payload = json!({
            "channel_id": channel_id,
            "workspace_id": workspace_id,
            "seq": seq,
            "message": msg,
            "mentions": mentioned,
            "direct": a.channel.kind == ChannelKind::Direct,
            "recipients": recipients,
        });
        record(&mut tx, ctx, channel_id, seq, "message.sent", &payload, now).await?;
        for (u, reason) in recipients.iter().zip(&reasons) {
            if online_tx(&mut tx, u).await? {
                continue;
            }
            let excerpt: String = body.chars().take(140).collect();
            enqueue(
                &mut tx,
                ctx,
                NOTICES_TOPIC,
                "message.missed",
                u,
                json!({
                    "user_id": u, "reason": reason, "channel_id": channel_id,
                    "channel_name": a.channel.name, "workspace_id": workspace_id,
                    "message_id": msg.id, "seq": seq, "author_id": user_id,
                    "excerpt": excerpt,
                }),
            )
            .await?;
        }
        tx.commit().await?;
        self.relay.notify();
        Ok((msg, true))
    }

    /// Replaces a message's body; its author only.
    pub async fn edit(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        message_id: &str,
        body: &str,
    ) -> Result<Message, ApiError> {
        let body = self.checked_body(body)?;
        let m = self
            .message_in_channel(message_id)
            .await?
            .ok_or_else(|| not_found("message"))?;
        // Editing is writing: a member of the channel, and its author.
        self.access(&m.channel_id, user_id).await?.require_post()?;
        if m.author_id != user_id {
            return Err(denied("only the author edits a message"));
        }
        if m.deleted {
            return Err(Problem::new(ErrorCode::InvalidState)
                .with_detail("the message was deleted")
                .into());
        }
        if m.body.as_deref() == Some(body) {
            return self.with_reactions(m).await.map_err(Into::into);
        }
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let (seq, workspace_id) = next_seq(&mut tx, &m.channel_id).await?;
        let n = on_tx!(&mut tx, |c| {
            sqlx::query(
            "UPDATE messages SET body = $2, edited_at = $3 WHERE id = $1 AND deleted_at IS NULL"
        )
        .bind(message_id)
        .bind(body)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        })
        .map_err(StoreError::from)?;
        if n == 0 {
            tx.rollback().await?;
            return Err(Problem::new(ErrorCode::InvalidState)
                .with_detail("the message was deleted")
                .into());
        }
        let mut msg = message_tx(&mut tx, message_id).await?;
        msg.reactions = reactions_tx(&mut tx, message_id).await?;
        let payload = json!({"channel_id": m.channel_id, "workspace_id": workspace_id,
                             "seq": seq, "message": msg});
        record(
            &mut tx,
            ctx,
            &m.channel_id,
            seq,
            "message.edited",
            &payload,
            now,
        )
        .await?;
        tx.commit().await?;
        self.relay.notify();
        Ok(msg)
    }

    /// Deletes a message (its author, or a workspace owner or admin); it
    /// stays as a tombstone. Deleting twice is a no-op.
    pub async fn delete(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        message_id: &str,
    ) -> Result<Message, ApiError> {
        let m = self
            .message_in_channel(message_id)
            .await?
            .ok_or_else(|| not_found("message"))?;
        let a = self.access(&m.channel_id, user_id).await?.require_read()?;
        if m.author_id != user_id && !a.role.is_some_and(Role::manages) {
            return Err(denied(
                "only the author or a workspace admin deletes a message",
            ));
        }
        if m.deleted {
            return Ok(m);
        }
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let (seq, workspace_id) = next_seq(&mut tx, &m.channel_id).await?;
        let n = on_tx!(&mut tx, |c| {
            sqlx::query(
            "UPDATE messages SET body = NULL, deleted_at = $2 WHERE id = $1 AND deleted_at IS NULL"
        )
        .bind(message_id)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected())
        })
        .map_err(StoreError::from)?;
        let msg = message_tx(&mut tx, message_id).await?;
        if n == 0 {
            tx.rollback().await?;
            return Ok(msg);
        }
        on_tx!(&mut tx, |c| sqlx::query(
            "DELETE FROM reactions WHERE message_id = $1"
        )
        .bind(message_id)
        .execute(c)
        .await
        .map(|_| ()))
        .map_err(StoreError::from)?;
        let payload = json!({"channel_id": m.channel_id, "workspace_id": workspace_id,
                             "seq": seq, "message_id": message_id, "message": msg,
                             "deleted_by": user_id});
        record(
            &mut tx,
            ctx,
            &m.channel_id,
            seq,
            "message.deleted",
            &payload,
            now,
        )
        .await?;
        // A deleted message's text must not come back through a resume:
        // the stored versions of it become the tombstone.
        scrub_message(&mut tx, &m.channel_id, message_id, &msg).await?;
        tx.commit().await?;
        self.relay.notify();
        Ok(msg)
    }

    /// Adds (`add`) or removes a reaction; a repeat changes nothing.
    pub async fn react(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        message_id: &str,
        emoji: &str,
        add: bool,
    ) -> Result<Message, ApiError> {
        validate_emoji(emoji)?;
        let m = self
            .message_in_channel(message_id)
            .await?
            .ok_or_else(|| not_found("message"))?;
        // Reacting is writing: members only, as for posting.
        self.access(&m.channel_id, user_id).await?.require_post()?;
        if add && !m.reactions.iter().any(|r| r.emoji == emoji) {
            let m = self.with_reactions(m.clone()).await?;
            if m.reactions.len() >= MAX_REACTIONS && !m.reactions.iter().any(|r| r.emoji == emoji) {
                return Err(Problem::new(ErrorCode::ValidationFailed)
                    .with_field(
                        "emoji",
                        format!("at most {MAX_REACTIONS} different reactions per message"),
                    )
                    .into());
            }
        }
        if m.deleted {
            return Err(Problem::new(ErrorCode::InvalidState)
                .with_detail("the message was deleted")
                .into());
        }
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        let (seq, workspace_id) = next_seq(&mut tx, &m.channel_id).await?;
        let n = if add {
            on_tx!(&mut tx, |c| sqlx::query(
                "INSERT INTO reactions (message_id, user_id, emoji, created_at)
                 SELECT $1, $2, $3, $4 WHERE EXISTS (
                    SELECT 1 FROM messages WHERE id = $1 AND deleted_at IS NULL)
                 ON CONFLICT (message_id, user_id, emoji) DO NOTHING"
            )
            .bind(message_id)
            .bind(user_id)
            .bind(emoji)
            .bind(now)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?
        } else {
            on_tx!(&mut tx, |c| sqlx::query(
                "DELETE FROM reactions WHERE message_id = $1 AND user_id = $2 AND emoji = $3"
            )
            .bind(message_id)
            .bind(user_id)
            .bind(emoji)
            .execute(c)
            .await
            .map(|r| r.rows_affected()))
            .map_err(StoreError::from)?
        };
        let mut msg = message_tx(&mut tx, message_id).await?;
        msg.reactions = reactions_tx(&mut tx, message_id).await?;
        if n == 0 {
            // Nothing changed: give the sequence number back.
            tx.rollback().await?;
            return Ok(msg);
        }
        let kind = if add {
            "reaction.added"
        } else {
            "reaction.removed"
        };
        let payload = json!({"channel_id": m.channel_id, "workspace_id": workspace_id,
                             "seq": seq, "message_id": message_id, "user_id": user_id,
                             "emoji": emoji, "reactions": msg.reactions});
        record(&mut tx, ctx, &m.channel_id, seq, kind, &payload, now).await?;
        tx.commit().await?;
        self.relay.notify();
        Ok(msg)
    }

    /// One message the caller can read.
    pub async fn message(&self, user_id: &str, message_id: &str) -> Result<Message, ApiError> {
        let m = self
            .message_in_channel(message_id)
            .await?
            .ok_or_else(|| not_found("message"))?;
        self.access(&m.channel_id, user_id).await?.require_read()?;
        Ok(self.with_reactions(m).await?)
    }

    async fn message_in_channel(&self, id: &str) -> Result<Option<Message>, StoreError> {
        if !plausible_id(id) {
            return Ok(None);
        }
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1");
        on_pool!(&self.db, |p| {
            match sqlx::query(&sql).bind(id).fetch_optional(p).await? {
                Some(r) => Ok(Some(message_row!(&r))),
                None => Ok(None),
            }
        })
    }

    async fn with_reactions(&self, mut m: Message) -> Result<Message, StoreError> {
        let mut all = self.reactions_of(std::slice::from_ref(&m.id)).await?;
        m.reactions = all.remove(&m.id).unwrap_or_default();
        Ok(m)
    }

    async fn reactions_of(
        &self,
        ids: &[String],
    ) -> Result<std::collections::HashMap<String, Vec<Reaction>>, StoreError> {
        let mut out: std::collections::HashMap<String, Vec<Reaction>> = Default::default();
        if ids.is_empty() {
            return Ok(out);
        }
        let marks: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT message_id, emoji, user_id FROM reactions WHERE message_id IN ({})
             ORDER BY created_at, user_id",
            marks.join(", ")
        );
        let rows: Vec<(String, String, String)> = on_pool!(&self.db, |p| {
            let mut q = sqlx::query_as(&sql);
            for id in ids {
                q = q.bind(id);
            }
            q.fetch_all(p).await
        })
        .map_err(StoreError::from)?;
        for (mid, emoji, user) in rows {
            add_reaction(out.entry(mid).or_default(), emoji, user);
        }
        Ok(out)
    }

    /// History by message sequence: the newest `limit` before `before` (or
    /// overall), or the oldest `limit` after `after`. Ascending either way.
    pub async fn history(
        &self,
        user_id: &str,
        channel_id: &str,
        before: Option<i64>,
        after: Option<i64>,
        thread: Option<&str>,
        limit: i64,
    ) -> Result<MessagePage, ApiError> {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(Problem::new(ErrorCode::MalformedRequest)
                .with_field("limit", format!("1..={MAX_PAGE}"))
                .into());
        }
        if before.is_some() && after.is_some() {
            return Err(Problem::new(ErrorCode::MalformedRequest)
                .with_field("before", "give before or after, not both")
                .into());
        }
        self.access(channel_id, user_id).await?.require_read()?;
        let (cond, order) = match after {
            Some(_) => ("seq > $2", "ASC"),
            None => ("seq < $2", "DESC"),
        };
        let pivot = after.or(before).unwrap_or(i64::MAX);
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE channel_id = $1 AND {cond}
                AND ($4 = '' OR parent_id = $4 OR id = $4)
             ORDER BY seq {order} LIMIT $3"
        );
        let mut items: Vec<Message> = on_pool!(&self.db, |p| {
            let rows = sqlx::query(&sql)
                .bind(channel_id)
                .bind(pivot)
                .bind(limit + 1)
                .bind(thread.unwrap_or(""))
                .fetch_all(p)
                .await
                .map_err(StoreError::from)?;
            rows.iter()
                .map(|r| Ok(message_row!(r)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        let has_more = items.len() as i64 > limit;
        items.truncate(limit as usize);
        if after.is_none() {
            items.reverse();
        }
        let ids: Vec<String> = items.iter().map(|m| m.id.clone()).collect();
        let mut reactions = self.reactions_of(&ids).await?;
        for m in &mut items {
            m.reactions = reactions.remove(&m.id).unwrap_or_default();
        }
        Ok(MessagePage { items, has_more })
    }

    /// The channel's changes after `after`, in order (at most `limit`).
    pub async fn events_after(
        &self,
        channel_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ChannelEvent>, StoreError> {
        let rows: Vec<(i64, String, String)> = on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT seq, kind, payload FROM channel_events
             WHERE channel_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        )
        .bind(channel_id)
        .bind(after)
        .bind(limit)
        .fetch_all(p)
        .await)
        .map_err(StoreError::from)?;
        rows.into_iter()
            .map(|(seq, kind, payload)| {
                Ok(ChannelEvent {
                    channel_id: channel_id.to_owned(),
                    seq,
                    kind,
                    payload: serde_json::from_str(&payload)?,
                })
            })
            .collect()
    }

    // -------------------------------------------------------------- presence

    /// The first connection of `user_id` on this node opened: online, and
    /// `presence.user_online` when no other node had them.
    pub async fn presence_up(&self, user_id: &str) -> Result<(), StoreError> {
        let now = Timestamp::now().as_micros();
        let mut tx = self.db.begin().await?;
        lock_user(&mut tx, user_id).await?;
        let others: i64 = on_tx!(&mut tx, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM presence_connections WHERE user_id = $1 AND node_id <> $2"
        )
        .bind(user_id)
        .bind(&self.cfg.node_id)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?;
        let new = on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO presence_connections (node_id, user_id, connections, since)
             VALUES ($1, $2, 1, $3) ON CONFLICT (node_id, user_id) DO NOTHING"
        )
        .bind(&self.cfg.node_id)
        .bind(user_id)
        .bind(now)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if new > 0 && others == 0 {
            let ctx = RequestContext::detached();
            enqueue(
                &mut tx,
                &ctx,
                PRESENCE_TOPIC,
                "presence.user_online",
                user_id,
                json!({"user_id": user_id, "at": rfc(now)}),
            )
            .await?;
        }
        tx.commit().await?;
        self.relay.notify();
        Ok(())
    }

    /// The last connection of `user_id` on this node closed.
    pub async fn presence_down(&self, user_id: &str) -> Result<(), StoreError> {
        self.presence_down_on(&self.cfg.node_id, user_id).await
    }

    /// `node_id` no longer has `user_id` (this node, or a dead one's sweep).
    async fn presence_down_on(&self, node_id: &str, user_id: &str) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        lock_user(&mut tx, user_id).await?;
        let n = on_tx!(&mut tx, |c| sqlx::query(
            "DELETE FROM presence_connections WHERE node_id = $1 AND user_id = $2"
        )
        .bind(node_id)
        .bind(user_id)
        .execute(c)
        .await
        .map(|r| r.rows_affected()))
        .map_err(StoreError::from)?;
        if n > 0 {
            self.offline_if_gone(&mut tx, user_id).await?;
        }
        tx.commit().await?;
        self.relay.notify();
        Ok(())
    }

    async fn offline_if_gone(&self, tx: &mut Tx, user_id: &str) -> Result<(), StoreError> {
        let left: i64 = on_tx!(tx, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM presence_connections WHERE user_id = $1"
        )
        .bind(user_id)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?;
        if left > 0 {
            return Ok(());
        }
        let now = Timestamp::now().as_micros();
        on_tx!(tx, |c| sqlx::query(
            "INSERT INTO last_seen (user_id, at) VALUES ($1, $2)
             ON CONFLICT (user_id) DO UPDATE SET at = excluded.at"
        )
        .bind(user_id)
        .bind(now)
        .execute(c)
        .await
        .map(|_| ()))
        .map_err(StoreError::from)?;
        let ctx = RequestContext::detached();
        enqueue(
            tx,
            &ctx,
            PRESENCE_TOPIC,
            "presence.user_offline",
            user_id,
            json!({"user_id": user_id, "at": rfc(now), "last_seen_at": rfc(now)}),
        )
        .await
    }

    /// Forgets this node's connections (at start: a previous run's are gone).
    pub async fn presence_reset(&self) -> Result<u64, StoreError> {
        let users: Vec<String> = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT user_id FROM presence_connections WHERE node_id = $1"
        )
        .bind(&self.cfg.node_id)
        .fetch_all(p)
        .await)
        .map_err(StoreError::from)?;
        for u in &users {
            self.presence_down(u).await?;
        }
        Ok(users.len() as u64)
    }

    /// Renews this node's presence heartbeat. `true` if it had lapsed (or
    /// never existed): other nodes may have taken this node's users offline,
    /// so the caller re-announces the users it still has.
    pub async fn presence_heartbeat(&self) -> Result<bool, StoreError> {
        let now = Timestamp::now().as_micros();
        let until = now + self.cfg.presence_ttl.as_micros() as i64;
        let mut tx = self.db.begin().await?;
        let before: Option<i64> = on_tx!(&mut tx, |c| sqlx::query_scalar(
            "SELECT expires_at FROM presence_nodes WHERE node_id = $1"
        )
        .bind(&self.cfg.node_id)
        .fetch_optional(c)
        .await)
        .map_err(StoreError::from)?;
        on_tx!(&mut tx, |c| sqlx::query(
            "INSERT INTO presence_nodes (node_id, expires_at) VALUES ($1, $2)
             ON CONFLICT (node_id) DO UPDATE SET expires_at = excluded.expires_at"
        )
        .bind(&self.cfg.node_id)
        .bind(until)
        .execute(c)
        .await
        .map(|_| ()))
        .map_err(StoreError::from)?;
        tx.commit().await?;
        Ok(before.is_none_or(|b| b < now))
    }

    /// Takes offline the users of nodes whose heartbeat lapsed (they died
    /// without closing their connections). Returns how many were swept.
    pub async fn presence_sweep(&self) -> Result<u64, StoreError> {
        let now = Timestamp::now().as_micros();
        let stale: Vec<(String, String)> = on_pool!(&self.db, |p| {
            sqlx::query_as(
            "SELECT pc.node_id, pc.user_id FROM presence_connections pc
             WHERE pc.node_id <> $1 AND NOT EXISTS (
                SELECT 1 FROM presence_nodes n WHERE n.node_id = pc.node_id AND n.expires_at >= $2)"
        )
        .bind(&self.cfg.node_id)
        .bind(now)
        .fetch_all(p)
        .await
        })
        .map_err(StoreError::from)?;
        for (node, user) in &stale {
            tracing::info!(node = %node, user_id = %user, "presence of a lapsed node expired");
            self.presence_down_on(node, user).await?;
        }
        Ok(stale.len() as u64)
    }

    /// Online state and last seen of a workspace's members.
    pub async fn presence(
        &self,
        workspace_id: &str,
        user_id: &str,
    ) -> Result<Vec<Presence>, ApiError> {
        self.require_member(workspace_id, user_id).await?;
        let rows: Vec<(String, i64, Option<i64>)> = on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT m.user_id,
                (SELECT COUNT(*) FROM presence_connections pc WHERE pc.user_id = m.user_id),
                (SELECT at FROM last_seen s WHERE s.user_id = m.user_id)
             FROM workspace_members m WHERE m.workspace_id = $1 ORDER BY m.user_id"
        )
        .bind(workspace_id)
        .fetch_all(p)
        .await)
        .map_err(StoreError::from)?;
        Ok(rows
            .into_iter()
            .map(|(user_id, n, seen)| Presence {
                user_id,
                online: n > 0,
                last_seen_at: seen.map(rfc),
            })
            .collect())
    }

    /// Whether `user_id` has a live connection on any node.
    pub async fn online(&self, user_id: &str) -> Result<bool, StoreError> {
        let n: i64 = on_pool!(&self.db, |p| sqlx::query_scalar(
            "SELECT COUNT(*) FROM presence_connections WHERE user_id = $1"
        )
        .bind(user_id)
        .fetch_one(p)
        .await)
        .map_err(StoreError::from)?;
        Ok(n > 0)
    }

    /// `presence.typing` in a channel the user can post in.
    pub async fn typing(
        &self,
        ctx: &RequestContext,
        user_id: &str,
        channel_id: &str,
    ) -> Result<(), ApiError> {
        let a = self.access(channel_id, user_id).await?.require_post()?;
        self.typing_board()
            .mark(channel_id, user_id, self.cfg.typing_ttl)
            .await?;
        let mut tx = self.db.begin().await?;
        enqueue(
            &mut tx,
            ctx,
            PRESENCE_TOPIC,
            "presence.typing",
            channel_id,
            json!({"channel_id": channel_id, "workspace_id": a.channel.workspace_id,
                   "user_id": user_id,
                   "expires_in_ms": self.cfg.typing_ttl.as_millis() as u64}),
        )
        .await?;
        tx.commit().await?;
        self.relay.notify();
        Ok(())
    }

    /// Who is typing in a channel the caller can read, until when.
    pub async fn typing_now(
        &self,
        channel_id: &str,
        user_id: &str,
    ) -> Result<Vec<Typing>, ApiError> {
        self.access(channel_id, user_id).await?.require_read()?;
        Ok(self
            .typing_board()
            .who(channel_id)
            .await?
            .into_iter()
            .map(|(user_id, exp_ms)| Typing {
                user_id,
                until: rfc(exp_ms * 1000),
            })
            .collect())
    }

    // ------------------------------------------------------------------ feed

    /// The user's feed after `after` (oldest first).
    pub async fn feed_after(
        &self,
        user_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<FeedEntry>, StoreError> {
        let rows: Vec<(i64, String, String, i64)> = on_pool!(&self.db, |p| sqlx::query_as(
            "SELECT id, kind, payload, at FROM feed WHERE user_id = $1 AND id > $2
             ORDER BY id LIMIT $3"
        )
        .bind(user_id)
        .bind(after)
        .bind(limit)
        .fetch_all(p)
        .await)
        .map_err(StoreError::from)?;
        rows.into_iter()
            .map(|(id, kind, payload, at)| {
                Ok(FeedEntry {
                    id,
                    kind,
                    payload: serde_json::from_str(&payload)?,
                    at: rfc(at),
                })
            })
            .collect()
    }

    /// Ticks when this node adds feed rows.
    pub fn feed_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.feed_added.subscribe()
    }

    pub(crate) fn feed_tick(&self) {
        self.feed_added.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Serialises one user's presence changes across nodes: each node counts
/// the others' rows, which must not change under it.
async fn lock_user(tx: &mut Tx, user_id: &str) -> Result<(), StoreError> {
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO last_seen (user_id, at) VALUES ($1, NULL)
         ON CONFLICT (user_id) DO UPDATE SET at = last_seen.at"
    )
    .bind(user_id)
    .execute(c)
    .await
    .map(|_| ()))
    .map_err(StoreError::from)
}

/// Replaces the message in the stored `message.sent` / `message.edited`
/// changes of `message_id` with `tombstone`.
async fn scrub_message(
    tx: &mut Tx,
    channel_id: &str,
    message_id: &str,
    tombstone: &Message,
) -> Result<(), StoreError> {
    let rows: Vec<(i64, String)> = on_tx!(tx, |c| sqlx::query_as(
        "SELECT seq, payload FROM channel_events
         WHERE channel_id = $1 AND message_id = $2 AND kind IN ('message.sent', 'message.edited')"
    )
    .bind(channel_id)
    .bind(message_id)
    .fetch_all(c)
    .await)
    .map_err(StoreError::from)?;
    for (seq, payload) in rows {
        let mut v: Value = serde_json::from_str(&payload)?;
        v["message"] = serde_json::to_value(tombstone)?;
        on_tx!(tx, |c| sqlx::query(
            "UPDATE channel_events SET payload = $3 WHERE channel_id = $1 AND seq = $2"
        )
        .bind(channel_id)
        .bind(seq)
        .bind(v.to_string())
        .execute(c)
        .await
        .map(|_| ()))
        .map_err(StoreError::from)?;
    }
    Ok(())
}

/// Takes the channel's next sequence number; holds its row lock to commit.
async fn next_seq(tx: &mut Tx, channel_id: &str) -> Result<(i64, String), StoreError> {
    on_tx!(tx, |c| {
        sqlx::query_as(
        "UPDATE channels SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq, workspace_id"
    )
    .bind(channel_id)
    .fetch_one(c)
    .await
    })
    .map_err(StoreError::from)
}

/// Stores a sequenced change and its event, in the caller's transaction.
async fn record(
    tx: &mut Tx,
    ctx: &RequestContext,
    channel_id: &str,
    seq: i64,
    kind: &str,
    payload: &Value,
    now: i64,
) -> Result<(), StoreError> {
    let message_id = payload
        .get("message_id")
        .or_else(|| payload.get("message").and_then(|m| m.get("id")))
        .and_then(Value::as_str);
    on_tx!(tx, |c| sqlx::query(
        "INSERT INTO channel_events (channel_id, seq, kind, message_id, payload, at)
         VALUES ($1, $2, $3, $4, $5, $6)"
    )
    .bind(channel_id)
    .bind(seq)
    .bind(kind)
    .bind(message_id)
    .bind(payload.to_string())
    .bind(now)
    .execute(c)
    .await
    .map(|_| ()))
    .map_err(StoreError::from)?;
    enqueue(tx, ctx, MESSAGES_TOPIC, kind, channel_id, payload.clone()).await
}

pub(crate) async fn insert_channel(
    tx: &mut Tx,
    id: &str,
    workspace_id: &str,
    name: &str,
    kind: ChannelKind,
    topic: Option<&str>,
    created_by: &str,
) -> Result<bool, StoreError> {
    Ok(on_tx!(tx, |c| sqlx::query(
        "INSERT INTO channels (id, workspace_id, name, kind, topic, created_by, last_seq, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, 0, $7) ON CONFLICT DO NOTHING"
    )
    .bind(id)
    .bind(workspace_id)
    .bind(name)
    .bind(kind.as_str())
    .bind(topic)
    .bind(created_by)
    .bind(Timestamp::now().as_micros())
    .execute(c)
    .await
    .map(|r| r.rows_affected())).map_err(StoreError::from)?
        > 0)
}

pub(crate) async fn add_channel_member(
    tx: &mut Tx,
    channel_id: &str,
    user_id: &str,
) -> Result<bool, StoreError> {
    Ok(on_tx!(tx, |c| sqlx::query(
        "INSERT INTO channel_members (channel_id, user_id, joined_at, read_seq)
         VALUES ($1, $2, $3, 0) ON CONFLICT (channel_id, user_id) DO NOTHING"
    )
    .bind(channel_id)
    .bind(user_id)
    .bind(Timestamp::now().as_micros())
    .execute(c)
    .await
    .map(|r| r.rows_affected()))
    .map_err(StoreError::from)?
        > 0)
}

async fn channel_members(tx: &mut Tx, channel_id: &str) -> Result<Vec<String>, StoreError> {
    on_tx!(tx, |c| sqlx::query_scalar(
        "SELECT user_id FROM channel_members WHERE channel_id = $1 ORDER BY user_id"
    )
    .bind(channel_id)
    .fetch_all(c)
    .await)
    .map_err(StoreError::from)
}

async fn can_read_tx(tx: &mut Tx, ch: &Channel, user_id: &str) -> Result<bool, StoreError> {
    let n: i64 = if ch.kind == ChannelKind::Public {
        on_tx!(tx, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM workspace_members WHERE workspace_id = $1 AND user_id = $2"
        )
        .bind(&ch.workspace_id)
        .bind(user_id)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?
    } else {
        on_tx!(tx, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM channel_members WHERE channel_id = $1 AND user_id = $2"
        )
        .bind(&ch.id)
        .bind(user_id)
        .fetch_one(c)
        .await)
        .map_err(StoreError::from)?
    };
    Ok(n > 0)
}

async fn online_tx(tx: &mut Tx, user_id: &str) -> Result<bool, StoreError> {
    let n: i64 = on_tx!(tx, |c| sqlx::query_scalar(
        "SELECT COUNT(*) FROM presence_connections WHERE user_id = $1"
    )
    .bind(user_id)
    .fetch_one(c)
    .await)
    .map_err(StoreError::from)?;
    Ok(n > 0)
}

async fn by_client_id(
    tx: &mut Tx,
    channel_id: &str,
    user_id: &str,
    client_id: &str,
) -> Result<Option<Message>, StoreError> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages
         WHERE channel_id = $1 AND author_id = $2 AND client_id = $3"
    );
    on_tx!(tx, |c| {
        match sqlx::query(&sql)
            .bind(channel_id)
            .bind(user_id)
            .bind(client_id)
            .fetch_optional(c)
            .await?
        {
            Some(r) => Ok(Some(message_row!(&r))),
            None => Ok(None),
        }
    })
}

async fn message_tx(tx: &mut Tx, id: &str) -> Result<Message, StoreError> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1");
    on_tx!(tx, |c| {
        let r = sqlx::query(&sql).bind(id).fetch_one(c).await?;
        Ok(message_row!(&r))
    })
}

async fn reactions_tx(tx: &mut Tx, id: &str) -> Result<Vec<Reaction>, StoreError> {
    let rows: Vec<(String, String)> = on_tx!(tx, |c| {
        sqlx::query_as(
        "SELECT emoji, user_id FROM reactions WHERE message_id = $1 ORDER BY created_at, user_id"
    )
    .bind(id)
    .fetch_all(c)
    .await
    })
    .map_err(StoreError::from)?;
    let mut out: Vec<Reaction> = Vec::new();
    for (emoji, user) in rows {
        add_reaction(&mut out, emoji, user);
    }
    Ok(out)
}

/// Folds one (emoji, user) row into a message's reactions, in row order.
fn add_reaction(list: &mut Vec<Reaction>, emoji: String, user: String) {
    match list.iter_mut().find(|r| r.emoji == emoji) {
        Some(r) => r.users.push(user),
        None => list.push(Reaction {
            emoji,
            users: vec![user],
        }),
    }
}
